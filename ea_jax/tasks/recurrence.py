"""Delayed recurrences with hidden rules (the paper's task family, our reconstruction).

Symbols are `0..N-1` (N = `num_symbols`; no other tokens, vocab_size = N). A *rule* is a set of
`num_delays` distinct delays `(d_1 < ... < d_k)` from `1..max_delay`; under it
`x_s = (x_{s-d_1} + ... + x_{s-d_k}) mod N` for every `s >= max_delay`, and the first `max_delay`
symbols are uniformly random. The task holds `num_rules` (R) rules, drawn once from `rule_seed`
without duplicates (or given explicitly as `rules`); each sequence uses one of them, drawn
uniformly, and the model is never told which: it has to infer the rule from the context.

Scoring: the target `x_s` (= targets[s - 1]) is scored iff every rule consistent with
`x_0..x_{s-1}` (i.e. reproducing all of `x_{max_delay}..x_{s-1}`) predicts the same `x_s`. The
true rule is always consistent, so scored targets are exactly the unambiguous ones; the random
prefix targets (s < max_delay) are never scored.

Worked example: N=5, max_delay=2, num_delays=1, rules ((1,), (2,)) i.e. copy x_{s-1} or x_{s-2}.
  x       = 3 1 3 1 3 1      (rule (2,): x_s = x_{s-2})
  inputs  = 3 1 3 1 3        targets = 1 3 1 3 1
  weights = 0 0 1 1 1
targets[0] = x_1 is random. targets[1] = x_2: rule (1,) says 1, rule (2,) says 3 -> ambiguous.
After x_2 = 3 only rule (2,) is consistent, so x_3, x_4, x_5 are all scored.

Complexity (ladders): log2(N * R), the bits needed to name the hidden rule and the next symbol.

Letters: B batch, T = L + 1 drawn symbols, L seq_len, R rules, D max_delay, S = T - D
rule-determined positions.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ea_jax.tasks import base, splits

FAMILY = "recurrence"
# Below this many possible rules the rules are a prefix of a permutation of all of them.
_PERMUTE_LIMIT = 1 << 20


def num_possible_rules(max_delay: int, num_delays: int) -> int:
  """Number of distinct rules: sets of `num_delays` delays from 1..max_delay."""
  return math.comb(max_delay, num_delays)


def _unrank_combination(rank: int, n: int, k: int) -> tuple[int, ...]:
  """The `rank`-th (lexicographic) k-subset of {1..n}, as a sorted tuple."""
  out, start = [], 1
  for slots in range(k, 0, -1):
    for value in range(start, n + 1):
      count = math.comb(n - value, slots - 1)  # subsets whose smallest remaining element is value
      if rank < count:
        out.append(value)
        start = value + 1
        break
      rank -= count
  return tuple(out)


def draw_rules(
  num_rules: int, max_delay: int, num_delays: int, rule_seed: int
) -> tuple[tuple[int, ...], ...]:
  """`num_rules` distinct rules, deterministic in `rule_seed`.

  For a fixed seed the rules of a smaller `num_rules` are a prefix of those of a larger one, so
  raising R only adds rules.
  """
  total = num_possible_rules(max_delay, num_delays)
  rng = np.random.default_rng(rule_seed)
  if total <= _PERMUTE_LIMIT:
    ranks = [int(r) for r in rng.permutation(total)[:num_rules]]
  else:
    seen, ranks = set(), []
    while len(ranks) < num_rules:
      r = int(rng.integers(total))
      if r not in seen:
        seen.add(r)
        ranks.append(r)
  return tuple(_unrank_combination(r, max_delay, num_delays) for r in ranks)


@dataclasses.dataclass(frozen=True)
class RecurrenceTask(base.TaskBase):
  """Multi-rule delayed recurrences mod `num_symbols`; see the module docstring."""

  num_symbols: int = 8
  num_rules: int = 2
  max_delay: int = 4
  num_delays: int = 2
  seq_len: int = 48
  rule_seed: int = 0
  rules: Optional[Any] = None  # optional explicit rules: a sequence of delay tuples
  split_fractions: tuple = base.split_fractions_field()
  rule_delays: tuple = dataclasses.field(init=False, default=())  # the rules in use

  family = FAMILY

  def __post_init__(self):
    f = FAMILY
    n = base.check_int(f, "num_symbols", self.num_symbols, 2)
    max_delay = base.check_int(f, "max_delay", self.max_delay, 1)
    seq_len = base.check_int(f, "seq_len", self.seq_len, 1)
    if seq_len < max_delay + 1:  # x_{max_delay}, the first rule-determined symbol, is a target
      raise ValueError(
        f"{f}.seq_len={seq_len} is too short for max_delay={max_delay} (nothing "
        f"left to predict); allowed: an integer >= {max_delay + 1}"
      )
    num_delays = base.check_int(f, "num_delays", self.num_delays, 1, max_delay)
    total = num_possible_rules(max_delay, num_delays)
    num_rules = base.check_int(f, "num_rules", self.num_rules, 1)
    if num_rules > total:
      raise ValueError(
        f"{f}.num_rules={num_rules} exceeds the {total} distinct rules of num_delays="
        f"{num_delays} delays from 1..max_delay={max_delay}; allowed: an integer in [1, {total}]"
      )
    seed = base.check_int(f, "rule_seed", self.rule_seed, 0)
    if self.rules is None:
      rules = draw_rules(num_rules, max_delay, num_delays, seed)
    else:
      rules = _check_rules(self.rules, num_rules, max_delay, num_delays)
      object.__setattr__(self, "rules", rules)
    object.__setattr__(self, "rule_delays", rules)
    base.finish(
      self,
      f,
      dict(
        num_symbols=n,
        seq_len=seq_len,
        max_delay=max_delay,
        num_delays=num_delays,
        num_rules=num_rules,
        rule_seed=seed,
      ),
    )

  @property
  def vocab_size(self) -> int:
    return self.num_symbols

  def coefficients_RD(self) -> np.ndarray:
    """int32 [R, D]: coef[r, d - 1] = 1 iff delay d belongs to rule r."""
    coef = np.zeros((self.num_rules, self.max_delay), np.int32)
    for r, delays in enumerate(self.rule_delays):
      coef[r, np.asarray(delays) - 1] = 1
    return coef

  def transfer_RTD(self) -> np.ndarray:
    """int32 [R, T, D]: x_T = transfer[rule] @ prefix (mod N), prefix = x_0..x_{D-1}.

    The recurrence is linear mod N, so each rule's whole sequence is a fixed integer matrix
    (entries reduced mod N) applied to the random prefix; sampling then needs no sequential loop.
    """
    n, big_d, big_t = self.num_symbols, self.max_delay, self.seq_len + 1
    out = np.zeros((self.num_rules, big_t, big_d), np.int64)
    out[:, :big_d, :] = np.eye(big_d, dtype=np.int64)
    for r, delays in enumerate(self.rule_delays):
      for s in range(big_d, big_t):
        out[r, s] = sum(out[r, s - d] for d in delays) % n
    return out.astype(np.int32)

  # Splits: the free digits are the prefix x_0..x_{D-1}; the first j of them (all of them on
  # every ladder level) are the split key's digits, the others are hashed. The rule is not part
  # of the key: it cannot always be read back (from an all-zero prefix every rule gives the
  # all-zero sequence), and the split must be a function of the sequence.

  def _free_digits(self):
    return self.num_symbols, self.max_delay

  def _prefix_key(self, prefix_D):
    space = self.split_space
    j = space.digits
    return space.key(space.from_digits(prefix_D[:j]), splits.hash_values(prefix_D[j:]))

  def _split_key(self, x_T):
    return self._prefix_key(x_T[: self.max_delay])

  def _num_bits(self):
    return 1 + self.max_delay

  def _sequence(self, bits_W, s):
    n, space = self.num_symbols, self.split_space
    rule = base.uniform_ints(bits_W[0], self.num_rules)
    prefix_D = base.uniform_ints(bits_W[1:], n)
    j = space.digits
    a = space.offset(s, splits.hash_values(prefix_D[j:]))
    prefix_D = prefix_D.at[:j].set(space.to_digits(a))
    x_T = jnp.sum(jnp.asarray(self.transfer_RTD())[rule] * prefix_D[None, :], axis=1) % n
    scored_L = scored_targets(x_T[None, :], jnp.asarray(self.coefficients_RD()), n)[0]
    return x_T, scored_L

  def num_sequences_is_exact(self, split):
    del split
    return self.num_rules == 1 or _enumeration_size(self) <= EXACT_COUNT_LIMIT

  def num_sequences(self, split):
    """Distinct sequences of `split`: exact when R * N**D <= EXACT_COUNT_LIMIT (or R = 1), else
    the lower bound "one sequence per prefix" (sequences with different prefixes differ)."""
    space = self.split_space
    free = self.num_symbols ** (self.max_delay - space.digits)  # prefixes per split key
    if self.num_rules == 1:
      return space.num_keys(split) * free
    if _enumeration_size(self) > EXACT_COUNT_LIMIT:
      return space.num_keys(split) * free
    return _count_by_enumeration(self)[splits.SPLITS.index(split)]


# Exact counting enumerates every prefix under every rule; above this many (prefix, rule) pairs
# num_sequences is the documented lower bound.
EXACT_COUNT_LIMIT = 1 << 23
_COUNT_CHUNK = 1 << 16


def _enumeration_size(task) -> int:
  return task.num_rules * task.num_symbols**task.max_delay


@functools.lru_cache(maxsize=64)
def _count_by_enumeration(task) -> tuple[int, int, int]:
  """Distinct sequences per split, enumerating every prefix: a prefix gives one sequence per
  class of rules that produce the same sequence from it."""
  n, big_d = task.num_symbols, task.max_delay
  transfer_RTD = task.transfer_RTD().astype(np.int64)
  key_of = jax.jit(jax.vmap(task._prefix_key))  # pylint: disable=protected-access
  counts = np.zeros(3, np.int64)
  powers_D = n ** np.arange(big_d, dtype=np.int64)
  total = n**big_d
  for start in range(0, total, _COUNT_CHUNK):
    idx_P = np.arange(start, min(start + _COUNT_CHUNK, total), dtype=np.int64)
    prefix_PD = (idx_P[:, None] // powers_D[None, :]) % n
    split_P = np.asarray(task.split_space.split_index_of_key(key_of(prefix_PD.astype(np.int32))))
    x_PRT = np.einsum("rtd,pd->prt", transfer_RTD, prefix_PD) % n
    distinct_P = np.ones(len(idx_P), np.int64)  # rule 0 always counts
    for r in range(1, task.num_rules):
      same_as_earlier = np.zeros(len(idx_P), bool)
      for r2 in range(r):
        same_as_earlier |= np.all(x_PRT[:, r] == x_PRT[:, r2], axis=1)
      distinct_P += ~same_as_earlier
    counts += np.bincount(split_P, weights=distinct_P, minlength=3).astype(np.int64)
  return tuple(int(c) for c in counts)


def scored_targets(x_BT: jax.Array, coef_RD: jax.Array, num_symbols: int) -> jax.Array:
  """bool [B, T-1]: whether targets x[:, 1:] are determined by the prefix under the rule set.

  Vectorised over rules: pred[b, r, s] is rule r's prediction of x_s (s >= D); rule r is
  consistent before s iff it matched every x_{s'} with D <= s' < s. The target x_s is scored iff
  every consistent rule predicts it (equivalently: all consistent rules agree, since the true
  rule is consistent and correct).
  """
  big_t = x_BT.shape[1]
  big_d = coef_RD.shape[1]
  # lagged[b, d-1, s-D] = x_{s-d} for s in [D, T).
  lagged_BDS = jnp.stack([x_BT[:, big_d - d : big_t - d] for d in range(1, big_d + 1)], axis=1)
  pred_BRS = jnp.sum(coef_RD[None, :, :, None] * lagged_BDS[:, None, :, :], axis=2) % num_symbols
  match_BRS = pred_BRS == x_BT[:, None, big_d:]
  consistent_after_BRS = jnp.cumprod(match_BRS.astype(jnp.int32), axis=2).astype(bool)
  ones_BR1 = jnp.ones(match_BRS.shape[:2] + (1,), bool)
  consistent_before_BRS = jnp.concatenate([ones_BR1, consistent_after_BRS[:, :, :-1]], axis=2)
  scored_BS = jnp.all(match_BRS | ~consistent_before_BRS, axis=1)
  random_prefix = jnp.zeros((x_BT.shape[0], big_d - 1), bool)  # targets x_1..x_{D-1}
  return jnp.concatenate([random_prefix, scored_BS], axis=1)


def _check_rules(rules, num_rules, max_delay, num_delays):
  f = FAMILY
  try:
    rules = tuple(tuple(int(d) for d in rule) for rule in rules)
  except (TypeError, ValueError):
    raise ValueError(
      f"{f}.rules={rules!r}; allowed: a sequence of tuples of integer delays"
    ) from None
  if len(rules) != num_rules:
    raise ValueError(
      f"{f}.rules has {len(rules)} rules but num_rules={num_rules}; "
      "allowed: exactly num_rules rules"
    )
  for rule in rules:
    if (
      len(rule) != num_delays
      or len(set(rule)) != num_delays
      or not all(1 <= d <= max_delay for d in rule)
    ):
      raise ValueError(
        f"{f}.rules contains {rule}; allowed: {num_delays} distinct delays in "
        f"[1, max_delay={max_delay}]"
      )
  canonical = [tuple(sorted(rule)) for rule in rules]
  dupes = sorted({r for r in canonical if canonical.count(r) > 1})
  if dupes:
    raise ValueError(f"{f}.rules has duplicate rules {dupes}; allowed: distinct delay sets")
  return tuple(canonical)
