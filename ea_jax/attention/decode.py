"""One-token decoding: the KV cache (EA and DPA) and the constant-size recurrent state of
square-kernel EA (its accuracy bound is that of linear.py, see there)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ea_jax.attention import linear
from ea_jax.attention import reference as ref


class KVCache(NamedTuple):
  """Keys/values of the tokens seen so far; positions >= length are unused.

  `overflowed` (bool []) becomes True, and stays True, once a step was asked to append a token
  to a full cache under jit (see kv_cache_step); it defaults to False for caches built by hand.
  """

  key: jax.Array  # [B,Smax,K,H]
  value: jax.Array  # [B,Smax,K,H]
  length: jax.Array  # int32 []
  overflowed: jax.Array | bool = False


def init_kv_cache(batch_size, max_len, num_kv_heads, head_dim, dtype=jnp.float32):
  """An empty KVCache with room for max_len tokens."""
  shape = (batch_size, max_len, num_kv_heads, head_dim)
  return KVCache(
    jnp.zeros(shape, dtype),
    jnp.zeros(shape, dtype),
    jnp.zeros((), jnp.int32),
    jnp.zeros((), jnp.bool_),
  )


def kv_cache_step(
  cache, query_B1NH, key_B1KH, value_B1KH, *, kind, scale=None, eps=1e-6, kernel="rational"
):
  """Appends one token at position cache.length and attends causally over positions <= length.

  Past the cache's end: when `cache.length` is concrete (outside jit), a full cache raises
  ValueError. Under jit a full cache is not written to: the token is dropped (key, value and
  length stay as they were), the output attends over the max_len cached tokens only, and the
  returned cache has `overflowed=True` (sticky), which the caller checks after the loop.

  Returns:
    (out [B,1,N,H] in the query dtype, new cache).
  """
  ref.check_choice("kind", kind, ref.KINDS)
  ref.check_choice("kernel", kernel, ref.KERNELS)
  ref.check_eps(eps)
  B, T, S, N, K, H = ref.check_qkv(query_B1NH, cache.key, cache.value)
  if T != 1 or key_B1KH.shape != (B, 1, K, H) or value_B1KH.shape != (B, 1, K, H):
    raise ValueError(
      f"kv_cache_step takes one token: query [B,1,N,H], key/value [B,1,K,H] "
      f"matching the cache {cache.key.shape}; got query {query_B1NH.shape}, "
      f"key {key_B1KH.shape}, value {value_B1KH.shape}"
    )
  if not isinstance(cache.length, jax.core.Tracer) and int(cache.length) >= S:
    raise ValueError(f"KVCache is full: length {int(cache.length)} >= max_len {S}")

  def step(cache, query_B1NH, key_B1KH, value_B1KH):
    full = cache.length >= S
    pos = jnp.minimum(cache.length, S - 1)
    zero = jnp.zeros((), jnp.int32)

    def write(buf, x):
      x = jnp.where(
        full, jax.lax.dynamic_slice(buf, (zero, pos, zero, zero), x.shape), x.astype(buf.dtype)
      )
      return jax.lax.dynamic_update_slice(buf, x, (zero, pos, zero, zero))

    new_k, new_v = write(cache.key, key_B1KH), write(cache.value, value_B1KH)
    ct = ref.compute_dtype(query_B1NH.dtype)
    allowed = (jnp.arange(S) <= pos)[None, None, None, None, :]
    out = ref.naive(
      query_B1NH.astype(ct),
      new_k.astype(ct),
      new_v.astype(ct),
      allowed,
      kind,
      ref.default_scale(scale, H),
      eps if kind == "ea" else 0.0,
      kernel,
    )
    new_length = jnp.where(full, cache.length, cache.length + 1).astype(jnp.int32)
    overflowed = jnp.logical_or(jnp.asarray(cache.overflowed, jnp.bool_), full)
    return out.astype(query_B1NH.dtype), KVCache(new_k, new_v, new_length, overflowed)

  # Under an Explicit mesh: the output takes the query's sharding, the new cache the given one's.
  step = ref.auto_where_explicit(step, (query_B1NH, cache))
  return step(cache, query_B1NH, key_B1KH, value_B1KH)


class RecurrentState(NamedTuple):
  """Square-kernel EA state: kv = sum_j phi(k_j) v_j^T [B,K,F,H], z = sum_j phi(k_j) [B,K,F]."""

  kv: jax.Array
  z: jax.Array


def init_recurrent_state(batch_size, num_kv_heads, head_dim, dtype=jnp.float32):
  """Zero state for square-kernel EA decoding; its size does not depend on sequence length."""
  F = linear.num_square_features(head_dim)
  return RecurrentState(
    jnp.zeros((batch_size, num_kv_heads, F, head_dim), dtype),
    jnp.zeros((batch_size, num_kv_heads, F), dtype),
  )


def recurrent_step(state, query_B1NH, key_B1KH, value_B1KH, *, scale=None, eps=1e-6):
  """One causal square-kernel EA step: adds the token to the state, then reads it with the query.

  Accuracy (measured, docs/attention/README.md): the read phi(q) . state has the float32 error of
  linear.py's state contraction, ~ eps32 * (sum_a |q_a k_a|)^2 / (q . k)^2 relative, i.e.
  ~ eps32 / f^2 for queries with a fraction f of their norm in the keys' span. Unlike "linear",
  which computes each chunk's own 64 keys exactly, every key goes through the state, so the worst
  rows are the first ones (few keys, small q . k): at T = 512, H = 32 about 3e-4 at f = 0.1 (the
  first 64 rows; 1e-5 after them), 1e-2 at f = 0.01 (T = 2048). Neumaier-compensated summation
  of the state was tried and changed nothing: the error is in the read, not in the sums.

  Returns:
    (out [B,1,N,H] in the query dtype, new state).
  """
  ref.check_eps(eps)
  B, T, S, N, K, H = ref.check_qkv(query_B1NH, key_B1KH, value_B1KH)
  F = linear.num_square_features(H)
  if T != 1 or S != 1:
    raise ValueError(
      f"recurrent_step takes one token: query [B,1,N,H], key/value [B,1,K,H]; got "
      f"query {query_B1NH.shape}, key {key_B1KH.shape}"
    )
  if state.kv.shape != (B, K, F, H) or state.z.shape != (B, K, F):
    raise ValueError(
      f"state shapes kv {state.kv.shape}, z {state.z.shape} do not match "
      f"[B,K,F,H]={[B, K, F, H]} and [B,K,F]={[B, K, F]} for query {query_B1NH.shape}"
    )
  ct = state.kv.dtype
  scale = ref.default_scale(scale, H)

  def step(state, query_B1NH, key_B1KH, value_B1KH):
    phi_k_BKF = linear.square_features(key_B1KH[:, 0].astype(ct))
    kv = state.kv + phi_k_BKF[..., None] * value_B1KH[:, 0].astype(ct)[:, :, None, :]
    z = state.z + phi_k_BKF
    q_BKGH = query_B1NH[:, 0].astype(ct).reshape(B, K, N // K, H) * scale
    phi_q_BKGF = linear.square_features(q_BKGH)
    num_BKGH = jnp.einsum("bkgf,bkfh->bkgh", phi_q_BKGF, kv)
    den_BKG = eps + jnp.maximum(jnp.einsum("bkgf,bkf->bkg", phi_q_BKGF, z), 0.0)
    out = ref.safe_div(num_BKGH, den_BKG[..., None]).reshape(B, 1, N, H)
    return out.astype(query_B1NH.dtype), RecurrentState(kv, z)

  # Under an Explicit mesh: the output takes the query's sharding, the new state the given one's.
  step = ref.auto_where_explicit(step, (query_B1NH, state))
  return step(state, query_B1NH, key_B1KH, value_B1KH)
