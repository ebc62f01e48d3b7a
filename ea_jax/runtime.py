"""Process start-up shared by the entry points (train.py, eval.py, sample.py, the study and the LM
comparison and their workers): jax.distributed, the allocator setting, log filtering, and the
one-line reporting of the project's own errors."""

from __future__ import annotations

import logging as py_logging
import os
import sys
from typing import Callable

from absl import flags, logging

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _DropLibraryInfo(py_logging.Filter):
  """Keeps warnings and errors from everywhere, INFO/DEBUG only from this project's files
  (orbax's per-save chatter, clu's and other libraries' INFO lines are dropped)."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    if record.levelno >= py_logging.WARNING:
      return True
    path = os.path.abspath(record.pathname)
    return path.startswith(_ROOT + os.sep) and "site-packages" not in path


_FILTER = _DropLibraryInfo()


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -4, -8


def keep_freed_memory(one_arena: bool = False) -> bool:
  """Makes glibc malloc keep freed memory for reuse instead of returning it to the OS.

  XLA on CPU allocates and frees every step's buffers, from its compute and dispatch threads.
  With glibc's defaults, large buffers (above the adaptive mmap threshold) are mmap'ed and
  unmapped every step and heaps are trimmed, so each step faults its pages in again: a quarter
  of a pinned single-threaded LM training process's CPU time was system time (`make lm`,
  docs/lm/README.md). Here: no mmap'ed chunks, heap growth in 64 MiB steps, and free space at a
  heap's top returned to the OS only beyond 2 GiB. No library sets this; glibc reads the same
  values from GLIBC_TUNABLES only at process start, which a notebook or a spawned worker does not
  control. Returns whether it applied (False off glibc). Call it once, early, before other
  threads allocate. The process then keeps memory it freed (up to 2 GiB above what it uses).

  `one_arena=True` also puts every thread on the main heap, which holds buffers of any size
  (a thread arena's heaps hold at most 64 MiB): what the study and LM workers use (one pinned
  single-threaded XLA process per core), where a worker left on thread arenas was seen faulting
  its large step buffers in again (`make lm`, 2026-12-01). The default keeps glibc's per-thread
  arenas, for multi-threaded processes (train.py, eval, the CLIs' parent processes): there one
  arena serialises their threads' malloc, and `python benchmarks/allocator.py` and
  `benchmarks/attention.py --malloc=...` measured the per-thread arenas as fast or faster
  (2026-12-01, the 2-core EPYC: LM step, threaded, 0.74x glibc's defaults against 0.83x with
  one arena; chunked EA fwd+bwd at T=2048 867 ms against 965 ms, 891 ms with the defaults).
  """
  import ctypes
  import ctypes.util

  name = ctypes.util.find_library("c")
  try:
    libc = ctypes.CDLL(name or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
  settings = ((_M_ARENA_MAX, 1),) if one_arena else ()
  settings += (
    (_M_MMAP_MAX, 0),
    (_M_TRIM_THRESHOLD, (1 << 31) - 1),
    (_M_TOP_PAD, 64 << 20),
  )
  return all(mallopt(param, value) == 1 for param, value in settings)


def quiet_library_logs() -> None:
  logger = py_logging.getLogger("absl")
  if _FILTER not in logger.filters:
    logger.addFilter(_FILTER)


def define_process_flags() -> None:
  """Defines --coordinator_address, --num_processes, --process_id (multi-process runs) and
  --verbose (library INFO logs and tracebacks)."""
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs).")
  flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
  flags.DEFINE_integer("process_id", None, "This process's index (multi-process runs).")
  flags.DEFINE_bool("verbose", False, "Show libraries' INFO logs and full tracebacks of errors.")


def initialize_from_flags() -> None:
  """`initialize` with the values of the flags from `define_process_flags`."""
  f = flags.FLAGS
  initialize(f.coordinator_address, f.num_processes, f.process_id, verbose=f.verbose)


def initialize(
  coordinator_address: str | None,
  num_processes: int | None,
  process_id: int | None,
  *,
  verbose: bool = False,
) -> None:
  """Joins a multi-process job (CPU collectives through gloo) if a coordinator is given.

  Must run before any JAX computation. Unless `verbose`, libraries' INFO logs are dropped.
  Also sets the allocator (`keep_freed_memory`).
  """
  keep_freed_memory()
  if not verbose:
    quiet_library_logs()
  given = [coordinator_address is not None, num_processes is not None, process_id is not None]
  if any(given) and not all(given):
    raise ValueError(
      "multi-process runs need all of --coordinator_address, --num_processes and --process_id"
    )
  if not coordinator_address:
    return
  if not 0 <= process_id < num_processes:
    raise ValueError(f"--process_id={process_id} must be in [0, --num_processes={num_processes})")
  import jax

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
  )
  logging.info(
    "process %d of %d joined %s: %d local / %d global devices",
    jax.process_index(),
    jax.process_count(),
    coordinator_address,
    jax.local_device_count(),
    jax.device_count(),
  )


def project_errors() -> tuple[type[BaseException], ...]:
  """The errors that mean bad input or a bad workdir (not a bug): config, data, checkpoint,
  provenance, lock, NaN. They are reported in one line."""
  from ea_jax import checkpointing, workdir_lock

  return (
    ValueError,
    FileNotFoundError,
    FloatingPointError,
    checkpointing.CheckpointError,
    workdir_lock.WorkdirLockedError,
  )


def one_line(error: BaseException, limit: int = 600) -> str:
  """`error` as one line: its message's lines joined, cut to `limit` characters."""
  text = "; ".join(line.strip() for line in str(error).splitlines() if line.strip())
  text = text or type(error).__name__
  return text if len(text) <= limit else text[: limit - 3] + "..."


def run_reporting_errors(main: Callable[[], int | None]) -> int:
  """Runs `main()`; a project error prints `error: <one line>` to stderr and returns 1 (with
  --verbose the traceback is raised instead). Returns main's exit status otherwise."""
  try:
    return main() or 0
  except project_errors() as e:
    if flags.FLAGS.is_parsed() and flags.FLAGS["verbose"].value:
      raise
    print(f"error: {one_line(e)}\n(rerun with --verbose for the traceback)", file=sys.stderr)
    return 1
