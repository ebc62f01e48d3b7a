"""Process start-up shared by train.py and eval.py: jax.distributed and log filtering."""
from __future__ import annotations

import logging as py_logging

from absl import flags
from absl import logging


class _DropLibraryInfo(py_logging.Filter):
  """Drops INFO/DEBUG records from orbax (its per-save chatter), keeps warnings and errors."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    return record.levelno >= py_logging.WARNING or "orbax" not in record.pathname


def quiet_library_logs() -> None:
  py_logging.getLogger("absl").addFilter(_DropLibraryInfo())


def define_process_flags() -> None:
  """Defines --coordinator_address, --num_processes and --process_id (multi-process runs)."""
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs).")
  flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
  flags.DEFINE_integer("process_id", None, "This process's index (multi-process runs).")


def initialize_from_flags() -> None:
  """`initialize` with the values of the flags from `define_process_flags`."""
  f = flags.FLAGS
  initialize(f.coordinator_address, f.num_processes, f.process_id)


def initialize(coordinator_address: str | None, num_processes: int | None,
               process_id: int | None) -> None:
  """Joins a multi-process job (CPU collectives through gloo) if a coordinator is given.

  Must run before any JAX computation. With no coordinator it only quiets library logs.
  """
  quiet_library_logs()
  given = [coordinator_address is not None, num_processes is not None, process_id is not None]
  if any(given) and not all(given):
    raise ValueError("multi-process runs need all of --coordinator_address, --num_processes and "
                     "--process_id")
  if not coordinator_address:
    return
  if not 0 <= process_id < num_processes:
    raise ValueError(f"--process_id={process_id} must be in [0, --num_processes={num_processes})")
  import jax
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  logging.info("process %d of %d joined %s: %d local / %d global devices", jax.process_index(),
               jax.process_count(), coordinator_address, jax.local_device_count(),
               jax.device_count())
