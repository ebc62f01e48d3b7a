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
if {apply}:
  from ea_jax import runtime
  assert runtime.keep_freed_memory()
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


def _faults_per_loop(apply: bool) -> float:
  code = _PROBE.format(root=ROOT, apply=apply)
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  return float(done.stdout.strip())


@pytest.mark.skipif(
  platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
  reason="mallopt and RUSAGE_THREAD are glibc / Linux",
)
def test_keep_freed_memory_stops_the_page_faults_of_repeated_buffers():
  # One loop touches ~300 MiB (~77,000 pages); glibc's defaults fault hundreds in again.
  default, kept = _faults_per_loop(False), _faults_per_loop(True)
  assert default >= 100, default
  assert kept <= default / 20, (default, kept)


def test_one_line_joins_lines_and_cuts_long_messages():
  assert runtime.one_line(ValueError("a\n  b\n\nc")) == "a; b; c"
  assert runtime.one_line(KeyError()) == "KeyError"
  long = runtime.one_line(ValueError("x" * 1000), limit=50)
  assert len(long) == 50 and long.endswith("...")
