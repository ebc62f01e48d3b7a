"""Named complexity ladders: ordered lists of task configs, easiest first.

Every level is an `ml_collections.ConfigDict` with the family `name`, its dials, a numeric
`complexity` (the x-axis of ladder plots; defined per family, see each family's module docstring)
and a human-readable `label`. Sequences are 32-64 tokens long so that a level trains in minutes
on a CPU. The lowest recurrence levels are meant to be learnt by a 2-layer, width-64 model in a
few hundred steps; the top levels are hard at that size.

Ladders:
  recurrence        N symbols and R hidden rules raised together (the paper's axis);
                    complexity = log2(N * R).
  recurrence_rules  N = 8 fixed, R raised (the multi-task axis); complexity = log2(N * R).
"""
from __future__ import annotations

import math

import ml_collections

# Shared recurrence geometry: 48 targets, rules = 2 delays out of 1..6 (15 possible rules).
RECURRENCE_SEQ_LEN = 48
RECURRENCE_MAX_DELAY = 6
RECURRENCE_NUM_DELAYS = 2


def _level(name: str, complexity: float, label: str, **dials) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(name=name, **dials, complexity=float(complexity),
                                        label=label))


def _recurrence_level(num_symbols: int, num_rules: int) -> ml_collections.ConfigDict:
  return _level("recurrence", math.log2(num_symbols * num_rules),
                f"N={num_symbols} R={num_rules}",
                num_symbols=num_symbols, num_rules=num_rules,
                max_delay=RECURRENCE_MAX_DELAY, num_delays=RECURRENCE_NUM_DELAYS,
                seq_len=RECURRENCE_SEQ_LEN, rule_seed=0)


def recurrence_ladder():
  return [_recurrence_level(n, r) for n, r in
          ((5, 1), (6, 2), (8, 3), (10, 4), (12, 6), (16, 8), (20, 12))]


def recurrence_rules_ladder():
  return [_recurrence_level(8, r) for r in (1, 2, 3, 4, 6, 8, 12)]


LADDERS = {
    "recurrence": recurrence_ladder,
    "recurrence_rules": recurrence_rules_ladder,
}


def ladder_names() -> list[str]:
  return list(LADDERS)


def ladder(name: str) -> list[ml_collections.ConfigDict]:
  """The levels of ladder `name`, easiest first (fresh ConfigDicts: callers may modify them)."""
  if name not in LADDERS:
    raise ValueError(f"ladder name={name!r} is not known; allowed: {ladder_names()}")
  return LADDERS[name]()


# The task of configs/default.py: a mid-ladder recurrence level (N=8 symbols, R=3 hidden rules).
DEFAULT_LADDER, DEFAULT_LEVEL = "recurrence", 2


def default_task() -> ml_collections.ConfigDict:
  return ladder(DEFAULT_LADDER)[DEFAULT_LEVEL]
