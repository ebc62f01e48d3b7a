"""Result rows of the study's runs, their CSV files, and the choice of tuned settings.

A run's `result.json` holds its identity (`plan.Run.describe`), a status ("ok" or "diverged")
and the training summary (`train_lib.train_and_evaluate`): test-split metrics at the checkpoint
selected on validation, the validation metrics there, `ended_by` and `steps_to_100`.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

from ea_jax import files, lr_grid
from ea_jax.lr_grid import lr_key
from ea_jax.study import plan

RESULTS_CSV = "results.csv"
TUNING_CSV = "tuning.csv"
TIMING_FILE = "study_timing.json"  # wall time of every invocation (runner.InvocationLog)
ENDINGS = ("solved", "plateau", "max_steps")

# The DESIGN contract columns first (accuracies and loss: test split at the selected
# checkpoint), then what the study adds.
CONTRACT_COLUMNS = (
  "task",
  "level",
  "complexity",
  "attention",
  "seed",
  "token_accuracy",
  "sequence_accuracy",
  "final_loss",
  "steps",
  "wall_seconds",
)
METRIC_COLUMNS = (
  "test_loss",
  "test_token_accuracy",
  "test_sequence_accuracy",
  "validation_loss",
  "validation_token_accuracy",
  "validation_sequence_accuracy",
)
RESULT_COLUMNS = (
  CONTRACT_COLUMNS
  + ("kernel", "width", "ended_by")
  + METRIC_COLUMNS
  + (
    "selected_step",
    "steps_to_100",
    "variant",
    "pos_encoding",
    "learning_rate",
    "num_params",
    "label",
    "status",
    "run_id",
  )
)
TUNING_COLUMNS = (
  "variant",
  "width",
  "pos_encoding",
  "learning_rate",
  "validation_loss",
  "validation_sequence_accuracy",
  "validation_token_accuracy",
  "ended_by",
  "steps",
  "selected_step",
  "chosen",
  "interior",
  "wall_seconds",
  "status",
  "run_id",
)


def _fmt(x) -> str:
  if x is None:
    return ""
  if isinstance(x, float):
    return "" if math.isnan(x) else repr(x)
  return str(x)


def _summary_fields(result: dict) -> dict:
  """The metrics of a finished run; a diverged run has none (its accuracies count as 0)."""
  s = result.get("summary") or {}
  ok = result["status"] == "ok"
  get = (lambda k: s.get(k)) if ok else (lambda k: None)
  out = {k: get(k) for k in METRIC_COLUMNS}
  out.update(
    ended_by=get("ended_by") or ("diverged" if not ok else ""),
    steps=get("step"),
    selected_step=get("selected_step"),
    steps_to_100=get("steps_to_100"),
    num_params=get("num_params"),
  )
  return out


def result_rows(result: dict) -> list[dict]:
  """CSV rows (strings) of one study run: one per (ladder, level) that its task is."""
  m = _summary_fields(result)
  fields = plan.parse_variant(result["variant"])
  common = {
    **m,
    "complexity": float(result["complexity"]),
    "attention": fields["attention"],
    "seed": int(result["seed"]),
    "token_accuracy": m["test_token_accuracy"],
    "sequence_accuracy": m["test_sequence_accuracy"],
    "final_loss": m["test_loss"],
    "wall_seconds": round(float(result["wall_seconds"]), 1),
    "kernel": plan.kernel_name(result["variant"]),
    "variant": result["variant"],
    "width": int(result["width"]),
    "pos_encoding": result["pos_encoding"],
    "learning_rate": float(result["learning_rate"]),
    "label": result["label"],
    "status": result["status"],
    "run_id": result["run_id"],
  }
  return [
    {c: _fmt({**common, "task": ladder, "level": int(level)}[c]) for c in RESULT_COLUMNS}
    for ladder, level in result["levels"]
  ]


def tuning_row(result: dict) -> dict:
  """The tuning.csv row (strings) of one tuning run; `chosen`/`interior` are filled later."""
  m = _summary_fields(result)
  row = {
    **m,
    "variant": result["variant"],
    "width": int(result["width"]),
    "pos_encoding": result["pos_encoding"],
    "learning_rate": float(result["learning_rate"]),
    "wall_seconds": round(float(result["wall_seconds"]), 1),
    "status": result["status"],
    "run_id": result["run_id"],
    "chosen": "",
    "interior": "",
  }
  return {c: _fmt(row[c]) for c in TUNING_COLUMNS}


def row_order(variants: Sequence[str]):
  """Sort key of result rows: task, level, variant (config order), width, seed."""
  rank = {v: i for i, v in enumerate(variants)}
  return lambda r: (
    r["task"],
    int(r["level"]),
    rank.get(r["variant"], len(rank)),
    r["variant"],
    int(r["width"]),
    int(r["seed"]),
  )


def rows_of(results: Iterable[dict], variants: Sequence[str]) -> list[dict]:
  return sorted((row for r in results for row in result_rows(r)), key=row_order(variants))


def write_results(path: str, rows: Sequence[dict]) -> None:
  files.write_csv(path, rows, RESULT_COLUMNS)


def read_results(path: str) -> list[dict]:
  return files.read_csv(path, RESULT_COLUMNS)


def write_tuning(path: str, rows: Sequence[dict]) -> None:
  files.write_csv(path, rows, TUNING_COLUMNS)


def read_tuning(path: str) -> list[dict]:
  return files.read_csv(path, TUNING_COLUMNS)


def read_invocations(workdir: str) -> list[dict]:
  """The study's invocations on `workdir` (started, seconds, runs_executed, workers, finished)."""
  import os

  return list(
    (files.read_json(os.path.join(workdir, TIMING_FILE), {}) or {}).get("invocations", [])
  )


def number(x, default=math.nan) -> float:
  """A CSV cell as a float ("" -> default)."""
  return default if x is None or x == "" else float(x)


# ------------------------------------------------------------------------------------------
# Tuning: position encoding per variant, learning rate per (variant, width), bracketed
# ------------------------------------------------------------------------------------------


def _loss(row: dict | None) -> float:
  """Tuning objective: validation loss at the selected checkpoint (diverged/missing = inf)."""
  if row is None or row.get("status") != "ok":
    return math.inf
  v = number(row.get("validation_loss"), math.inf)
  return v if math.isfinite(v) else math.inf


def _best(rows: Sequence[dict]) -> dict:
  """Lowest validation loss; ties -> the smaller learning rate, then the earlier position enc."""
  return min(rows, key=lambda r: (_loss(r), float(r["learning_rate"])))


def tuning_plan(config, done: dict[tuple, dict]) -> tuple[list[tuple], dict[tuple, dict]]:
  """(the tuning runs still needed, the choices made so far).

  `done` maps (variant, width, lr_key(lr), pos) -> tuning row. A needed run is
  (variant, width, lr, pos). A choice is {(variant, width): {"learning_rate", "pos_encoding",
  "interior", "grid": (lrs tried, increasing), "extensions"}}; a (variant, width) appears once
  every run it needs is done. Applying this function until it needs nothing is the whole
  tuning procedure (see `ea_jax.study.plan`).
  """
  t = config.tune
  needed, choices = [], {}
  grid0 = [lr_key(lr) for lr in t.lr_grid]
  for variant in config.variants:
    pos_cells = [(lr, pos) for pos in t.pos_encodings for lr in grid0]
    missing = [
      (variant, t.pos_width, lr, pos)
      for lr, pos in pos_cells
      if (variant, t.pos_width, lr, pos) not in done
    ]
    if missing:
      needed += missing
      continue
    pos_best = _best([done[(variant, t.pos_width, lr, pos)] for lr, pos in pos_cells])
    pos = pos_best["pos_encoding"]
    for width in config.widths:
      lrs, extensions = list(grid0), 0
      while True:
        missing = [(variant, width, lr, pos) for lr in lrs if (variant, width, lr, pos) not in done]
        if missing:
          needed += missing
          break
        best = _best([done[(variant, width, lr, pos)] for lr in lrs])
        best_lr = lr_key(float(best["learning_rate"]))
        grown, interior = lr_grid.bracket(lrs, best_lr, extensions, t.max_extensions)
        if grown is not None:
          lrs, extensions = grown, extensions + 1
          continue
        choices[(variant, width)] = {
          "learning_rate": best_lr,
          "pos_encoding": pos,
          "interior": interior,
          "grid": tuple(lrs),
          "extensions": extensions,
        }
        break
  return needed, choices


def mark_choices(rows: Sequence[dict], choices: dict[tuple, dict]) -> list[dict]:
  """tuning rows with `chosen` / `interior` filled from `choices`."""
  out = []
  for r in rows:
    c = choices.get((r["variant"], int(r["width"])))
    pick = (
      c is not None
      and r["pos_encoding"] == c["pos_encoding"]
      and lr_key(float(r["learning_rate"])) == c["learning_rate"]
    )
    out.append({**r, "chosen": str(pick), "interior": str(c["interior"]) if pick else ""})
  return out
