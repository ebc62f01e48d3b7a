"""Statistics over seeds: means, bootstrap intervals, paired differences and verdicts.

Seeds are paired across variants: seed s fixes the training data order and the parameter-init
stream of every variant (`data.stream_key(seed, ...)`), so EA and DPA runs of one seed see the
same batches. A paired difference is taken seed by seed, then summarised.

The bootstrap here is exact: with n values there are C(2n-1, n) distinct resamples (multisets),
each with multinomial probability n! / (prod c_i!) / n^n, so the percentile interval is computed
from the whole bootstrap distribution instead of random draws (n <= 12 here; seeds are few).
scipy.stats.bootstrap samples randomly and is not a dependency of the project, hence our own.
"""

from __future__ import annotations

import itertools
import math
from typing import Sequence

import numpy as np

MAX_EXACT = 12
VERDICTS = ("EA ahead", "tie", "DPA ahead")


def _compositions(n: int, parts: int):
  """Every tuple of `parts` non-negative ints summing to n (stars and bars)."""
  for bars in itertools.combinations(range(n + parts - 1), parts - 1):
    prev, counts = -1, []
    for b in bars + (n + parts - 1,):
      counts.append(b - prev - 1)
      prev = b
    yield counts


def bootstrap_distribution(values: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
  """(sorted resample means, their probabilities) of the exact bootstrap of the mean."""
  x = np.asarray(values, np.float64)
  n = x.size
  if n == 0:
    raise ValueError("bootstrap of no values")
  if n > MAX_EXACT:
    raise ValueError(f"exact bootstrap supports at most {MAX_EXACT} values, got {n}")
  log_nfact = math.lgamma(n + 1)
  means, probs = [], []
  for counts in _compositions(n, n):
    c = np.asarray(counts)
    means.append(float(c @ x) / n)
    probs.append(math.exp(log_nfact - sum(math.lgamma(k + 1) for k in counts) - n * math.log(n)))
  order = np.argsort(means, kind="stable")
  return np.asarray(means)[order], np.asarray(probs)[order]


def bootstrap_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
  """Percentile interval of the bootstrap distribution of the mean.

  lower = the smallest resample mean whose cumulative probability reaches (1 - level) / 2,
  upper = the smallest whose cumulative probability reaches (1 + level) / 2.
  """
  means, probs = bootstrap_distribution(values)
  cdf = np.cumsum(probs)
  tol = 1e-12
  lo = means[np.searchsorted(cdf, (1 - level) / 2 - tol)]
  hi = means[min(np.searchsorted(cdf, (1 + level) / 2 - tol), means.size - 1)]
  return float(lo), float(hi)


def summarize(values: Sequence[float], level: float = 0.95) -> dict:
  """mean, min, max and the bootstrap interval of the mean over seeds."""
  x = np.asarray(values, np.float64)
  lo, hi = bootstrap_interval(x, level)
  return {
    "n": int(x.size),
    "mean": float(x.mean()),
    "min": float(x.min()),
    "max": float(x.max()),
    "lo": lo,
    "hi": hi,
  }


def paired_difference(a_by_seed: dict, b_by_seed: dict, level: float = 0.95) -> dict | None:
  """Summary of a - b over the seeds both have (None when they share none)."""
  seeds = sorted(set(a_by_seed) & set(b_by_seed))
  if not seeds:
    return None
  d = [a_by_seed[s] - b_by_seed[s] for s in seeds]
  return {**summarize(d, level), "seeds": seeds}


def verdict(diff: dict | None, margin: float = 0.0) -> str:
  """ "EA ahead" when the interval of EA - DPA lies above `margin`, "DPA ahead" when below
  -margin, else "tie" (also when there is no paired difference)."""
  if diff is None:
    return "tie"
  if diff["lo"] > margin:
    return VERDICTS[0]
  if diff["hi"] < -margin:
    return VERDICTS[2]
  return VERDICTS[1]
