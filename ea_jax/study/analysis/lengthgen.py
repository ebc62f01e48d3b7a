"""Length generalisation: evaluate a trained run at other sequence lengths than it was trained on.

`eval_at_lengths(workdir, lengths, scratch=..., split="test")` copies the run's training config
and checkpoints to `scratch/<run name>/` (evaluate writes eval.json into the directory it
evaluates; the source stays untouched) and calls `ea_jax.evaluate.evaluate` once per length with
the run's own training config, `task.seq_len` and `eval.split` overridden: the eval seed and
number of examples are those of the validation during training, so `split="validation"` at the
training length reproduces the run's final validation numbers. `summarize` reduces the rows to
mean and min over seeds.

A model with learned positions has a table of exactly its training length, so it cannot be
evaluated beyond it: those lengths give a row with NaN metrics and `skipped` saying why
(`beyond_position_table`), so a study mixing position encodings still reports every run.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Iterable, Sequence

import ml_collections
import numpy as np

from ea_jax import evaluate, train_lib

METRICS = (
  "token_accuracy",
  "sequence_accuracy",
  "rollout_token_accuracy",
  "rollout_sequence_accuracy",
)


def copy_run(workdir: str, scratch: str) -> str:
  """Copies train_config.json, result.json (if any) and checkpoints/ of `workdir` to
  `scratch/<basename>` (replacing an earlier copy); returns the copy's path."""
  workdir = os.path.abspath(workdir)
  if not os.path.isfile(os.path.join(workdir, "train_config.json")):
    raise FileNotFoundError(f"{workdir}/train_config.json not found: not a training workdir")
  dest = os.path.join(os.path.abspath(scratch), os.path.basename(workdir.rstrip("/")))
  if os.path.commonpath([dest, workdir]) == workdir:
    raise ValueError(f"scratch={scratch!r} lies inside the run {workdir}: choose another folder")
  if os.path.isdir(dest):
    shutil.rmtree(dest)
  os.makedirs(dest)
  for name in ("train_config.json", "result.json"):
    if os.path.isfile(os.path.join(workdir, name)):
      shutil.copy2(os.path.join(workdir, name), dest)
  shutil.copytree(os.path.join(workdir, "checkpoints"), os.path.join(dest, "checkpoints"))
  return dest


def eval_config(workdir: str, seq_len: int, split: str = "test"):
  """The run's training config (train_config.json) with task.seq_len = `seq_len` and
  eval.split = `split` (one of ea_jax.data.EVAL_SPLITS, checked by evaluate)."""
  config = ml_collections.ConfigDict(train_lib.read_train_config(workdir)["config"])
  if "seq_len" not in config.task:
    raise ValueError(f"{workdir}: task {config.task.get('name')!r} has no seq_len to change")
  if not (isinstance(seq_len, int) and seq_len >= 2):
    raise ValueError(f"seq_len={seq_len!r}: must be an integer >= 2")
  config.task.seq_len = seq_len
  config.eval.split = split
  return config


def split_position_accuracy(per_position, boundary: int) -> tuple[float, float]:
  """(mean over positions < boundary, mean over positions >= boundary) of a per-position
  accuracy list (None = nothing scored there, left out; nan for an empty side). Positions are
  weighted equally, not by how many targets each scores."""
  acc = np.asarray([np.nan if a is None else a for a in per_position], np.float64)
  if not (isinstance(boundary, int) and 0 <= boundary <= len(acc)):
    raise ValueError(f"boundary={boundary!r}: must be an integer in [0, {len(acc)}]")

  def mean(part):
    part = part[~np.isnan(part)]
    return float(part.mean()) if part.size else float("nan")

  return mean(acc[:boundary]), mean(acc[boundary:])


def beyond_position_table(config: dict, seq_len: int) -> str:
  """Why `seq_len` cannot be evaluated for a run whose training config is `config` ("" = it can):
  learned positions have no embedding past the training length."""
  train_len = int(config["task"]["seq_len"])
  if config["model"].get("pos_encoding") == "learned" and seq_len > train_len:
    return f"learned positions end at the training length {train_len}"
  return ""


def eval_at_lengths(
  workdir: str, lengths: Sequence[int], *, scratch: str, split: str = "test"
) -> list[dict]:
  """One row per length: {seq_len, split, step, loss, token/sequence accuracy, rollout
  accuracies, num_examples, token_accuracy_seen / token_accuracy_beyond (split_position_accuracy
  at the training length)} of the checkpoint `workdir` selected on validation (else the latest)
  on `split` (evaluated on a copy under `scratch`)."""
  from ea_jax.study.analysis import loading

  step = loading.selected_step(workdir)
  copy = copy_run(workdir, scratch)
  config = train_lib.read_train_config(copy)["config"]
  train_len = int(config["task"]["seq_len"])
  rows = []
  for seq_len in lengths:
    skipped = beyond_position_table(config, int(seq_len))
    if skipped:
      nan = float("nan")
      rows.append(
        {
          "seq_len": int(seq_len),
          "split": split,
          "step": step,
          "loss": nan,
          "num_examples": 0,
          **{m: nan for m in METRICS},
          "token_accuracy_seen": nan,
          "token_accuracy_beyond": nan,
          "skipped": skipped,
        }
      )
      continue
    result = evaluate.evaluate(eval_config(copy, int(seq_len), split), copy, step=step)
    seen, beyond = split_position_accuracy(
      result["per_position_accuracy"], min(train_len, int(seq_len))
    )
    rows.append(
      {
        "seq_len": int(seq_len),
        "split": split,
        "step": result["step"],
        "loss": result["loss"],
        "num_examples": result["num_examples"],
        **{m: result.get(m, float("nan")) for m in METRICS},
        "token_accuracy_seen": seen,
        "token_accuracy_beyond": beyond,
        "skipped": "",
      }
    )
  return rows


def summarize(
  rows: Iterable[dict], keys: Sequence[str], metrics: Sequence[str] = METRICS
) -> list[dict]:
  """Groups `rows` by `keys` (in first-seen order) and gives, per metric, the mean and the min
  over the group (`<metric>_mean`, `<metric>_min`) and the group size `n`."""
  groups: dict[tuple, list[dict]] = {}
  for row in rows:
    missing = [k for k in tuple(keys) + tuple(metrics) if k not in row]
    if missing:
      raise ValueError(f"row {json.dumps(row, default=str)[:200]} lacks {missing}")
    groups.setdefault(tuple(row[k] for k in keys), []).append(row)
  out = []
  for key, members in groups.items():
    entry = dict(zip(keys, key))
    entry["n"] = len(members)
    for m in metrics:
      values = np.asarray([r[m] for r in members], np.float64)
      entry[f"{m}_mean"] = float(values.mean())
      entry[f"{m}_min"] = float(values.min())
    out.append(entry)
  return out
