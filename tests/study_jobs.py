"""Job functions for the study executor's tests (importable by spawned worker processes)."""

import os
import signal
import time


def quick(job):
  """Returns after a short sleep; the result names the job and the worker."""
  _, payload, info = job
  time.sleep(payload.get("sleep", 0.05))
  summary = {"pid": os.getpid(), "cores": sorted(os.sched_getaffinity(0))}
  return {**info, "status": "ok", "summary": summary, "wall_seconds": 0.0}


def dies_once(job):
  """With payload "die": kills its own worker the first time (marker file absent) and succeeds
  when retried; other jobs are quick."""
  marker, payload, info = job
  if payload.get("die") and not os.path.exists(marker):
    open(marker, "w").close()
    os.kill(os.getpid(), signal.SIGKILL)
  return quick(job)


def always_dies(job):
  os.kill(os.getpid(), signal.SIGKILL)


def sleeps_long(job):
  _, payload, info = job
  with open(payload["pid_file"], "a") as f:
    f.write(f"{os.getpid()}\n")
  time.sleep(600)
  return {**info, "status": "ok", "summary": {}, "wall_seconds": 600.0}


def jax_cache_settings(job):
  """Imports JAX in the worker and reports its persistent-cache settings."""
  _, _, info = job
  import jax

  summary = {
    "cache_dir": jax.config.jax_compilation_cache_dir,
    "min_compile_secs": jax.config.jax_persistent_cache_min_compile_time_secs,
    "min_entry_bytes": jax.config.jax_persistent_cache_min_entry_size_bytes,
  }
  return {**info, "status": "ok", "summary": summary, "wall_seconds": 0.0}
