"""Selective copy: symbols scattered among blank tokens; reproduce them in order after a marker.

Tokens: symbols `0..V-1` (V = `num_symbols`), `BLANK = V`, `MARK = V+1`; vocab_size = V + 2. A
sequence is a region of n = `region_len` tokens holding M = `num_data` random symbols (with
repetitions) at random distinct positions, `BLANK` elsewhere, then `MARK`, then the M symbols in
their order of appearance:

  x = BLANK s_1 BLANK BLANK s_2 ... BLANK  MARK  s_1 s_2 ... s_M

Scored: exactly the M reproduced symbols (the targets after MARK); the region is random.

Worked example (V=4, BLANK=4, MARK=5, n=5, M=2):
  x       = 4 2 4 4 0 5 2 0
  inputs  = 4 2 4 4 0 5 2        targets = 2 4 4 0 5 2 0
  weights = 0 0 0 0 0 1 1

Complexity (ladders): log2(C(n, M)), the bits of the layout the model must read (which positions
hold data).

Letters: B batch, n region length, M data symbols.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from ea_jax.tasks import base, splits

FAMILY = "selective_copy"


@dataclasses.dataclass(frozen=True)
class SelectiveCopyTask(base.TaskBase):
  """Copy the non-blank symbols of a region in order; see the module docstring."""

  num_symbols: int = 8
  region_len: int = 32
  num_data: int = 8
  split_fractions: tuple = base.split_fractions_field()

  family = FAMILY

  def __post_init__(self):
    f = FAMILY
    v = base.check_int(f, "num_symbols", self.num_symbols, 2)
    m = base.check_int(f, "num_data", self.num_data, 1)
    n = base.check_int(f, "region_len", self.region_len, m)
    base.finish(self, f, dict(num_symbols=v, region_len=n, num_data=m))

  @property
  def blank_id(self) -> int:
    return self.num_symbols

  @property
  def mark_id(self) -> int:
    return self.num_symbols + 1

  @property
  def vocab_size(self) -> int:
    return self.num_symbols + 2

  @property
  def seq_len(self) -> int:
    return self.region_len + self.num_data  # T - 1

  # Splits: the free digits are the data symbols; the first j form the split key's digits, the
  # data positions and the other symbols are hashed.

  def _free_digits(self):
    return self.num_symbols, self.num_data

  def _key_from(self, pos_M, data_M):
    space = self.split_space
    j = space.digits
    return space, j, splits.hash_values(jnp.concatenate([pos_M, data_M[j:]]))

  def _split_key(self, x_T):
    n, m = self.region_len, self.num_data
    pos_M = jnp.nonzero(x_T[:n] != self.blank_id, size=m)[0].astype(jnp.int32)
    data_M = x_T[n + 1 :]
    space, j, h = self._key_from(pos_M, data_M)
    return space.key(space.from_digits(data_M[:j]), h)

  def _num_bits(self):
    return self.region_len + self.num_data

  def _sequence(self, bits_W, s):
    n, m = self.region_len, self.num_data
    pos_M = jnp.sort(base.distinct_indices(bits_W[:n], m))
    data_M = base.uniform_ints(bits_W[n:], self.num_symbols)
    space, j, h = self._key_from(pos_M, data_M)
    data_M = data_M.at[:j].set(space.to_digits(space.offset(s, h)))
    region_N = jnp.full((n,), self.blank_id, jnp.int32).at[pos_M].set(data_M)
    x_T = jnp.concatenate([region_N, jnp.full((1,), self.mark_id, jnp.int32), data_M])
    return x_T, jnp.arange(self.seq_len) >= n  # targets x_{n+1}..x_{n+M}

  def num_sequences(self, split):
    """Exact: layouts C(n, M) x data symbols V**M, a split holding its share of the key digits."""
    space = self.split_space
    return (
      math.comb(self.region_len, self.num_data)
      * self.num_symbols ** (self.num_data - space.digits)
      * space.num_keys(split)
    )
