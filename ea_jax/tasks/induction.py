"""Induction / copy: a segment of a random context recurs after a separator; continue it.

Tokens: symbols `0..V-1` (V = `num_symbols`), separator `SEP = V`; vocab_size = V + 1. A
sequence is n = `context_len` random symbols `c` (with repetitions), `SEP`, then the m =
`copy_len` symbols `c[k..k+m-1]` for a start k drawn uniformly from `0..n-m`:

  x = c_0 ... c_{n-1}  SEP  c_k c_{k+1} ... c_{k+m-1}

Scored: a copied symbol `c_{k+j+1}` is scored iff every start k' in `0..n-m` whose segment
matches the copied symbols seen so far (`c[k'..k'+j] == c[k..k+j]`) continues with the same
symbol. With few symbols the first copied token often occurs several times, so the model must
match longer prefixes (multi-token induction) before a continuation is determined. The context
and SEP are never scored; the first copied symbol only if every candidate start holds the same
symbol.

Worked example (V=3, SEP=3, n=6, m=3, k=2):
  x       = 1 2 1 0 2 1 3 1 0 2      (segment c[2..4] = 1 0 2)
  inputs  = 1 2 1 0 2 1 3 1 0        targets = 2 1 0 2 1 3 1 0 2
  weights = 0 0 0 0 0 0 0 0 1
The first copied 1 is unscored (any start 0..3 is possible); after it, starts 0 and 2 both begin
with 1 but continue with 2 and 0, so the 0 is unscored; after "1 0" only start 2 is left, so the
final 2 is scored.

Complexity (ladders): log2(n - m + 1), the bits needed to locate the copied segment.

Letters: B batch, n context length, m copy length, K = n - m + 1 candidate starts.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from ea_jax.tasks import base, splits

FAMILY = "induction"


@dataclasses.dataclass(frozen=True)
class InductionTask(base.TaskBase):
  """Continue a recurring segment of a random context; see the module docstring."""

  num_symbols: int = 8
  context_len: int = 32
  copy_len: int = 8
  split_fractions: tuple = base.split_fractions_field()

  family = FAMILY

  def __post_init__(self):
    f = FAMILY
    v = base.check_int(f, "num_symbols", self.num_symbols, 2)
    m = base.check_int(f, "copy_len", self.copy_len, 2)
    n = base.check_int(f, "context_len", self.context_len, m)
    base.finish(self, f, dict(num_symbols=v, context_len=n, copy_len=m))

  @property
  def sep_id(self) -> int:
    return self.num_symbols

  @property
  def vocab_size(self) -> int:
    return self.num_symbols + 1

  @property
  def seq_len(self) -> int:
    return self.context_len + self.copy_len  # T - 1

  # Splits: the free digits are the context symbols; the first j form the split key's digits,
  # the others are hashed. The start of the copy is not part of the key (it cannot always be
  # read back: a segment may occur twice).

  def _free_digits(self):
    return self.num_symbols, self.context_len

  def _context_key(self, c_N):
    space = self.split_space
    j = space.digits
    return space.key(space.from_digits(c_N[:j]), splits.hash_values(c_N[j:]))

  def _split_key(self, x_T):
    return self._context_key(x_T[: self.context_len])

  def _num_bits(self):
    return self.context_len + 1

  def _sequence(self, bits_W, s):
    n, m, space = self.context_len, self.copy_len, self.split_space
    c_N = base.uniform_ints(bits_W[:n], self.num_symbols)
    j = space.digits
    c_N = c_N.at[:j].set(space.to_digits(space.offset(s, splits.hash_values(c_N[j:]))))
    start = base.uniform_ints(bits_W[n], n - m + 1)
    copy_M = jax.lax.dynamic_slice(c_N, (start,), (m,))
    x_T = jnp.concatenate([c_N, jnp.full((1,), self.sep_id, jnp.int32), copy_M])
    return x_T, scored_targets(c_N[None, :], copy_M[None, :])[0]

  def num_sequences_is_exact(self, split):
    del split
    return self.num_symbols**self.context_len <= EXACT_COUNT_LIMIT

  def num_sequences(self, split):
    """Distinct sequences of `split`: exact (by enumerating every context) when V**n <=
    EXACT_COUNT_LIMIT, else the lower bound "one sequence per context" (a context gives one
    sequence per distinct length-m window of it)."""
    space = self.split_space
    if self.num_sequences_is_exact(split):
      return _count_by_enumeration(self)[splits.SPLITS.index(split)]
    return space.num_keys(split) * self.num_symbols ** (self.context_len - space.digits)


EXACT_COUNT_LIMIT = 1 << 20


@functools.lru_cache(maxsize=64)
def _count_by_enumeration(task) -> tuple[int, int, int]:
  v, n, m = task.num_symbols, task.context_len, task.copy_len
  idx_C = np.arange(v**n, dtype=np.int64)
  c_CN = (idx_C[:, None] // (v ** np.arange(n, dtype=np.int64))[None, :]) % v
  key_of = jax.jit(jax.vmap(task._context_key))  # pylint: disable=protected-access
  split_C = np.asarray(task.split_space.split_index_of_key(key_of(c_CN.astype(np.int32))))
  # Window k of context c as a base-v number; distinct windows per context.
  win_CK = np.stack(
    [
      np.sum(c_CN[:, k : k + m] * (v ** np.arange(m, dtype=np.int64)), axis=1)
      for k in range(n - m + 1)
    ],
    axis=1,
  )
  win_CK.sort(axis=1)
  distinct_C = 1 + np.sum(win_CK[:, 1:] != win_CK[:, :-1], axis=1)
  return tuple(int(c) for c in np.bincount(split_C, weights=distinct_C, minlength=3))


def scored_targets(c_BN: jax.Array, copy_BM: jax.Array) -> jax.Array:
  """bool [B, n + m]: which targets x_1..x_{n+m} are determined (only copied symbols 1..m-1 can be).

  window[b, k, i] = c[b, k + i] for every candidate start k; a start is consistent before copied
  symbol j iff its window matches the copy on 0..j-1; symbol j is scored iff every consistent
  start predicts it.
  """
  b, n = c_BN.shape
  m = copy_BM.shape[1]
  starts_K = jnp.arange(n - m + 1)
  window_BKM = c_BN[:, starts_K[:, None] + jnp.arange(m)[None, :]]
  match_BKM = window_BKM == copy_BM[:, None, :]
  consistent_after_BKM = jnp.cumprod(match_BKM.astype(jnp.int32), axis=2).astype(bool)
  ones_BK1 = jnp.ones(match_BKM.shape[:2] + (1,), bool)
  consistent_before_BKM = jnp.concatenate([ones_BK1, consistent_after_BKM[:, :, :-1]], axis=2)
  scored_BM = jnp.all(match_BKM | ~consistent_before_BKM, axis=1)
  # Targets x_1..x_n (the rest of the context and SEP) are not scored; then copied symbols 0..m-1.
  return jnp.concatenate([jnp.zeros((b, n), bool), scored_BM], axis=1)
