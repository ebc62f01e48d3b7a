"""Fault cases of the study runner, for the fault campaign (benchmarks/faults.py):

  python benchmarks/faults.py --extra_cases=study_faults --cases=study_parent_kill9,study_sigterm

  study_parent_kill9  kill -9 of `python -m ea_jax.study` while its workers train: no worker may
                      outlive it by 10 s, and rerunning the same command must finish with the
                      results.csv of an uninterrupted study (wall times aside).
  study_sigterm       SIGTERM to the study: it stops (exit 1, "rerun the same command to
                      resume"), its workers end, and the rerun finishes exactly as above.

The study is configs/sweep.py:smoke with 2 workers (runs of a tiny model, seconds each).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXACT, REFUSED = "exact", "refused"
SMOKE = [
  f"--config={os.path.join(REPO, 'configs', 'sweep.py')}:smoke",
  "--workers=2",
  "--config.geometry.enabled=False",
]


def _command(workdir: str) -> list[str]:
  return [sys.executable, "-m", "ea_jax.study", f"--workdir={workdir}", *SMOKE]


def _children(pid: int) -> list[int]:
  """Live processes whose parent is `pid`."""
  out = []
  for name in os.listdir("/proc"):
    if name.isdigit():
      try:
        with open(f"/proc/{name}/stat") as f:
          fields = f.read().rsplit(")", 1)[1].split()
      except (FileNotFoundError, ProcessLookupError):
        continue
      if int(fields[1]) == pid and fields[0] != "Z":
        out.append(int(name))
  return out


def _alive(pid: int) -> bool:
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except FileNotFoundError:
    return False


def _results(workdir: str) -> list[dict]:
  from ea_jax.study import results

  rows = results.read_results(os.path.join(workdir, results.RESULTS_CSV))
  return [{k: v for k, v in r.items() if k != "wall_seconds"} for r in rows]


class _Study:
  def __init__(self, campaign):
    self.c = campaign
    self._reference = None

  def run(self, workdir: str) -> subprocess.CompletedProcess:
    return subprocess.run(
      _command(workdir), cwd=REPO, env=self.c.env, capture_output=True, text=True, timeout=1800
    )

  def reference(self) -> list[dict]:
    if self._reference is None:
      workdir = self.c.fresh("study_reference")
      proc = self.run(workdir)
      if proc.returncode != 0:
        raise RuntimeError(f"the reference study failed:\n{proc.stderr[-3000:]}")
      self._reference = _results(workdir)
    return self._reference

  def interrupted(self, name: str, sig: int, expect_status: int) -> str:
    reference = self.reference()
    workdir = self.c.fresh(name)
    proc = subprocess.Popen(
      _command(workdir),
      cwd=REPO,
      env=self.c.env,
      text=True,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 600
    workers = []
    while time.time() < deadline and proc.poll() is None:  # wait for a run in progress
      workers = _children(proc.pid)
      runs = os.path.join(workdir, "runs")
      busy = os.path.isdir(runs) and any(
        os.path.exists(os.path.join(runs, d, "eval_history.jsonl")) for d in os.listdir(runs)
      )
      if len(workers) >= 2 and busy:
        break
      time.sleep(0.2)
    if proc.poll() is not None:
      return "lost: the study finished before the signal (make it longer)"
    time.sleep(self.c.rng.uniform(0.0, 2.0))
    workers = _children(proc.pid)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=300)
    if proc.returncode != expect_status:
      return f"lost: the signalled study exited {proc.returncode}, expected {expect_status}"
    if sig == signal.SIGTERM and "rerun the same command to resume" not in out:
      return "lost: a stopped study did not say how to resume"
    limit = time.time() + 10
    while any(_alive(p) for p in workers) and time.time() < limit:
      time.sleep(0.2)
    survivors = [p for p in workers if _alive(p)]
    if survivors:
      for p in survivors:
        os.kill(p, signal.SIGKILL)
      return f"lost: {len(survivors)} worker(s) outlived the study by 10 s"
    again = self.run(workdir)
    if again.returncode != 0:
      return f"lost: the rerun failed: {again.stderr.strip().splitlines()[-1:]}"
    return EXACT if _results(workdir) == reference else "lost: results differ from a clean study"


def register(campaign) -> None:
  study = _Study(campaign)
  campaign.add(
    "study_parent_kill9",
    lambda c, i: study.interrupted("study_kill9", signal.SIGKILL, -signal.SIGKILL),
  )
  campaign.add("study_sigterm", lambda c, i: study.interrupted("study_sigterm", signal.SIGTERM, 1))
