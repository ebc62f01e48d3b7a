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

import jax.numpy as jnp

from ea_jax.tasks import base, splits

FAMILY = "modular"


@dataclasses.dataclass(frozen=True)
class ModularTask(base.TaskBase):
  """Running sums mod N after each block; see the module docstring."""

  num_symbols: int = 5
  block_len: int = 3
  num_blocks: int = 10
  split_fractions: tuple = base.split_fractions_field()

  family = FAMILY

  def __post_init__(self):
    f = FAMILY
    n = base.check_int(f, "num_symbols", self.num_symbols, 2)
    k = base.check_int(f, "block_len", self.block_len, 1)
    j = base.check_int(f, "num_blocks", self.num_blocks, 1)
    base.finish(self, f, dict(num_symbols=n, block_len=k, num_blocks=j))

  @property
  def eq_id(self) -> int:
    return self.num_symbols

  @property
  def vocab_size(self) -> int:
    return self.num_symbols + 1

  @property
  def seq_len(self) -> int:
    return self.num_blocks * (self.block_len + 2) - 1  # T - 1

  # Splits: the free digits are the J * k summed symbols in order; the first j form the split
  # key's digits, the others are hashed.

  def _free_digits(self):
    return self.num_symbols, self.num_blocks * self.block_len

  def _symbols_key(self, a_F):
    space = self.split_space
    j = space.digits
    return space.key(space.from_digits(a_F[:j]), splits.hash_values(a_F[j:]))

  def _split_key(self, x_T):
    k = self.block_len
    return self._symbols_key(x_T.reshape(self.num_blocks, k + 2)[:, :k].reshape(-1))

  def _num_bits(self):
    return self.num_blocks * self.block_len

  def _sequence(self, bits_W, s):
    n, k, nb, space = self.num_symbols, self.block_len, self.num_blocks, self.split_space
    a_F = base.uniform_ints(bits_W, n)
    j = space.digits
    a_F = a_F.at[:j].set(space.to_digits(space.offset(s, splits.hash_values(a_F[j:]))))
    a_JK = a_F.reshape(nb, k)
    sums_J = jnp.cumsum(jnp.sum(a_JK, axis=1)) % n
    eq_J1 = jnp.full((nb, 1), self.eq_id, jnp.int32)
    x_T = jnp.concatenate([a_JK, eq_J1, sums_J[:, None]], axis=1).reshape(-1)
    # The sum of block i sits at x index i (k + 2) + k + 1, i.e. target index i (k + 2) + k.
    return x_T, (jnp.arange(self.seq_len) % (k + 2)) == k

  def num_sequences(self, split):
    """Exact: every arrangement of the J * k symbols is a distinct sequence."""
    space = self.split_space
    free = self.num_blocks * self.block_len - space.digits
    return self.num_symbols**free * space.num_keys(split)
