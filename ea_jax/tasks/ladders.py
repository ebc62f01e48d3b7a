"""Named complexity ladders: ordered lists of task configs, easiest first.

Every level is an `ml_collections.ConfigDict` with the family `name`, its dials, the
`split_fractions` (train, validation, test) dial, a numeric `complexity` (the x-axis of ladder
plots; defined per family, see each family's module docstring) and a human-readable `label`.
Sequences are at most 64 tokens long so that a level trains in minutes on a CPU. The lowest
recurrence levels are learnt by a 2-layer, width-64 model in a few hundred steps; the top levels
are hard at that size. Measured with such a model (4 heads, EA
rational, batch 64, AdamW peak lr 3e-3, cosine): N=5 R=1 reaches 99.6% scored-token accuracy
after 500 steps, N=5 R=2 96% after 1000, N=6 R=3 83% after 1000, N=8 R=3 88% after 2000.

Ladders:
  recurrence        N symbols and R hidden rules raised together (the paper's axis);
                    complexity = log2(N * R).
  recurrence_rules  N = 5 fixed, R raised (the multi-task axis); complexity = log2(N * R).
  recall            plain associative recall, P pairs raised (V = 32 values);
                    complexity = log2(P * V).
  recall_conjunctive  two-token keys, neither token alone fixes the value, P raised;
                    complexity = log2(P * V) + 1.
  induction         copy a segment of a 6-symbol context, context length n raised (copy m = 10);
                    complexity = log2(n - m + 1) (candidate starts of the segment).
  selective_copy    M symbols among n blanks, both raised; complexity = log2(C(n, M)).
  modular           running sums mod N after blocks of k symbols, N and k raised;
                    complexity = (k + 1) * log2(N).
  dyck              k bracket types and max depth D raised; complexity = D * log2(k).
"""

from __future__ import annotations

import math

import ml_collections

from ea_jax.tasks import splits

# Shared recurrence geometry: 48 targets, rules = 2 delays out of 1..6 (15 possible rules).
RECURRENCE_SEQ_LEN = 48
RECURRENCE_MAX_DELAY = 6
RECURRENCE_NUM_DELAYS = 2


def _level(name: str, complexity: float, label: str, **dials) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
    dict(
      name=name,
      **dials,
      split_fractions=splits.DEFAULT_SPLIT_FRACTIONS,
      complexity=float(complexity),
      label=label,
    )
  )


def _recurrence_level(num_symbols: int, num_rules: int) -> ml_collections.ConfigDict:
  return _level(
    "recurrence",
    math.log2(num_symbols * num_rules),
    f"N={num_symbols} R={num_rules}",
    num_symbols=num_symbols,
    num_rules=num_rules,
    max_delay=RECURRENCE_MAX_DELAY,
    num_delays=RECURRENCE_NUM_DELAYS,
    seq_len=RECURRENCE_SEQ_LEN,
    rule_seed=0,
  )


def recurrence_ladder():
  return [
    _recurrence_level(n, r)
    for n, r in ((4, 1), (5, 1), (5, 2), (6, 2), (6, 3), (8, 3), (8, 4), (10, 6), (12, 8), (16, 12))
  ]


def recurrence_rules_ladder():
  return [_recurrence_level(5, r) for r in (1, 2, 3, 4, 6, 8, 12)]


def recall_ladder():
  return [
    _level(
      "recall",
      math.log2(p * 32),
      f"P={p} Q={q}",
      num_keys=32,
      num_values=32,
      num_pairs=p,
      num_queries=q,
      conjunctive=False,
    )
    for p, q in ((4, 8), (6, 8), (8, 10), (12, 12), (16, 12), (20, 12))
  ]


def recall_conjunctive_ladder():
  return [
    _level(
      "recall",
      math.log2(p * 32) + 1,
      f"P={p} pair keys",
      num_keys=16,
      num_values=32,
      num_pairs=p,
      num_queries=6,
      conjunctive=True,
    )
    for p in (4, 6, 8, 10, 12, 14)
  ]


def induction_ladder():
  return [
    _level(
      "induction", math.log2(n - 10 + 1), f"n={n} m=10", num_symbols=6, context_len=n, copy_len=10
    )
    for n in (12, 16, 24, 32, 40, 48, 54)
  ]


def selective_copy_ladder():
  return [
    _level(
      "selective_copy",
      math.log2(math.comb(n, m)),
      f"n={n} M={m}",
      num_symbols=8,
      region_len=n,
      num_data=m,
    )
    for n, m in ((16, 4), (24, 6), (32, 8), (36, 12), (44, 14), (48, 16))
  ]


def modular_ladder():
  return [
    _level(
      "modular", (k + 1) * math.log2(n), f"N={n} k={k}", num_symbols=n, block_len=k, num_blocks=j
    )
    for n, k, j in (
      (3, 1, 16),
      (3, 2, 12),
      (5, 2, 12),
      (5, 3, 10),
      (7, 3, 10),
      (7, 4, 8),
      (10, 5, 8),
    )
  ]


def dyck_ladder():
  return [
    _level("dyck", d * math.log2(k), f"k={k} D={d}", num_types=k, max_depth=d, seq_len=63)
    for k, d in ((2, 2), (2, 3), (3, 4), (4, 6), (6, 8), (8, 12))
  ]


LADDERS = {
  "recurrence": recurrence_ladder,
  "recurrence_rules": recurrence_rules_ladder,
  "recall": recall_ladder,
  "recall_conjunctive": recall_conjunctive_ladder,
  "induction": induction_ladder,
  "selective_copy": selective_copy_ladder,
  "modular": modular_ladder,
  "dyck": dyck_ladder,
}


def ladder_names() -> list[str]:
  return list(LADDERS)


def ladder(name: str) -> list[ml_collections.ConfigDict]:
  """The levels of ladder `name`, easiest first (fresh ConfigDicts: callers may modify them)."""
  if name not in LADDERS:
    raise ValueError(f"ladder name={name!r} is not known; allowed: {ladder_names()}")
  return LADDERS[name]()


# The task of configs/default.py: a mid-ladder recurrence level (N=5 symbols, R=2 hidden rules).
DEFAULT_LADDER, DEFAULT_LEVEL = "recurrence", 2


def default_task() -> ml_collections.ConfigDict:
  return ladder(DEFAULT_LADDER)[DEFAULT_LEVEL]
