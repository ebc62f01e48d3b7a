"""Shared pieces of every task family: the Batch type, the next-token layout, jitted sampling and
field validation.

Layout (all families): a task draws a token sequence `x_BT` with T = L + 1 and returns
`inputs = x[:, :-1]`, `targets = x[:, 1:]` (so `inputs[t + 1] == targets[t]`), and
`weights[t] = 1.0` only where `targets[t]` is determined by `inputs[: t + 1]` and the task's fixed
description, so 100% accuracy is reachable (each family documents which positions it scores).

A task is a frozen, hashable dataclass (its fields are the family's dials); `task.sample(rng,
batch_size)` is pure, a function of the key alone, and can be called inside or outside `jax.jit`.

Letters: B batch, L sequence length (= task.seq_len), T = L + 1 drawn tokens.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Batch(NamedTuple):
  inputs: jax.Array   # int32 [B, L]
  targets: jax.Array  # int32 [B, L]
  weights: jax.Array  # float32 [B, L], 1.0 where the target is determined by the inputs so far


def next_token_batch(x_BT: jax.Array, scored_BL: jax.Array) -> Batch:
  """Splits sequences `x_BT` into the next-token layout; `scored_BL` marks targets x[:, 1:]."""
  x_BT = x_BT.astype(jnp.int32)
  return Batch(inputs=x_BT[:, :-1], targets=x_BT[:, 1:], weights=scored_BL.astype(jnp.float32))


@functools.partial(jax.jit, static_argnums=(0, 2))
def _jitted_sample(task, rng, batch_size):
  return task._sample(rng, batch_size)  # pylint: disable=protected-access


class TaskBase:
  """Mixin for task dataclasses: subclasses define `family`, `vocab_size`, `seq_len`, `_sample`."""

  family: str = ""

  def sample(self, rng: jax.Array, batch_size: int) -> Batch:
    """Draws `batch_size` sequences; pure and jit-able (`batch_size` must be static)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
      raise ValueError(f"batch_size={batch_size!r}; allowed: a positive Python int")
    return _jitted_sample(self, rng, batch_size)

  def _sample(self, rng: jax.Array, batch_size: int) -> Batch:
    raise NotImplementedError


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
    raise ValueError(f"unknown field(s) {unknown} for task family {family!r}; allowed fields: "
                     f"{known} (plus 'name', 'complexity', 'label')")
  return cls(**fields)


def distinct_indices(rng: jax.Array, batch_size: int, n: int, m: int) -> jax.Array:
  """int32 [B, m]: per row, m distinct values from 0..n-1 in random order."""
  u_BN = jax.random.uniform(rng, (batch_size, n))
  return jnp.argsort(u_BN, axis=1)[:, :m].astype(jnp.int32)
