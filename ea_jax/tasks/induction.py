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

import jax
import jax.numpy as jnp

from ea_jax.tasks import base

FAMILY = "induction"


@dataclasses.dataclass(frozen=True)
class InductionTask(base.TaskBase):
  """Continue a recurring segment of a random context; see the module docstring."""

  num_symbols: int = 8
  context_len: int = 32
  copy_len: int = 8

  family = FAMILY

  def __post_init__(self):
    f = FAMILY
    v = base.check_int(f, "num_symbols", self.num_symbols, 2)
    m = base.check_int(f, "copy_len", self.copy_len, 2)
    n = base.check_int(f, "context_len", self.context_len, m)
    for name, value in (("num_symbols", v), ("context_len", n), ("copy_len", m)):
      object.__setattr__(self, name, value)

  @property
  def sep_id(self) -> int:
    return self.num_symbols

  @property
  def vocab_size(self) -> int:
    return self.num_symbols + 1

  @property
  def seq_len(self) -> int:
    return self.context_len + self.copy_len  # T - 1

  def _sample(self, rng, batch_size):
    b, n, m = batch_size, self.context_len, self.copy_len
    k_ctx, k_start = jax.random.split(rng)
    c_BN = jax.random.randint(k_ctx, (b, n), 0, self.num_symbols, dtype=jnp.int32)
    start_B = jax.random.randint(k_start, (b,), 0, n - m + 1)
    copy_BM = jnp.take_along_axis(c_BN, start_B[:, None] + jnp.arange(m)[None, :], axis=1)
    sep_B1 = jnp.full((b, 1), self.sep_id, jnp.int32)
    x_BT = jnp.concatenate([c_BN, sep_B1, copy_BM], axis=1)
    return base.next_token_batch(x_BT, scored_targets(c_BN, copy_BM))


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
