"""The stopping rule and checkpoint selection, as pure functions of the validation history.

A history is the list of periodic validation evals of one run, in step order, each a dict with at
least `step`, `loss` and `sequence_accuracy` (the rows of `eval_history.jsonl`). Everything here
looks at validation numbers only; the test split is measured once, at the selected step.

- `decide`: "solved" when validation sequence accuracy is 1.0 at the last two evals; "plateau"
  when the best loss of the last `patience` evals is not at least `plateau_rel` (relative) below
  the best loss before them, and the last eval is at step >= `min_steps` (a run's initial
  plateau, e.g. loss = log(num_symbols) before the first rule is found, must not end it); else
  None (keep training). A run that gets neither ends at `num_steps` ("max_steps").
- `steps_to_100`: the first eval step at 1.0 that is confirmed at the next eval.
- `select`: the checkpoint a run reports: the `steps_to_100` step when there is one, else the
  eval with the lowest validation loss (the earliest on ties).
"""

from __future__ import annotations

from typing import Sequence

SOLVED = "solved"
PLATEAU = "plateau"
MAX_STEPS = "max_steps"
SIGTERM = "sigterm"
ENDED_BY = (SOLVED, PLATEAU, MAX_STEPS, SIGTERM)


def _solved(row: dict) -> bool:
  return row["sequence_accuracy"] == 1.0


def steps_to_100(history: Sequence[dict]) -> int | None:
  """The first eval step with sequence accuracy 1.0 whose next eval is also 1.0 (else None)."""
  for row, nxt in zip(history, history[1:]):
    if _solved(row) and _solved(nxt):
      return int(row["step"])
  return None


def plateaued(history: Sequence[dict], patience: int, plateau_rel: float) -> bool:
  """Whether the last `patience` evals failed to lower the best earlier loss by >= plateau_rel.

  An improvement of exactly `plateau_rel` counts as an improvement (not a plateau). Needs more
  than `patience` evals: with fewer there is nothing before the window to compare with.
  """
  if patience < 1:
    raise ValueError(f"config.train.patience={patience}: must be >= 1")
  if not 0.0 <= plateau_rel < 1.0:
    raise ValueError(f"config.train.plateau_rel={plateau_rel}: must be in [0, 1)")
  if len(history) <= patience:
    return False
  best_before = min(r["loss"] for r in history[:-patience])
  best_recent = min(r["loss"] for r in history[-patience:])
  return not best_recent <= best_before * (1.0 - plateau_rel)


def decide(
  history: Sequence[dict], patience: int, plateau_rel: float, min_steps: int = 0
) -> str | None:
  """ "solved", "plateau" or None (continue) for a run whose validation evals are `history`.

  "solved" may end a run at any step; "plateau" only once the last eval's step is >= min_steps.
  """
  if min_steps < 0:
    raise ValueError(f"config.train.min_steps={min_steps}: must be >= 0")
  if len(history) >= 2 and _solved(history[-1]) and _solved(history[-2]):
    return SOLVED
  if history and history[-1]["step"] >= min_steps and plateaued(history, patience, plateau_rel):
    return PLATEAU
  return None


def select(history: Sequence[dict]) -> int | None:
  """The step whose checkpoint the run reports: `steps_to_100`, else the lowest loss (earliest)."""
  if not history:
    return None
  confirmed = steps_to_100(history)
  if confirmed is not None:
    return confirmed
  return int(min(history, key=lambda r: (r["loss"], r["step"]))["step"])


def steps_to_keep(history: Sequence[dict]) -> set[int]:
  """Eval steps whose checkpoints must survive clean-up: the selected one, and the last eval if
  it is at 1.0 (the next eval may confirm it, which makes it the selected one)."""
  keep = set()
  chosen = select(history)
  if chosen is not None:
    keep.add(chosen)
  if history and _solved(history[-1]):
    keep.add(int(history[-1]["step"]))
  return keep
