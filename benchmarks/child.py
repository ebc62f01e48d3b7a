"""Runs a benchmark's measurement in a fresh process and reads back the JSON it writes.

Benchmarks that compare process-wide settings (the allocator, XLA flags) need one process per
measurement: the settings take effect only before JAX or XLA's threads start.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile


def measure(script: str, flags: list[str], env: dict, what: str, cwd: str) -> dict:
  """Runs `python script --child *flags --out=FILE` with `env` in `cwd`; returns FILE's JSON.

  A failed child ends the benchmark with one line naming `what` and the child's last error line.
  """
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "measurement.json")
    cmd = [sys.executable, os.path.abspath(script), "--child", *flags, f"--out={out}"]
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    if proc.returncode:
      tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
      raise SystemExit(f"error: {what} measurement failed: {tail[0]}")
    with open(out) as f:
      return json.load(f)
