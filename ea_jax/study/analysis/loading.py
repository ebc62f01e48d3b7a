"""Loading a trained run for analysis: its model, parameters and training config.

The one place the analyses restore a checkpoint, so changing how runs are restored is a change
here only.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from ea_jax import files, train_lib


def selected_step(workdir: str) -> int | None:
  """The checkpoint a run reports (selected on validation, train_summary.json), or None."""
  summary = files.read_json(os.path.join(workdir, train_lib.SUMMARY_FILE), {}) or {}
  return summary.get("selected_step")


def load_run(workdir: str, step: int | None = None):
  """(model, params as NumPy arrays, training config) of a checkpoint of `workdir`.

  Args:
    workdir: a training workdir (holds train_config.json and checkpoints/).
    step: the checkpoint; default: the one the run selected on validation (whose test numbers
      the study reports), else the latest.
  Raises:
    checkpointing.CheckpointError: when `workdir` holds no such checkpoint.
  """
  step = selected_step(workdir) if step is None else step
  setup, _, state = train_lib.restore(workdir, step)
  params = jax.tree.map(np.asarray, jax.device_get(state.params))
  config = train_lib.read_train_config(workdir)["config"]
  import ml_collections

  return setup.model, params, ml_collections.ConfigDict(config)
