"""Elementwise EA score kernels and the causal block arithmetic shared by the Pallas kernels.

Expressive attention weighs key j for query i by f(s_ij), s_ij = scale * q_i . k_j:
  "rational": f(s) = s^2 / (1 + s^2)      f'(s) = 2 s / (1 + s^2)^2
  "square":   f(s) = s^2                  f'(s) = 2 s
Both satisfy f(0) = f'(0) = 0: a zero-padded key (k_j = 0) gives s = 0 and contributes nothing
to any sum, which is what lets the kernels pad sequence lengths with zeros without masking.

Causal attention is aligned to the end (as in jax.nn.dot_product_attention): with T queries and
S keys, query row i may attend key column j iff j <= i + offset, offset = S - T.
All block helpers take and return int32 scalars (program ids) and work inside kernels and
index maps alike.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from ea_jax.attention.reference import KERNELS  # the one list of kernel names


def score(s, kernel: str):
  """f(s), elementwise, same shape and dtype as s (float32 in the kernels)."""
  s2 = s * s
  if kernel == "rational":
    return s2 / (1.0 + s2)
  if kernel == "square":
    return s2
  raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")


def score_grad(s, kernel: str):
  """f'(s), elementwise."""
  if kernel == "rational":
    d = 1.0 + s * s
    return (2.0 * s) / (d * d)
  if kernel == "square":
    return 2.0 * s
  raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")


def safe_reciprocal(d):
  """1/d where d > 0, else 0 (rows with nothing allowed and eps = 0 output zeros, not NaN)."""
  return jnp.where(d > 0.0, 1.0 / jnp.where(d > 0.0, d, 1.0), 0.0)


def _clip(x, lo, hi):
  return jnp.minimum(jnp.maximum(x, lo), hi)


def key_blocks_needed(q_block, *, block_q: int, block_k: int, offset: int, num_k_blocks: int):
  """Number of leading key blocks that query block `q_block` may attend (causal upper bound).

  The last row of the block, (q_block + 1) * block_q - 1, sees columns <= that row + offset.
  """
  last_col = (q_block + 1) * block_q - 1 + offset
  return _clip(lax.div(jnp.maximum(last_col, -1) + block_k, block_k), 0, num_k_blocks)


def key_blocks_unmasked(q_block, *, block_q: int, block_k: int, offset: int, num_k_blocks: int):
  """Number of leading key blocks that every row of query block `q_block` fully attends.

  Block kb is fully visible iff its last column (kb + 1) * block_k - 1 <= first row + offset.
  """
  first_col_bound = q_block * block_q + offset + 1
  return _clip(lax.div(jnp.maximum(first_col_bound, 0), block_k), 0, num_k_blocks)


def first_query_block(k_block, *, block_q: int, block_k: int, offset: int, num_q_blocks: int):
  """First query block with a row that may attend some column of key block `k_block`.

  Row i sees column k_block * block_k iff i >= k_block * block_k - offset.
  """
  first_row = k_block * block_k - offset
  return _clip(lax.div(jnp.maximum(first_row, 0), block_q), 0, num_q_blocks)


def first_unmasked_query_block(
  k_block, *, block_q: int, block_k: int, offset: int, num_q_blocks: int
):
  """First query block from which on every row attends every column of key block `k_block`.

  Needs first row q_block * block_q >= (k_block + 1) * block_k - 1 - offset.
  """
  need_row = (k_block + 1) * block_k - 1 - offset
  return _clip(lax.div(jnp.maximum(need_row, 0) + block_q - 1, block_q), 0, num_q_blocks)


def causal_allowed(q_block, k_block, *, block_q: int, block_k: int, offset: int):
  """Bool [block_q, block_k]: column <= row + offset for the given blocks."""
  rows = q_block * block_q + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)
  cols = k_block * block_k + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
  return cols <= rows + offset
