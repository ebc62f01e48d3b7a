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

from ea_jax.tasks import base, splits

FAMILY = "dyck"


@dataclasses.dataclass(frozen=True)
class DyckTask(base.TaskBase):
  """Bracket strings of k types with forced closes scored; see the module docstring."""

  num_types: int = 2
  max_depth: int = 4
  seq_len: int = 47
  split_fractions: tuple = base.split_fractions_field()

  family = FAMILY

  def __post_init__(self):
    f = FAMILY
    # One type leaves no free digits to split on (the types of the openings are the split key).
    k = base.check_int(f, "num_types", self.num_types, 2)
    depth = base.check_int(f, "max_depth", self.max_depth, 1)
    seq_len = base.check_int(f, "seq_len", self.seq_len, 1)
    if seq_len < 2 * depth - 1:  # reaching max_depth and closing again takes 2 * max_depth
      raise ValueError(
        f"{f}.seq_len={seq_len} is too short for max_depth={depth}; allowed: an "
        f"integer >= {2 * depth - 1} (or max_depth in [1, {(seq_len + 1) // 2}])"
      )
    base.finish(self, f, dict(num_types=k, max_depth=depth, seq_len=seq_len))

  @property
  def vocab_size(self) -> int:
    return 2 * self.num_types

  @property
  def num_openings(self) -> int:
    """Every string has ceil(T / 2) openings (it ends at depth 0 if T is even, else 1)."""
    return (self.seq_len + 2) // 2

  # Splits: the free digits are the types of the openings in order; the first j form the split
  # key's digits, the open/close pattern and the other types are hashed.

  def _free_digits(self):
    return self.num_types, self.num_openings

  def _key_from(self, close_T, types_O):
    space = self.split_space
    j = space.digits
    return space, j, splits.hash_values(jnp.concatenate([close_T.astype(jnp.int32), types_O[j:]]))

  def _split_key(self, x_T):
    k = self.num_types
    open_pos_O = jnp.nonzero(x_T < k, size=self.num_openings)[0]
    space, j, h = self._key_from(x_T >= k, x_T[open_pos_O])
    return space.key(space.from_digits(x_T[open_pos_O][:j]), h)

  def _num_bits(self):
    return self.seq_len + 1 + self.num_openings

  def _sequence(self, bits_W, s):
    k, big_d, big_t = self.num_types, self.max_depth, self.seq_len + 1
    coin_T = (bits_W[:big_t] >> 31) == 1  # fair coins: the top bit
    types_O = base.uniform_ints(bits_W[big_t:], k)

    def step(carry, inputs):
      stack_D, depth, opened = carry  # the stack holds opening numbers, not types
      r, coin = inputs
      forced = (depth > 0) & ((depth == big_d) | (depth >= r - 1))
      close = forced | ((depth > 0) & coin)
      top = stack_D[jnp.maximum(depth - 1, 0)]
      which = jnp.where(close, top, opened)  # the opening this bracket opens or closes
      pushed_D = stack_D.at[jnp.minimum(depth, big_d - 1)].set(opened)
      stack_D = jnp.where(close, stack_D, pushed_D)
      depth = jnp.where(close, depth - 1, depth + 1)
      opened = jnp.where(close, opened, opened + 1)
      return (stack_D, depth, opened), (close, which, forced)

    remaining_T = big_t - jnp.arange(big_t)
    init = (jnp.zeros((big_d,), jnp.int32), jnp.int32(0), jnp.int32(0))
    _, (close_T, which_T, forced_T) = jax.lax.scan(step, init, (remaining_T, coin_T))
    space, j, h = self._key_from(close_T, types_O)
    types_O = types_O.at[:j].set(space.to_digits(space.offset(s, h)))
    x_T = jnp.where(close_T, k, 0) + types_O[which_T]
    return x_T, forced_T[1:]

  def num_patterns(self) -> int:
    """Distinct open/close patterns the walk can produce (dynamic programming over depth)."""
    big_d, big_t = self.max_depth, self.seq_len + 1
    ways = {0: 1}
    for t in range(big_t):
      r, nxt = big_t - t, {}
      for d, w in ways.items():
        moves = [+1] if d == 0 else [-1] if (d == big_d or d >= r - 1) else [+1, -1]
        for mv in moves:
          nxt[d + mv] = nxt.get(d + mv, 0) + w
      ways = nxt
    return sum(ways.values())

  def num_sequences(self, split):
    """Exact: patterns x types of the openings, a split holding its share of the key digits."""
    space = self.split_space
    return (
      self.num_patterns()
      * self.num_types ** (self.num_openings - space.digits)
      * space.num_keys(split)
    )
