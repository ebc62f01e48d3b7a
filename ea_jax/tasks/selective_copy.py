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

import jax
import jax.numpy as jnp

from ea_jax.tasks import base

FAMILY = "selective_copy"


@dataclasses.dataclass(frozen=True)
class SelectiveCopyTask(base.TaskBase):
  """Copy the non-blank symbols of a region in order; see the module docstring."""

  num_symbols: int = 8
  region_len: int = 32
  num_data: int = 8

  family = FAMILY

  def __post_init__(self):
    f = FAMILY
    v = base.check_int(f, "num_symbols", self.num_symbols, 2)
    m = base.check_int(f, "num_data", self.num_data, 1)
    n = base.check_int(f, "region_len", self.region_len, m)
    for name, value in (("num_symbols", v), ("region_len", n), ("num_data", m)):
      object.__setattr__(self, name, value)

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

  def _sample(self, rng, batch_size):
    b, n, m = batch_size, self.region_len, self.num_data
    k_pos, k_sym = jax.random.split(rng)
    pos_BM = jnp.sort(base.distinct_indices(k_pos, b, n, m), axis=1)
    data_BM = jax.random.randint(k_sym, (b, m), 0, self.num_symbols, dtype=jnp.int32)
    rows_B1 = jnp.arange(b)[:, None]
    region_BN = jnp.full((b, n), self.blank_id, jnp.int32).at[rows_B1, pos_BM].set(data_BM)
    mark_B1 = jnp.full((b, 1), self.mark_id, jnp.int32)
    x_BT = jnp.concatenate([region_BN, mark_B1, data_BM], axis=1)
    scored_L = jnp.arange(self.seq_len) >= n  # targets x_{n+1}..x_{n+M}
    return base.next_token_batch(x_BT, jnp.broadcast_to(scored_L[None, :], (b, self.seq_len)))
