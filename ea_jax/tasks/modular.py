"""Modular arithmetic: the running sum mod N, announced after every block of symbols.

Tokens: symbols `0..N-1` (N = `num_symbols`; sums use the same tokens), `EQ = N`;
vocab_size = N + 1. A sequence is `num_blocks` blocks of k = `block_len` random symbols, each
followed by `EQ` and the sum mod N of *all* symbols so far (every block up to this one):

  x = a_1 .. a_k EQ S_1  a_{k+1} .. a_{2k} EQ S_2  ...      S_j = (a_1 + ... + a_{jk}) mod N

Scored: exactly the sums (the targets whose input is `EQ`); everything else is random. A sum
depends on k + 1 tokens (the previous sum and the block), so k sets how many terms attention
must gather per answer.

Worked example (N=5, EQ=5, k=2, 2 blocks):
  x       = 3 4 5 2 1 1 5 4
  inputs  = 3 4 5 2 1 1 5        targets = 4 5 2 1 1 5 4
  weights = 0 0 1 0 0 0 1
(3 + 4) mod 5 = 2, then (2 + 1 + 1) mod 5 = 4.

Complexity (ladders): (k + 1) * log2(N), the bits of context each sum depends on.

Letters: B batch, J blocks, k block length, T = J (k + 2) tokens.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ea_jax.tasks import base

FAMILY = "modular"


@dataclasses.dataclass(frozen=True)
class ModularTask(base.TaskBase):
  """Running sums mod N after each block; see the module docstring."""

  num_symbols: int = 5
  block_len: int = 3
  num_blocks: int = 10

  family = FAMILY

  def __post_init__(self):
    f = FAMILY
    n = base.check_int(f, "num_symbols", self.num_symbols, 2)
    k = base.check_int(f, "block_len", self.block_len, 1)
    j = base.check_int(f, "num_blocks", self.num_blocks, 1)
    for name, value in (("num_symbols", n), ("block_len", k), ("num_blocks", j)):
      object.__setattr__(self, name, value)

  @property
  def eq_id(self) -> int:
    return self.num_symbols

  @property
  def vocab_size(self) -> int:
    return self.num_symbols + 1

  @property
  def seq_len(self) -> int:
    return self.num_blocks * (self.block_len + 2) - 1  # T - 1

  def _sample(self, rng, batch_size):
    b, n, k, j = batch_size, self.num_symbols, self.block_len, self.num_blocks
    a_BJK = jax.random.randint(rng, (b, j, k), 0, n, dtype=jnp.int32)
    sums_BJ = jnp.cumsum(jnp.sum(a_BJK, axis=2), axis=1) % n
    eq_BJ1 = jnp.full((b, j, 1), self.eq_id, jnp.int32)
    x_BT = jnp.concatenate([a_BJK, eq_BJ1, sums_BJ[:, :, None]], axis=2).reshape(b, j * (k + 2))
    # The sum of block i sits at x index i (k + 2) + k + 1, i.e. target index i (k + 2) + k.
    scored_L = (jnp.arange(self.seq_len) % (k + 2)) == k
    return base.next_token_batch(x_BT, jnp.broadcast_to(scored_L[None, :], (b, self.seq_len)))
