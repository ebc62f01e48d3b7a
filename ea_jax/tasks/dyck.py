"""Dyck-k: well-bracketed strings with k bracket types; predict the closing bracket where forced.

Tokens: opening brackets `0..k-1`, closing brackets `k..2k-1` (`k + i` closes `i`; k =
`num_types`); vocab_size = 2k. A sequence of T = seq_len + 1 brackets is a random walk on the
stack: at each step, with depth d (open brackets) and r positions left including this one,
  - d == 0                          -> open a uniformly random type;
  - d == max_depth or d >= r - 1    -> close the innermost open bracket (forced: opening would
                                       exceed max_depth or leave too little room to close all);
  - otherwise                       -> open (random type) or close, each with probability 1/2.
With T even the string ends balanced.

Scored: exactly the forced closes. Their token is determined by the prefix (the bracket to close
is the top of the stack the prefix defines; whether a close is forced follows from the depth,
the position and the task's max_depth). Free closes and all openings are random.

Worked example (k=2: "(" = 0, "[" = 1, ")" = 2, "]" = 3; max_depth=2, T=6):
  x       = 0 1 3 1 3 2          ( [ ] [ ] )
  inputs  = 0 1 3 1 3            targets = 1 3 1 3 2
  weights = 0 1 0 1 1
x_2 = "]" is forced by max_depth 2; x_4 too; x_5 = ")" is forced as 1 position is left at depth 1.

Complexity (ladders): max_depth * log2(k), the bits of the deepest stack the model must track.

Letters: B batch, T = L + 1 brackets, D max_depth.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ea_jax.tasks import base

FAMILY = "dyck"


@dataclasses.dataclass(frozen=True)
class DyckTask(base.TaskBase):
  """Bracket strings of k types with forced closes scored; see the module docstring."""

  num_types: int = 2
  max_depth: int = 4
  seq_len: int = 47

  family = FAMILY

  def __post_init__(self):
    f = FAMILY
    k = base.check_int(f, "num_types", self.num_types, 1)
    seq_len = base.check_int(f, "seq_len", self.seq_len, 1)
    depth = base.check_int(f, "max_depth", self.max_depth, 1, (seq_len + 1) // 2)
    for name, value in (("num_types", k), ("max_depth", depth), ("seq_len", seq_len)):
      object.__setattr__(self, name, value)

  @property
  def vocab_size(self) -> int:
    return 2 * self.num_types

  def _sample(self, rng, batch_size):
    b, k, big_d, big_t = batch_size, self.num_types, self.max_depth, self.seq_len + 1
    k_coin, k_type = jax.random.split(rng)
    coin_TB = jax.random.bernoulli(k_coin, 0.5, (big_t, b))
    type_TB = jax.random.randint(k_type, (big_t, b), 0, k, dtype=jnp.int32)
    rows_B = jnp.arange(b)

    def step(carry, inputs):
      stack_BD, depth_B = carry
      r, coin_B, type_B = inputs
      forced_B = (depth_B > 0) & ((depth_B == big_d) | (depth_B >= r - 1))
      close_B = forced_B | ((depth_B > 0) & coin_B)
      top_B = stack_BD[rows_B, jnp.maximum(depth_B - 1, 0)]
      token_B = jnp.where(close_B, k + top_B, type_B)
      slot_B = jnp.minimum(depth_B, big_d - 1)  # where an opening is pushed (unused on close)
      pushed_BD = stack_BD.at[rows_B, slot_B].set(type_B)
      stack_BD = jnp.where(close_B[:, None], stack_BD, pushed_BD)
      depth_B = jnp.where(close_B, depth_B - 1, depth_B + 1)
      return (stack_BD, depth_B), (token_B, forced_B)

    remaining_T = big_t - jnp.arange(big_t)
    init = (jnp.zeros((b, big_d), jnp.int32), jnp.zeros((b,), jnp.int32))
    _, (x_TB, forced_TB) = jax.lax.scan(step, init, (remaining_T, coin_TB, type_TB))
    return base.next_token_batch(x_TB.T, forced_TB.T[:, 1:])
