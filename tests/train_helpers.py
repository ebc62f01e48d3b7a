"""Shared by the training tests: the tiny config, a few raw train steps, and a subprocess entry.

Run as a script (`python tests/train_helpers.py '<json>'`) it trains in a fresh process -- so
tests can set XLA_FLAGS (fake devices) before JAX is imported -- and writes the losses and
final parameters to an .npz file.
"""

import importlib
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)


def load_config(name: str = "tiny", overrides: dict | None = None):
  """configs/<name>.py's get_config() with dotted-key overrides applied (typos raise)."""
  config = importlib.import_module(f"configs.{name}").get_config()
  for key, value in (overrides or {}).items():
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def run_steps(config, num_steps: int) -> dict:
  """Trains `num_steps` raw steps on the config's mesh; returns losses, flat params, spec info."""
  import jax
  import numpy as np
  from flax import traverse_util

  from ea_jax import data as data_lib
  from ea_jax import train_lib

  source = data_lib.make_source(config, splits=("train",))
  setup = train_lib.get_setup(config, vocab_size=source.vocab_size, max_len=source.seq_len)
  batch_sh = setup.batch_sharding(config.train.batch_size)
  with jax.set_mesh(setup.mesh):
    state, _ = setup.init_state(config.train.seed)
    step_fn = setup.train_step(config.train.batch_size, config.train)
    next_batch = source.train_batches(config.train.seed, config.train.batch_size, batch_sh)
    losses = []
    for i in range(num_steps):
      state, m = step_fn(state, next_batch(i))
      losses.append(float(m.compute()["loss"]))
    flat = traverse_util.flatten_dict(jax.device_get(state.params), sep="/")
    sharded = sorted(
      k
      for k, v in traverse_util.flatten_dict(state.params, sep="/").items()
      if not v.sharding.is_fully_replicated
    )
  return {
    "losses": np.asarray(losses),
    "params": {k: np.asarray(v) for k, v in flat.items()},
    "sharded": sharded,
    "num_devices": jax.device_count(),
  }


def main():
  args = json.loads(sys.argv[1])
  import jax

  jax.config.update("jax_numpy_rank_promotion", "raise")
  import numpy as np

  config = load_config(args.get("config", "tiny"), args.get("overrides"))
  out = run_steps(config, args["num_steps"])
  np.savez(args["out"], losses=out["losses"], **{"param:" + k: v for k, v in out["params"].items()})
  with open(args["out"] + ".json", "w") as f:
    json.dump(
      {"sharded": out["sharded"], "num_devices": out["num_devices"], **sharding_checks(config)}, f
    )


def sharding_checks(config) -> dict:
  """On this process's devices: the error for a batch the batch shards do not divide, and
  whether `host_to_global` puts exactly rows `shard.index` of the host array on each device."""
  import jax
  import numpy as np

  from ea_jax import sharding

  mesh = sharding.create_mesh(config.mesh)
  rules = sharding.logical_rules(dict(config.logical_axis_rules))
  try:
    sharding.batch_sharding(mesh, rules, jax.device_count() + 1)
    error = None
  except ValueError as e:
    error = str(e)
  sh = sharding.batch_sharding(mesh, rules, 8)
  host = np.arange(8 * 5, dtype=np.int32).reshape(8, 5)
  arr = sharding.host_to_global(host, sh)
  shards_right = all(
    np.array_equal(np.asarray(s.data), host[s.index]) for s in arr.addressable_shards
  )
  return {
    "indivisible_error": error,
    "host_to_global_shards_right": shards_right,
    "host_to_global_equal": bool(np.array_equal(np.asarray(jax.device_get(arr)), host)),
    "num_shards": len({str(s.index) for s in arr.addressable_shards}),
  }


if __name__ == "__main__":
  main()


def run_script(script: str, timeout: int = 300):
  """Runs Python `script` in a fresh interpreter at the repository root (so that XLA_FLAGS and
  other settings take effect before JAX is imported); returns the CompletedProcess."""
  import os
  import subprocess
  import sys

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.run(
    [sys.executable, "-c", script],
    cwd=root,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )
