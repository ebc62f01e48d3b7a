"""Learning-rate grids that bracket their optimum: grow past an edge choice, by a factor of 3.

Shared by the ladder study (`ea_jax.study.results.tuning_plan`) and the language-model comparison
(`ea_jax.lm_study`): after the runs of a grid are done and the best learning rate is known,
`bracket` says whether the choice is interior and, if it is not, the grid to try next.
"""

from __future__ import annotations

from typing import Sequence

FACTOR = 3.0  # one extension step: x3 beyond the top or /3 below the bottom


def lr_key(lr: float) -> float:
  """Learning rates compared at 6 significant digits (3e-3 / 3 == 1e-3)."""
  return float(f"{float(lr):.6g}")


def bracket(
  lrs: Sequence[float], best_lr: float, extensions: int, max_extensions: int
) -> tuple[list[float] | None, bool]:
  """(the next grid, or None when tuning is done; whether `best_lr` is interior).

  Args:
    lrs: the grid tried so far, increasing (lr_key values).
    best_lr: the grid's best learning rate (a member of `lrs`).
    extensions: extension steps taken so far.
    max_extensions: the most extension steps allowed.

  Interior means strictly inside a grid of at least 3 values. A best value at an edge grows the
  grid by one value beyond that edge while `extensions < max_extensions`; a one-value grid has
  no direction and is never extended.
  """
  lrs = [lr_key(x) for x in lrs]
  if list(lrs) != sorted(set(lrs)):
    raise ValueError(f"learning-rate grid {lrs}: must be strictly increasing")
  best = lr_key(best_lr)
  if best not in lrs:
    raise ValueError(f"best learning rate {best_lr} is not on the grid {lrs}")
  at_low, at_high = best == lrs[0], best == lrs[-1]
  interior = len(lrs) >= 3 and not (at_low or at_high)
  if interior or extensions >= max_extensions or len(lrs) < 2:
    return None, interior
  if at_low:
    return [lr_key(lrs[0] / FACTOR)] + lrs, False
  return lrs + [lr_key(lrs[-1] * FACTOR)], False
