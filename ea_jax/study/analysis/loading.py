"""Loading a trained run for analysis: its model, parameters and training config.

The one place the analyses restore a checkpoint, so changing how runs are restored is a change
here only.
"""
from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np

from ea_jax import checkpointing
from ea_jax import train_lib


def load_run(workdir: str):
  """(model, params as NumPy arrays, training config) of the latest checkpoint of `workdir`.

  Args:
    workdir: a training workdir (holds train_config.json and checkpoints/).
  Raises:
    FileNotFoundError: when `workdir` holds no checkpoint.
  """
  info = train_lib.read_train_config(workdir)
  config = ml_collections.ConfigDict(info["config"])
  setup = train_lib.Setup(config, vocab_size=int(info["vocab_size"]),
                          max_len=int(info["max_len"]))
  with jax.set_mesh(setup.mesh):
    # A real init gives the restore its target structure and shardings.
    state, _ = setup.init_state()
    ckpts = checkpointing.Checkpoints(os.path.join(workdir, "checkpoints"), keep=1000)
    step = ckpts.latest_step()
    if step is None:
      raise FileNotFoundError(f"no checkpoint under {workdir}/checkpoints")
    state = ckpts.restore(step, checkpointing.abstract_like(state))
    ckpts.close()
  params = jax.tree.map(np.asarray, jax.device_get(state.params))
  return setup.model, params, config
