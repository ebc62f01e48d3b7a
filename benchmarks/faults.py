"""Fault campaign: try to break a training workdir, and count how each attempt ends.

  python benchmarks/faults.py --tries=5                  # all cases (tiny config)
  python benchmarks/faults.py --tries=1 --cases=kill_mid_step,damaged_garbage

Every case must end in an *exact resume* (after the fault, rerunning the same command finishes
with parameters bit-identical to an uninterrupted run, the same summary numbers and one
eval_history row per eval step) or a *clear refusal* (a project error naming what is wrong, the
workdir's record and checkpoints untouched). "lost" counts anything else: a crash, a silent
resume onto the wrong weights, a changed record, a missing or duplicated history row.

Cases:
  kill_mid_step / kill_mid_save / kill_mid_eval   kill -9 of a train.py at a random moment after
                                                  a log line announcing that phase, then rerun
  sigterm                                         SIGTERM at a random moment (exit 143), rerun
  two_trainers                                    two train.py on one fresh workdir at once: one
                                                  must refuse at once, the other finish exactly
  damaged_*                                       the latest checkpoint damaged in one way: a
                                                  refusal, and following its advice (delete the
                                                  step) resumes exactly; a leftover temporary
                                                  save directory must be ignored (exact resume)
  provenance_*                                    resume / eval with a differing field: refused

A case module for faults owned elsewhere (e.g. a study runner's parent being killed) plugs in
with --extra_cases=module.name: the module's `register(campaign)` calls `campaign.add(name, fn)`
with `fn(campaign, try_index) -> "exact" | "refused" | "lost: <why>"`.
"""

from __future__ import annotations

import importlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

flags.DEFINE_integer("tries", 3, "Tries per random case.")
flags.DEFINE_list("cases", [], "Cases to run (default: all).")
flags.DEFINE_integer("seed", 0, "Seed of the kill moments.")
flags.DEFINE_string("scratch", "", "Scratch directory (default: a temporary one, removed).")
flags.DEFINE_list("extra_cases", [], "Modules whose register(campaign) adds cases.")
FLAGS = flags.FLAGS

# The campaign's run: the tiny config, long enough that kills land inside a phase.
OVERRIDES = {
  "train.num_steps": 24,
  "train.eval_every": 8,
  "train.checkpoint_every": 4,
  "train.log_every": 2,
  "train.keep_checkpoints": 2,
}
TINY = os.path.join(REPO, "configs", "tiny.py")

EXACT, REFUSED = "exact", "refused"


def _flags(overrides: dict) -> list[str]:
  return [f"--config.{k}={v}" for k, v in overrides.items()]


class Campaign:
  """Runs the cases; holds the reference (uninterrupted) run they are compared with."""

  def __init__(self, scratch: str, seed: int, in_process_reference: bool = False):
    self.scratch = scratch
    self.rng = random.Random(seed)
    self.cases: dict[str, callable] = {}
    self.env = dict(
      os.environ,
      JAX_PLATFORMS="cpu",
      TF_CPP_MIN_LOG_LEVEL="3",
      PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
      # Later trainers reuse compiled code: each rerun costs its start-up only.
      JAX_COMPILATION_CACHE_DIR=os.path.join(scratch, "jax_cache"),
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    # One CPU device per trainer: drop a fake device count, keep any other XLA flag (the
    # tests' compile flags change float rounding, and reruns are compared bit for bit with a
    # reference that may be trained in the calling process).
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    self.env["XLA_FLAGS"] = " ".join(flags)
    self._count = 0
    self.missed = {}  # case -> tries whose trainer finished before the signal arrived
    self.reference = self.fresh("reference")
    if in_process_reference:  # the same code path without a process start (tests)
      from ea_jax import train_lib

      train_lib.train_and_evaluate(_config(), self.reference)
    else:
      proc = self.train(self.reference)
      if proc.returncode != 0:
        raise RuntimeError(f"the reference run failed:\n{proc.stderr[-3000:]}")

  def add(self, name: str, fn) -> None:
    self.cases[name] = fn

  def fresh(self, name: str) -> str:
    self._count += 1
    return os.path.join(self.scratch, f"{self._count:03d}_{name}")

  def copy_reference(self, name: str) -> str:
    path = self.fresh(name)
    shutil.copytree(self.reference, path, ignore=shutil.ignore_patterns(".lock"))
    return path

  # -- trainers ----------------------------------------------------------------------------

  def command(self, workdir: str, overrides: dict | None = None) -> list[str]:
    return [
      sys.executable,
      os.path.join(REPO, "train.py"),
      f"--config={TINY}",
      f"--workdir={workdir}",
      *_flags({**OVERRIDES, **(overrides or {})}),
    ]

  def train(self, workdir: str, overrides: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
      self.command(workdir, overrides),
      cwd=REPO,
      env=self.env,
      capture_output=True,
      text=True,
      timeout=900,
    )

  def start(self, workdir: str) -> subprocess.Popen:
    return subprocess.Popen(
      self.command(workdir),
      cwd=REPO,
      env=self.env,
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
      text=True,
    )

  def interrupt(self, workdir: str, trigger: str, sig: int, max_delay_s: float) -> int | None:
    """Starts a trainer, waits for a stderr line containing `trigger`, sends `sig` after a
    random delay; returns its exit status (None if it finished before the signal)."""
    proc = self.start(workdir)
    for line in proc.stderr:
      if trigger in line:
        time.sleep(self.rng.uniform(0.0, max_delay_s))
        if proc.poll() is None:
          proc.send_signal(sig)
        break
    proc.stderr.read()
    return proc.wait(timeout=900)

  # -- verdicts ----------------------------------------------------------------------------

  def compare(self, workdir: str) -> str:
    """ "exact" if `workdir` finished like the reference, else "lost: <what differs>"."""
    import numpy as np

    from ea_jax import files

    ref = files.read_json(os.path.join(self.reference, "train_summary.json"))
    got = files.read_json(os.path.join(workdir, "train_summary.json"))
    if got is None:
      return "lost: no train_summary.json"
    keys = (
      "step",
      "ended_by",
      "selected_step",
      "validation_loss",
      "test_loss",
      "test_sequence_accuracy",
      "test_token_accuracy",
    )
    bad = [k for k in keys if got.get(k) != ref.get(k)]
    if bad:
      return f"lost: summary differs in {bad}"
    rows = lambda d: files.read_jsonl(os.path.join(d, "eval_history.jsonl"))
    if rows(workdir) != rows(self.reference):
      return "lost: eval_history.jsonl differs (missing or duplicated rows)"
    a, b = self.params(self.reference), self.params(workdir)
    if a.keys() != b.keys() or any(not np.array_equal(a[k], b[k]) for k in a):
      return "lost: final parameters differ"
    return EXACT

  def params(self, workdir: str) -> dict:
    import jax
    import numpy as np
    from flax import traverse_util

    from ea_jax import checkpointing, evaluate, train_lib

    config, vocab, max_len = evaluate.training_config(None, workdir)
    setup = train_lib.get_setup(config, vocab_size=vocab, max_len=max_len)
    with jax.set_mesh(setup.mesh):
      ckpts = checkpointing.Checkpoints(os.path.join(workdir, "checkpoints"), keep=1000)
      try:
        state = ckpts.restore(ckpts.latest_step(), setup.abstract_state())
      finally:
        ckpts.close()
    flat = traverse_util.flatten_dict(jax.device_get(state.params), sep="/")
    return {k: np.asarray(v) for k, v in flat.items()}


def _snapshot(workdir: str) -> dict:
  """The files a refusal must leave alone: the record, the history, the checkpoint steps."""
  read = lambda name: (
    open(os.path.join(workdir, name)).read()
    if os.path.isfile(os.path.join(workdir, name))
    else None
  )
  ckpt = os.path.join(workdir, "checkpoints")
  return {
    "config": read("train_config.json"),
    "history": read("eval_history.jsonl"),
    "summary": read("train_summary.json"),
    "steps": sorted(os.listdir(ckpt)) if os.path.isdir(ckpt) else [],
  }


# ------------------------------------------------------------------------------------------
# Cases
# ------------------------------------------------------------------------------------------


def _kill_case(name: str, trigger: str, sig: int, max_delay_s: float, expect_status: int):
  def case(c: Campaign, i: int) -> str:
    del i
    workdir = c.fresh(name)
    status = c.interrupt(workdir, trigger, sig, max_delay_s)
    if status == 0:
      c.missed[name] = c.missed.get(name, 0) + 1
    elif status != expect_status:
      return f"lost: interrupted trainer exited {status}"
    proc = c.train(workdir)
    if proc.returncode != 0:
      return f"lost: the rerun failed: {proc.stderr.strip().splitlines()[-1:]}"
    return c.compare(workdir)

  return case


def two_trainers(c: Campaign, i: int) -> str:
  del i
  workdir = c.fresh("two")
  procs = [c.start(workdir) for _ in range(2)]
  errs = [p.communicate(timeout=900)[1] for p in procs]
  codes = sorted(p.returncode for p in procs)
  if codes != [0, 1]:
    return f"lost: exit statuses {codes} (one must finish, one refuse)"
  refused = errs[[p.returncode for p in procs].index(1)]
  if "in use by another trainer" not in refused:
    return "lost: the second trainer failed without naming the lock"
  verdict = c.compare(workdir)
  return REFUSED if verdict == EXACT else verdict


def _latest_step_dir(workdir: str) -> str:
  ckpt = os.path.join(workdir, "checkpoints")
  return os.path.join(ckpt, str(max(int(s) for s in os.listdir(ckpt) if s.isdigit())))


def _damage_files(root: str, pick, write) -> None:
  for dirpath, _, names in os.walk(root):
    for name in names:
      path = os.path.join(dirpath, name)
      if pick(path):
        write(path)


def _garbage(path):
  with open(path, "wb") as f:
    f.write(b"garbage")


def _truncate(path):
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.truncate(size // 2)


DAMAGE = {
  # every file of the saved state overwritten
  "garbage": lambda step: _damage_files(os.path.join(step, "default"), lambda p: True, _garbage),
  # array data files cut in half
  "truncated": lambda step: _damage_files(
    os.path.join(step, "default"), lambda p: f"{os.sep}d{os.sep}" in p, _truncate
  ),
  # the state's metadata removed
  "no_metadata": lambda step: os.remove(os.path.join(step, "default", "_METADATA")),
  # the state directory gone, the step directory left
  "empty_step": lambda step: shutil.rmtree(os.path.join(step, "default")),
}


def _damage_case(kind: str):
  def case(c: Campaign, i: int) -> str:
    del i
    from ea_jax import checkpointing, train_lib

    workdir = c.copy_reference(f"damaged_{kind}")
    step_dir = _latest_step_dir(workdir)
    DAMAGE[kind](step_dir)
    # Remove the summary so the run is not "already done": the resume must read the damage.
    os.remove(os.path.join(workdir, "train_summary.json"))
    before = _snapshot(workdir)
    try:
      train_lib.train_and_evaluate(_config(), workdir)
      # Restored without complaint: acceptable only if the damage did not matter.
      verdict = c.compare(workdir)
      return verdict if verdict != EXACT else EXACT
    except checkpointing.CheckpointError as e:
      if step_dir not in str(e) or "delete it" not in str(e) and "delete the" not in str(e):
        return f"lost: unclear refusal: {e}"
    if _snapshot(workdir) != before:
      return "lost: the refusal changed the workdir"
    shutil.rmtree(step_dir)  # the advice: fall back to an earlier step
    train_lib.train_and_evaluate(_config(), workdir)
    verdict = c.compare(workdir)
    return REFUSED if verdict == EXACT else verdict

  return case


def leftover_tmp(c: Campaign, i: int) -> str:
  """A half-written save (orbax's temporary directory) beside the steps is ignored."""
  del i
  from ea_jax import train_lib

  workdir = c.copy_reference("leftover_tmp")
  step_dir = _latest_step_dir(workdir)
  os.remove(os.path.join(workdir, "train_summary.json"))
  shutil.copytree(step_dir, step_dir + "0.orbax-checkpoint-tmp-1234")
  train_lib.train_and_evaluate(_config(), workdir)
  return c.compare(workdir)


PROVENANCE = {
  "attention": {"model.attention": "dpa"},
  "task": {"task.num_rules": 3},
  "optimizer": {"train.learning_rate": 3e-3},
  "seed": {"train.seed": 7},
}


def _provenance_case(kind: str):
  def case(c: Campaign, i: int) -> str:
    del i
    from ea_jax import provenance, train_lib

    workdir = c.copy_reference(f"provenance_{kind}")
    before = _snapshot(workdir)
    try:
      train_lib.train_and_evaluate(_config(PROVENANCE[kind]), workdir)
      return "lost: a differing experiment resumed"
    except provenance.ProvenanceError as e:
      if not all(k in str(e) for k in PROVENANCE[kind]):
        return f"lost: the refusal does not name {list(PROVENANCE[kind])}"
    return REFUSED if _snapshot(workdir) == before else "lost: the refusal changed the workdir"

  return case


def provenance_eval(c: Campaign, i: int) -> str:
  del i
  from ea_jax import evaluate, provenance

  workdir = c.copy_reference("provenance_eval")
  before = _snapshot(workdir)
  try:
    evaluate.evaluate(_config({"model.embed_dim": 32}), workdir)
    return "lost: evaluated with a different model"
  except provenance.ProvenanceError as e:
    if "model.embed_dim" not in str(e):
      return "lost: the refusal does not name model.embed_dim"
  return REFUSED if _snapshot(workdir) == before else "lost: the refusal changed the workdir"


def _config(overrides: dict | None = None):
  """configs/tiny.py with the campaign's overrides (and `overrides`) applied."""
  from configs import tiny

  config = tiny.get_config()
  for key, value in {**OVERRIDES, **(overrides or {})}.items():
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


RANDOM_CASES = ("kill_mid_step", "kill_mid_save", "kill_mid_eval", "sigterm")


def default_cases(c: Campaign) -> None:
  # Trigger lines: training has started / a save was announced / a log line right before an
  # eval step (log_every divides eval_every). Delays span a few steps of the tiny model.
  c.add("kill_mid_step", _kill_case("kill_mid_step", "model:", signal.SIGKILL, 0.5, -9))
  c.add(
    "kill_mid_save",
    _kill_case("kill_mid_save", "checkpoint: saving step", signal.SIGKILL, 0.05, -9),
  )
  c.add(
    "kill_mid_eval",
    _kill_case("kill_mid_eval", f"step {OVERRIDES['train.eval_every']}/", signal.SIGKILL, 0.05, -9),
  )
  c.add("sigterm", _kill_case("sigterm", "model:", signal.SIGTERM, 0.5, 143))
  c.add("two_trainers", two_trainers)
  for kind in DAMAGE:
    c.add(f"damaged_{kind}", _damage_case(kind))
  c.add("damaged_leftover_tmp", leftover_tmp)
  for kind in PROVENANCE:
    c.add(f"provenance_{kind}", _provenance_case(kind))
  c.add("provenance_eval", provenance_eval)


def run(campaign: Campaign, names, tries: int) -> list[dict]:
  rows = []
  for name in names:
    n = tries if name in RANDOM_CASES else 1
    outcomes = [campaign.cases[name](campaign, i) for i in range(n)]
    lost = [o for o in outcomes if o not in (EXACT, REFUSED)]
    rows.append(
      {
        "case": name,
        "tries": n,
        "exact": outcomes.count(EXACT),
        "refused": outcomes.count(REFUSED),
        "lost": len(lost),
        "missed": campaign.missed.get(name, 0),
        "why": "; ".join(sorted(set(lost))),
      }
    )
  return rows


def table(rows: list[dict]) -> str:
  out = [
    "| case | tries | exact resumes | clear refusals | anything lost |",
    "|---|---:|---:|---:|---|",
  ]
  for r in rows:
    lost = str(r["lost"]) + (f" ({r['why']})" if r["why"] else "")
    exact = str(r["exact"]) + (
      f" ({r['missed']} finished before the signal)" if r.get("missed") else ""
    )
    out.append(f"| {r['case']} | {r['tries']} | {exact} | {r['refused']} | {lost} |")
  return "\n".join(out)


def main(argv):
  del argv
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from absl import logging

  logging.set_verbosity(logging.WARNING)  # the in-process cases' own INFO lines
  scratch = FLAGS.scratch or tempfile.mkdtemp(prefix="ea_faults_")
  os.makedirs(scratch, exist_ok=True)
  t0 = time.time()
  try:
    campaign = Campaign(scratch, FLAGS.seed)
    default_cases(campaign)
    for module in FLAGS.extra_cases:
      importlib.import_module(module).register(campaign)
    names = FLAGS.cases or list(campaign.cases)
    unknown = [n for n in names if n not in campaign.cases]
    if unknown:
      raise app.UsageError(f"--cases: unknown {unknown}; known: {sorted(campaign.cases)}")
    rows = run(campaign, names, FLAGS.tries)
  finally:
    if not FLAGS.scratch:
      shutil.rmtree(scratch, ignore_errors=True)
  print(table(rows))
  print(f"({time.time() - t0:.0f} s)")
  print(json.dumps(rows))
  sys.exit(1 if any(r["lost"] for r in rows) else 0)


if __name__ == "__main__":
  app.run(main)
