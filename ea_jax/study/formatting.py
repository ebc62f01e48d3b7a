"""Number formatting shared by the study's Markdown tables (summary.md, docs/analysis/README.md)."""

from __future__ import annotations

import math
from typing import Iterable

MISSING = "—"  # shown for a missing (None) or undefined (NaN) number


def _missing(x) -> bool:
  return x is None or (isinstance(x, float) and math.isnan(x))


def fmt(x, digits: int = 3) -> str:
  """`x` with `digits` decimals; MISSING for None or NaN."""
  return MISSING if _missing(x) else f"{x:.{digits}f}"


def spread(values: Iterable, digits: int = 2) -> str:
  """ "mean [min, max]" of the present values (None and NaN left out); MISSING if none is."""
  vals = [float(v) for v in values if not _missing(v)]
  if not vals:
    return MISSING
  return (
    f"{fmt(sum(vals) / len(vals), digits)} [{fmt(min(vals), digits)}, {fmt(max(vals), digits)}]"
  )
