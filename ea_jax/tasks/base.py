"""Shared pieces of every task family: the Batch type, the next-token layout, split-aware jitted
sampling and field validation.

Layout (all families): a task draws a token sequence `x_T` with T = L + 1 and returns
`inputs = x[:, :-1]`, `targets = x[:, 1:]` (so `inputs[t + 1] == targets[t]`), and
`weights[t] = 1.0` only where `targets[t]` is determined by `inputs[: t + 1]` and the task's fixed
description, so 100% accuracy is reachable (each family documents which positions it scores).

A task is a frozen, hashable dataclass (its fields are the family's dials, plus
`split_fractions`); `task.sample(rng, batch_size, split="train")` is pure, a function of
(key, split) alone, and can be called inside or outside `jax.jit`. The splits are disjoint by
construction (`ea_jax.tasks.splits`): each family implements, for one sequence,
  `_num_bits()`                            uint32 random words it consumes per sequence;
  `_sequence(bits_W, s) -> (x_T, scored_L)`  a sequence from those words whose split key is `s`;
  `_split_key(x_T) -> s`                   the split key read back from a sequence;
  `_free_digits() -> (base, count)`        its free digits;
  `num_sequences(split)`                   distinct sequences of a split.

Letters: B batch, L sequence length (= task.seq_len), T = L + 1 drawn tokens.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ea_jax.tasks import splits as splits_lib


class Batch(NamedTuple):
  inputs: jax.Array  # int32 [B, L]
  targets: jax.Array  # int32 [B, L]
  weights: jax.Array  # float32 [B, L], 1.0 where the target is determined by the inputs so far


def next_token_batch(x_BT: jax.Array, scored_BL: jax.Array) -> Batch:
  """Splits sequences `x_BT` into the next-token layout; `scored_BL` marks targets x[:, 1:]."""
  x_BT = x_BT.astype(jnp.int32)
  return Batch(inputs=x_BT[:, :-1], targets=x_BT[:, 1:], weights=scored_BL.astype(jnp.float32))


def _check_batch_size(batch_size):
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size={batch_size!r}; allowed: a positive Python int")


# The split's rank range [lo, hi) is traced, so one compiled program serves all three splits.
@functools.partial(jax.jit, static_argnums=(0, 2))
def _jitted_sample(task, rng, batch_size, lo, hi):
  return task._sample_range(rng, batch_size, lo, hi)  # pylint: disable=protected-access


@functools.partial(jax.jit, static_argnums=(0,))
def _jitted_sample_distinct(task, rng, index_B, lo, hi):
  return task._sample_distinct_range(rng, index_B, lo, hi)  # pylint: disable=protected-access


class TaskBase:
  """Mixin for task dataclasses: subclasses define `family`, `vocab_size`, `seq_len`,
  `split_fractions` (a dataclass field) and the per-sequence hooks listed in the module doc."""

  family: str = ""

  # ---------------------------------------------------------------------------------------------
  # Splits
  # ---------------------------------------------------------------------------------------------

  @functools.cached_property
  def split_space(self) -> splits_lib.SplitSpace:
    """The split keys of this task (built once per task object)."""
    base, count = self._free_digits()
    return splits_lib.make_space(
      self.family, base, count, self.split_fractions, splits_lib.family_seed(self.family)
    )

  def num_split_keys(self, split: str) -> int:
    """Distinct split keys of `split`: the most sequences `sample_distinct` can draw from it."""
    return self.split_space.num_keys(split)

  def num_sequences(self, split: str) -> int:
    """Distinct sequences of `split` (exact unless the family documents a lower bound)."""
    raise NotImplementedError

  def num_sequences_is_exact(self, split: str) -> bool:
    """Whether `num_sequences(split)` is exact (else a lower bound)."""
    del split
    return True

  def split_of(self, x_BT: jax.Array) -> jax.Array:
    """int32 [B]: the split index (0 train, 1 validation, 2 test) of each sequence x_BT [B, L+1]."""
    s_B = jax.vmap(self._split_key)(jnp.asarray(x_BT, jnp.int32))
    return self.split_space.split_index_of_key(s_B)

  # ---------------------------------------------------------------------------------------------
  # Sampling
  # ---------------------------------------------------------------------------------------------

  def sample(self, rng: jax.Array, batch_size: int, split: str = "train") -> Batch:
    """Draws `batch_size` sequences of `split`, i.i.d.; pure and jit-able (`batch_size` and
    `split` must be static)."""
    _check_batch_size(batch_size)
    lo, hi = self.split_space.range(split)
    return _jitted_sample(self, rng, batch_size, np.int32(lo), np.int32(hi))

  def sample_distinct(self, rng: jax.Array, index_B: jax.Array, split: str = "train") -> Batch:
    """Row i is the sequence number `index_B[i]` of a fixed enumeration of `num_split_keys(split)`
    sequences of `split` that `rng` defines: distinct indices give distinct sequences, and a row
    depends only on (rng, index, split), not on the rest of the batch. Jit-able (`split` static)."""
    lo, hi = self.split_space.range(split)
    index_B = jnp.asarray(index_B, jnp.int32)
    if index_B.ndim != 1:
      raise ValueError(f"index_B has shape {index_B.shape}; allowed: a vector of indices")
    return _jitted_sample_distinct(self, rng, index_B, np.int32(lo), np.int32(hi))

  def _build(self, bits_BW, s_B) -> Batch:
    x_BT, scored_BL = jax.vmap(self._sequence)(bits_BW, s_B)
    return next_token_batch(x_BT, scored_BL)

  def _sample_range(self, rng, batch_size, lo, hi):
    # One draw of random bits for the whole batch (one threefry instance: it dominates the
    # compile time of a sampler); column 0 picks the rank inside the split.
    bits_BW = jax.random.bits(rng, (batch_size, 1 + self._num_bits()), jnp.uint32)
    u_B = lo + uniform_ints(bits_BW[:, 0], hi - lo)
    return self._build(bits_BW[:, 1:], self.split_space.key_of_rank(u_B))

  def _sample_distinct_range(self, rng, index_B, lo, hi):
    space = self.split_space
    k_order, k_rows = jax.random.split(rng)
    order_keys = tuple(jax.random.bits(k_order, (splits_lib.ROUNDS,), jnp.uint32))
    u_B = lo + splits_lib.permute(index_B, hi - lo, order_keys, max_size=space.size)
    bits_BW = jax.vmap(
      lambda i: jax.random.bits(jax.random.fold_in(k_rows, i), (self._num_bits(),), jnp.uint32)
    )(index_B)
    return self._build(bits_BW, space.key_of_rank(u_B))

  # Family hooks.
  def _free_digits(self) -> tuple[int, int]:
    raise NotImplementedError

  def _num_bits(self) -> int:
    """How many uint32 words of random bits `_sequence` consumes per sequence."""
    raise NotImplementedError

  def _sequence(self, bits_W, s):
    raise NotImplementedError

  def _split_key(self, x_T):
    raise NotImplementedError


def split_fractions_field():
  """The `split_fractions` dataclass field every family declares (default 80/10/10)."""
  return dataclasses.field(default=splits_lib.DEFAULT_SPLIT_FRACTIONS)


def finish(task, family: str, values: Mapping[str, Any]) -> None:
  """Stores validated dial values and the checked `split_fractions` on a frozen task, then builds
  its split space (so that a split left empty is refused at construction)."""
  for name, value in values.items():
    object.__setattr__(task, name, value)
  object.__setattr__(
    task, "split_fractions", splits_lib.check_split_fractions(family, task.split_fractions)
  )
  _ = task.split_space  # built now, so that a split left empty is refused here


# ------------------------------------------------------------------------------------------------
# Validation helpers (errors name the family, the field and what is allowed)
# ------------------------------------------------------------------------------------------------


def check_int(family: str, field: str, value: Any, lo: int, hi: int | None = None) -> int:
  """`value` as a Python int in [lo, hi] (hi None = unbounded), else ValueError naming `field`."""
  allowed = f"an integer in [{lo}, {hi}]" if hi is not None else f"an integer >= {lo}"
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{family}.{field}={value!r}; allowed: {allowed}")
  value = int(value)
  if value < lo or (hi is not None and value > hi):
    raise ValueError(f"{family}.{field}={value!r}; allowed: {allowed}")
  return value


def check_bool(family: str, field: str, value: Any) -> bool:
  if not isinstance(value, bool):
    raise ValueError(f"{family}.{field}={value!r}; allowed: True or False")
  return value


def build(cls, family: str, fields: Mapping[str, Any]):
  """`cls(**fields)` after rejecting fields that `cls` does not know (typos must not pass)."""
  known = [f.name for f in dataclasses.fields(cls) if f.init]
  unknown = sorted(set(fields) - set(known))
  if unknown:
    raise ValueError(
      f"unknown field(s) {unknown} for task family {family!r}; allowed fields: "
      f"{known} (plus 'name', 'complexity', 'label')"
    )
  return cls(**fields)


# Per-sequence randomness comes as uint32 words (`jax.random.bits`); these turn words into draws.


def uniform_ints(bits: jax.Array, n) -> jax.Array:
  """int32 in [0, n) from uint32 words: `bits mod n` (bias below n / 2**32, e.g. 1e-8 at n = 40)."""
  return (bits % jnp.asarray(n).astype(jnp.uint32)).astype(jnp.int32)


def distinct_indices(bits_N: jax.Array, m: int) -> jax.Array:
  """int32 [m]: m distinct values from 0..n-1 in random order (n = len(bits_N)): the first m of
  the permutation that sorts n random words (ties, probability < n**2 / 2**33, keep index order)."""
  return jnp.argsort(bits_N)[:m].astype(jnp.int32)
