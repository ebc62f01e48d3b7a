"""Split assignment: train / validation / test disjoint by construction.

Every task family exposes some *free digits*: symbols of its sequences that are drawn i.i.d.
uniformly from `0..base-1`, independently of everything else, and that can be read back from the
finished sequence (recurrence: the random prefix; modular and induction: the random symbols;
selective copy: the data symbols; recall: which association each query asks for; Dyck: the types of
the opening brackets). The first `j` free digits form a number `a` in `[0, M)`, `M = base**j`; the
rest of the sequence that is readable and does not depend on `a` (the other free digits and the
family's remaining content) is hashed to `h`. A sequence's *split key* is `s = (a + h) mod M`, and
its split is where a fixed keyed permutation `pi` of `[0, M)` puts it:

  split(x) = "train"       if pi^-1(s) in [0, b_1)
             "validation"  if pi^-1(s) in [b_1, b_2)
             "test"        if pi^-1(s) in [b_2, M)        (b_i from `split_fractions`)

`split(x)` is a function of the sequence alone, so no sequence can belong to two splits. To sample
from a split, a family draws its content as usual, draws `u` uniformly in the split's range,
and sets `a = (pi(u) - h) mod M`. For every value of the rest exactly `b_{i+1} - b_i` values
of `a` fall into split i, so this is exactly the family's distribution conditioned on the split:
no rejection, nothing that can fail. Distinct `u` give distinct split keys and hence distinct
sequences, which is how evaluation sets and finite training sets are drawn without repetition.

The permutation is a 4-round Feistel network on the smallest even number of bits that covers
`M`, restricted to `[0, M)` by cycle walking (re-applying the bijection until the value lands
inside `[0, M)`; this always terminates because every cycle of a bijection of a finite set that
leaves `[0, M)` returns to it). jax.random has no keyed permutation of an index space that can
be evaluated (and inverted) pointwise, hence this one.

Letters: B batch, K hashed values.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

SPLITS = ("train", "validation", "test")
DEFAULT_SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
# Largest split-key space: keys, digits and sums stay exact in int32 / uint32 arithmetic.
MAX_KEYS = 1 << 24
ROUNDS = 4
_GOLDEN = 0x9E3779B1


def check_split(split: Any) -> str:
  if split not in SPLITS:
    raise ValueError(f"split={split!r}; allowed: {SPLITS}")
  return split


def check_split_fractions(family: str, fractions: Any) -> tuple[float, float, float]:
  """`fractions` as a tuple of 3 positive floats summing to 1, else ValueError naming the field."""
  allowed = "3 positive numbers (train, validation, test) that sum to 1, e.g. (0.8, 0.1, 0.1)"
  try:
    values = tuple(float(f) for f in fractions)
  except (TypeError, ValueError):
    raise ValueError(f"{family}.split_fractions={fractions!r}; allowed: {allowed}") from None
  if len(values) != 3 or not all(math.isfinite(f) and f > 0 for f in values):
    raise ValueError(f"{family}.split_fractions={fractions!r}; allowed: {allowed}")
  if abs(sum(values) - 1.0) > 1e-6:
    raise ValueError(
      f"{family}.split_fractions={fractions!r} sums to {sum(values):.6g}; allowed: {allowed}"
    )
  return values


def key_digits(base: int, available: int) -> int:
  """How many of `available` free digits of `base` form the split key (base**j <= MAX_KEYS)."""
  j = 0
  while j < available and base ** (j + 1) <= MAX_KEYS:
    j += 1
  return j


# ------------------------------------------------------------------------------------------------
# Hashing and the keyed permutation (uint32 arithmetic, wraps modulo 2**32)
# ------------------------------------------------------------------------------------------------


def fmix32(h: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finaliser: a bijective avalanche mix of uint32 values."""
  h = jnp.asarray(h, jnp.uint32)
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def hash_values(v_K: jax.Array) -> jax.Array:
  """uint32 hash of an int vector (position-sensitive); 0 for an empty vector."""
  v_K = jnp.asarray(v_K).astype(jnp.uint32)
  if v_K.shape[-1] == 0:
    return jnp.zeros(v_K.shape[:-1], jnp.uint32)
  pos_K = jnp.arange(v_K.shape[-1], dtype=jnp.uint32)
  mixed_K = fmix32(v_K * jnp.uint32(_GOLDEN) + pos_K * jnp.uint32(0x27D4EB2F) + jnp.uint32(1))
  return fmix32(jnp.sum(mixed_K, axis=-1, dtype=jnp.uint32) + jnp.uint32(v_K.shape[-1]))


def round_keys(seed: int) -> tuple[int, ...]:
  """Fixed Feistel round keys derived from an integer (e.g. a hash of the family name)."""
  rng = np.random.default_rng(seed)
  return tuple(int(k) for k in rng.integers(0, 1 << 32, size=ROUNDS, dtype=np.uint64))


def _half_bits(size: int) -> int:
  return max(1, (max(size - 1, 1).bit_length() + 1) // 2)


def _feistel(x, half, keys, inverse=False):
  mask = jnp.uint32((1 << half) - 1)
  left, right = x >> half, x & mask
  if not inverse:
    for k in keys:
      left, right = right, left ^ (fmix32(right ^ jnp.asarray(k, jnp.uint32)) & mask)
  else:
    for k in reversed(keys):
      left, right = right ^ (fmix32(left ^ jnp.asarray(k, jnp.uint32)) & mask), left
  return (left << half) | right


def permute(
  x: jax.Array, size: Any, keys: Sequence[Any], inverse: bool = False, max_size: int | None = None
) -> jax.Array:
  """A keyed bijection of `[0, size)` applied to `x` (or its inverse); int32 in, int32 out.

  `keys` are Python ints or traced uint32 scalars. `size` is a Python int, or a traced int when
  `max_size` (a Python int >= size) fixes the width of the network.
  """
  half = _half_bits(max_size if max_size is not None else size)
  y = _feistel(jnp.asarray(x).astype(jnp.uint32), half, keys, inverse)
  limit = jnp.asarray(size).astype(jnp.uint32)

  def walk(v):
    return jnp.where(v >= limit, _feistel(v, half, keys, inverse), v)

  y = jax.lax.while_loop(lambda v: jnp.any(v >= limit), walk, y)
  return y.astype(jnp.int32)


# ------------------------------------------------------------------------------------------------
# A level's split-key space
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SplitSpace:
  """The split keys `[0, size)` of one task and the ranges of `pi^-1(key)` per split."""

  family: str
  base: int  # the free digits' base
  digits: int  # how many free digits form `a`
  bounds: tuple  # (0, b_1, b_2, size)
  keys: tuple  # round keys of pi

  @property
  def size(self) -> int:
    return self.bounds[-1]

  def range(self, split: str) -> tuple[int, int]:
    i = SPLITS.index(check_split(split))
    return self.bounds[i], self.bounds[i + 1]

  def num_keys(self, split: str) -> int:
    lo, hi = self.range(split)
    return hi - lo

  def key_of_rank(self, u: jax.Array) -> jax.Array:
    """Split key `pi(u)` of ranks `u` (rank ranges are the splits)."""
    return permute(u, self.size, self.keys)

  def split_index_of_key(self, s: jax.Array) -> jax.Array:
    """int32: 0 train, 1 validation, 2 test, for split keys `s`."""
    u = permute(s, self.size, self.keys, inverse=True)
    b1, b2 = self.bounds[1], self.bounds[2]
    return (u >= b1).astype(jnp.int32) + (u >= b2).astype(jnp.int32)

  def offset(self, s: jax.Array, h: jax.Array) -> jax.Array:
    """The free-digit number `a = (s - h) mod size` that gives key `s` for rest hash `h`."""
    size = jnp.uint32(self.size)
    h_mod = jnp.asarray(h, jnp.uint32) % size
    return ((jnp.asarray(s).astype(jnp.uint32) + size - h_mod) % size).astype(jnp.int32)

  def key(self, a: jax.Array, h: jax.Array) -> jax.Array:
    """Split key `(a + h) mod size` of free-digit number `a` and rest hash `h`."""
    size = jnp.uint32(self.size)
    return ((jnp.asarray(a).astype(jnp.uint32) + jnp.asarray(h, jnp.uint32) % size) % size).astype(
      jnp.int32
    )

  def to_digits(self, a: jax.Array) -> jax.Array:
    """int32 [..., digits]: little-endian base-`base` digits of `a`."""
    powers = jnp.asarray([self.base**i for i in range(self.digits)], jnp.int32)
    return (jnp.asarray(a, jnp.int32)[..., None] // powers) % self.base

  def from_digits(self, d: jax.Array) -> jax.Array:
    powers = jnp.asarray([self.base**i for i in range(self.digits)], jnp.int32)
    return jnp.sum(jnp.asarray(d, jnp.int32) * powers, axis=-1)


def make_space(
  family: str, base: int, available: int, fractions: Sequence[float], seed: int
) -> SplitSpace:
  """The split space of a task with `available` free digits of `base`; errors name the field."""
  digits = key_digits(base, available)
  size = base**digits
  cuts = np.cumsum(fractions)
  bounds = (0, int(round(cuts[0] * size)), int(round(cuts[1] * size)), size)
  for i, split in enumerate(SPLITS):
    if bounds[i + 1] <= bounds[i]:
      raise ValueError(
        f"{family}.split_fractions={tuple(fractions)} leaves split {split!r} empty: this "
        f"level has only {size} split keys ({digits} free digit(s) of base {base}); allowed: "
        f"fractions of at least 1/{size} each, or a level with more free content"
      )
  return SplitSpace(family=family, base=base, digits=digits, bounds=bounds, keys=round_keys(seed))


def family_seed(family: str) -> int:
  """A fixed integer per family name (the permutation differs between families)."""
  return int.from_bytes(family.encode(), "little") % (1 << 63)
