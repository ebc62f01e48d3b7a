"""Causal square-kernel EA in linear time: (q.k)^2 = phi(q) . phi(k) with the F = H(H+1)/2
symmetric features; the exact quadratic form inside a chunk of C tokens, a running state
(sum phi(k) v^T, sum phi(k)) across chunks; `lax.scan` with rematerialisation of each chunk.
Memory: the per-chunk states kept for the backward pass, (T/C) * K * F * H floats per batch row.

Accuracy (measured, benchmarks/attention_exactness.py, table in docs/attention/README.md): the
state contraction phi(q) . sum_j phi(k_j) = q^T (sum_j k_j k_j^T) q has float32 rounding error
~ eps32 * |q|^2 * |sum_j k_j k_j^T| instead of ~ eps32 * the result, so when queries are nearly
orthogonal to the keys (a fraction f of |q| in the keys' span) the relative error grows as
~ eps32 / f^2: about 2e-6 at f = 0.1, 2e-4 at f = 0.01 and 2e-2 at f = 0.001 (T = 2048,
H = 32, chunk 256; twice that at chunk 64, where less of the sum is exact in-chunk work), against
~ eps32 / f for the quadratic forms ("naive", "chunked"). The automatic rule
therefore never picks "linear"; choose it by hand where queries are not that close to orthogonal
to every key. The recurrent decode state (decode.recurrent_step) has the same contraction and
the same bound.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from ea_jax.attention import reference as ref

# Keys per chunk: 256 ran fwd+bwd 10% faster than 64 at T = 8192 (3,975 ms against 4,426 ms,
# B = 8, N = 4, H = 32, side by side on a 2-core AMD EPYC); 128 and 512 were slower than 256 in an
# earlier run (benchmarks/attention.py rows ea_sq_linear, ea_sq_linear_c*).
LINEAR_CHUNK = 256


def check_linear(kind, is_causal, kernel, mask):
  """Raises unless this is causal, mask-free, square-kernel EA."""
  if kind != "ea" or kernel != "square":
    raise ValueError(
      "implementation='linear' needs expressive_attention with kernel='square' "
      f"(got {'dot_product_attention' if kind == 'dpa' else 'kernel=' + repr(kernel)}); "
      "use 'naive' or 'chunked' otherwise"
    )
  if not is_causal:
    raise ValueError(
      "implementation='linear' needs is_causal=True; use 'naive' or 'chunked' "
      "for non-causal attention"
    )
  if mask is not None:
    raise ValueError(
      "implementation='linear' allows no mask (only is_causal=True); pass mask=None "
      "or use 'naive' or 'chunked' for arbitrary masks"
    )


def num_square_features(head_dim):
  """F = H(H+1)/2."""
  return head_dim * (head_dim + 1) // 2


def square_features(x_XH):
  """phi(x) [..., F] with phi(x) . phi(y) = (x . y)^2, F = H(H+1)/2.

  The distinct products x_a x_b (a <= b), grouped by diagonal offset j = b - a: first x_a^2, then
  sqrt(2) x_a x_{a+j} for j = 1..H-1. Slices only (no gathers, no per-element broadcasts), so the
  forward and the backward are each one fused elementwise loop.
  """
  H = x_XH.shape[-1]
  root2 = jnp.asarray(np.sqrt(2.0), x_XH.dtype)
  parts = [x_XH * x_XH]
  for j in range(1, H):
    parts.append((x_XH[..., : H - j] * root2) * x_XH[..., j:])
  return jnp.concatenate(parts, axis=-1)


def linear_causal(q, k, v, scale, eps):
  """Causal square-kernel EA in O(T H^3): q [B,T,N,H], k/v [B,S,K,H] -> [B,T,N,H]."""
  B, T, N, H = q.shape
  S, K = k.shape[1], k.shape[2]
  G = N // K
  F = num_square_features(H)
  q = q * scale
  # Query i sits at key position S - T + i: align queries with keys, zero queries where needed.
  if T >= S:
    q_used = q[:, T - S :]
  else:
    q_used = jnp.pad(q, ((0, 0), (S - T, 0), (0, 0), (0, 0)))
  C = min(LINEAR_CHUNK, S)
  L = -(-S // C)
  pad = ((0, 0), (0, L * C - S), (0, 0), (0, 0))
  q_LBKRH = jnp.pad(q_used, pad).reshape(B, L, C, K, G, H).transpose(1, 0, 3, 2, 4, 5)
  q_LBKRH = q_LBKRH.reshape(L, B, K, C * G, H)  # rows ordered (c, g)
  k_LBKCH = jnp.pad(k, pad).reshape(B, L, C, K, H).transpose(1, 0, 3, 2, 4)
  v_LBKCH = jnp.pad(v, pad).reshape(B, L, C, K, H).transpose(1, 0, 3, 2, 4)
  causal_RC = jnp.arange(C)[None, :] <= (jnp.arange(C * G) // G)[:, None]

  def step(carry, chunk):
    kv_BKFH, z_BKF = carry
    q_BKRH, k_BKCH, v_BKCH = chunk
    phi_q = square_features(q_BKRH)
    num = checkpoint_name(jnp.einsum("bkrf,bkfh->bkrh", phi_q, kv_BKFH), "num")
    den = jnp.maximum(checkpoint_name(jnp.einsum("bkrf,bkf->bkr", phi_q, z_BKF), "den"), 0.0)
    s = jnp.einsum("bkrh,bkch->bkrc", q_BKRH, k_BKCH)
    f = jnp.where(causal_RC, s * s, 0.0)
    num = num + jnp.einsum("bkrc,bkch->bkrh", f, v_BKCH)
    den = den + jnp.sum(f, axis=-1)
    o = ref.safe_div(num, (eps + den)[..., None])
    phi_k = square_features(k_BKCH)
    kv_BKFH = kv_BKFH + jnp.einsum("bkcf,bkch->bkfh", phi_k, v_BKCH)
    z_BKF = z_BKF + jnp.sum(phi_k, axis=2)
    return (kv_BKFH, z_BKF), o

  # Rematerialise each chunk in the backward pass, except the inter-chunk reads (O(T H) to keep).
  step = jax.checkpoint(step, policy=jax.checkpoint_policies.save_only_these_names("num", "den"))
  init = (jnp.zeros((B, K, F, H), q.dtype), jnp.zeros((B, K, F), q.dtype))
  _, o_LBKRH = jax.lax.scan(step, init, (q_LBKRH, k_LBKCH, v_LBKCH))
  o = o_LBKRH.reshape(L, B, K, C, G, H).transpose(1, 0, 3, 2, 4, 5).reshape(B, L * C, N, H)[:, :S]
  if T >= S:
    return jnp.pad(o, ((0, 0), (T - S, 0), (0, 0), (0, 0)))
  return o[:, S - T :]
