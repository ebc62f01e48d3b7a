"""Process start-up (ea_jax.runtime): the allocator setting and the one-line errors."""

import os
import platform
import subprocess
import sys

import pytest

from ea_jax import runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A worker thread that allocates and frees buffers of several sizes in a loop, as XLA's compute
# thread does every training step, and prints the page faults one loop costs after two warm-up
# loops. A thread, because glibc gives threads arenas of their own, whose heaps hold at most
# 64 MiB (the 100 MiB buffer is mmap'ed there); sizes from 1 to 100 MiB, as in the LM's steps.
_PROBE = """
import resource, sys, threading
import numpy as np
sys.path.insert(0, {root!r})
if {apply} is not None:
  from ea_jax import runtime
  assert runtime.keep_freed_memory(one_arena={apply})
SIZES = [1 << 20, 6 << 20, 24 << 20, 3 << 20, 12 << 20, 56 << 20, 100 << 20]
def loop():
  bufs = [np.ones(s // 4, np.float32) for s in SIZES]
  more = [np.ones(s // 8, np.float32) for s in SIZES]
  del bufs, more
def measure(out):
  loop(); loop()
  before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
  for _ in range(10):
    loop()
  out.append((resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before) / 10)
out = []
t = threading.Thread(target=measure, args=(out,))
t.start(); t.join()
print(out[0])
"""


def _faults_per_loop(apply: bool | None) -> float:
  """apply: None = glibc's defaults, else keep_freed_memory(one_arena=apply)."""
  code = _PROBE.format(root=ROOT, apply=apply)
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  return float(done.stdout.strip())


@pytest.mark.skipif(
  platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
  reason="mallopt and RUSAGE_THREAD are glibc / Linux",
)
@pytest.mark.parametrize("one_arena,factor", [(True, 20), (False, 10)])
def test_keep_freed_memory_stops_the_page_faults_of_repeated_buffers(one_arena, factor):
  # One loop touches ~300 MiB (~77,000 pages); glibc's defaults fault ~1,650 in again per loop
  # (measured 2026-12-01), one arena 0, per-thread arenas ~100 (the thread arena's heap holds
  # the small buffers, the main heap the rest).
  default, kept = _faults_per_loop(None), _faults_per_loop(one_arena)
  assert default >= 100, default
  assert kept <= default / factor, (default, kept)


def test_one_line_joins_lines_and_cuts_long_messages():
  assert runtime.one_line(ValueError("a\n  b\n\nc")) == "a; b; c"
  assert runtime.one_line(KeyError()) == "KeyError"
  long = runtime.one_line(ValueError("x" * 1000), limit=50)
  assert len(long) == 50 and long.endswith("...")
