"""The materialised ("naive") EA/DPA reference, and the validation and kernel helpers shared by
every implementation of the package (letters as in the package docstring)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

IMPLEMENTATIONS = (None, "naive", "chunked", "linear", "pallas")
KERNELS = ("rational", "square")
KINDS = ("ea", "dpa")


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


def auto_where_explicit(fn, out_like):
  """fn, run with the current mesh's Explicit axes treated as Auto when it has any.

  Under a mesh with Explicit axes (`jax.make_mesh`'s default) every reshape that merges or splits
  a sharded axis must spell out its result's sharding. The blockwise implementations fold batch
  and heads into one axis and back, and the decode steps write a sharded token into their
  buffers; inside `jax.sharding.auto_axes` the compiler propagates shardings as under an Auto
  mesh instead. The results take the shardings of `out_like`, a pytree shaped like fn's result
  (the query for an output, the given cache or state for the new one). Without Explicit axes
  (no mesh, or an Auto one) fn is returned unchanged.
  """
  mesh = jax.sharding.get_abstract_mesh()
  explicit = tuple(
    name
    for name, axis_type in zip(mesh.axis_names, mesh.axis_types)
    if axis_type == jax.sharding.AxisType.Explicit
  )
  if not explicit:
    return fn
  # Specs, not shardings: an array made without a mesh (a fresh cache's length) has none.
  specs = jax.tree.map(lambda x: jax.typeof(x).sharding.spec, out_like)
  return jax.sharding.auto_axes(fn, axes=explicit, out_sharding=specs)


def check_choice(name, value, allowed):
  if value not in allowed:
    raise ValueError(f"{name}={value!r} is not supported; allowed: {allowed}")


def check_qkv(query, key, value=None):
  """Validates shapes; returns (B, T, S, N, K, H)."""
  if query.ndim != 4:
    raise ValueError(f"query must have rank 4 [B,T,N,H], got shape {query.shape}")
  if key.ndim != 4:
    raise ValueError(f"key must have rank 4 [B,S,K,H], got shape {key.shape}")
  if value is not None:
    if value.ndim != 4:
      raise ValueError(f"value must have rank 4 [B,S,K,H], got shape {value.shape}")
    if value.shape != key.shape:
      raise ValueError(f"value shape {value.shape} must equal key shape {key.shape} ([B,S,K,H])")
  B, T, N, H = query.shape
  Bk, S, K, Hk = key.shape
  if Bk != B:
    raise ValueError(
      f"batch size of key ({Bk}, shape {key.shape}) != batch size of query "
      f"({B}, shape {query.shape})"
    )
  if Hk != H:
    raise ValueError(
      f"head dim of key ({Hk}, shape {key.shape}) != head dim of query ({H}, shape {query.shape})"
    )
  if K == 0 or N % K != 0:
    raise ValueError(
      f"number of query heads N={N} (query shape {query.shape}) must be a multiple "
      f"of the number of key/value heads K={K} (key shape {key.shape})"
    )
  return B, T, S, N, K, H


def check_mask(mask, B, N, T, S):
  """None, or the boolean mask reshaped to rank 4 (each dim 1 or full)."""
  if mask is None:
    return None
  mask = jnp.asarray(mask)
  if mask.dtype != jnp.bool_:
    raise ValueError(f"mask must be boolean (True = may attend), got dtype {mask.dtype}")
  if mask.ndim > 4:
    raise ValueError(f"mask of shape {mask.shape} does not broadcast to [B,N,T,S]={[B, N, T, S]}")
  shape = (1,) * (4 - mask.ndim) + tuple(mask.shape)
  for have, want in zip(shape, (B, N, T, S)):
    if have not in (1, want):
      raise ValueError(f"mask of shape {mask.shape} does not broadcast to [B,N,T,S]={[B, N, T, S]}")
  return mask.reshape(shape)


def check_eps(eps):
  if isinstance(eps, (int, float)) and eps < 0:
    raise ValueError(f"eps must be >= 0, got {eps}")


def compute_dtype(dtype):
  """float32 for bf16/fp16/fp32 inputs, float64 for float64 inputs."""
  return jnp.promote_types(dtype, jnp.float32)


def default_scale(scale, H):
  return 1.0 / float(np.sqrt(H)) if scale is None else scale


# ----------------------------------------------------------------------------------------------
# Masks and kernels
# ----------------------------------------------------------------------------------------------


def grouped_mask(mask_BNTS, K):
  """[b,n,t,s] (each dim 1 or full) -> [b,k,g,t,s] broadcastable to [B,K,G,T,S]."""
  b, n, t, s = mask_BNTS.shape
  if n == 1:
    return mask_BNTS.reshape(b, 1, 1, t, s)
  return mask_BNTS.reshape(b, K, n // K, t, s)


def causal_TS(T, S):
  """Causal mask aligned to the end: query i sits at key position S - T + i."""
  return jnp.arange(S)[None, :] <= (jnp.arange(T)[:, None] + (S - T))


def allowed_BKGTS(mask, is_causal, T, S, K):
  """Combined boolean mask broadcastable to [B,K,G,T,S], or None when everything is allowed."""
  allowed = None
  if mask is not None:
    allowed = grouped_mask(mask, K)
  if is_causal:
    causal = causal_TS(T, S)[None, None, None]
    allowed = causal if allowed is None else jnp.logical_and(allowed, causal)
  return allowed


def ea_kernel(s, kernel):
  """f(s): s^2/(1+s^2) ("rational") or s^2 ("square")."""
  s2 = s * s
  if kernel == "square":
    return s2
  return s2 / (1.0 + s2)


def kernel_and_derivative(s, kernel):
  """(f(s), f'(s))."""
  s2 = s * s
  if kernel == "square":
    return s2, 2.0 * s
  r = 1.0 / (1.0 + s2)
  return s2 * r, 2.0 * s * r * r


def safe_div(num, den):
  """num / den with den == 0 treated as 1 (only reached when num is 0 too)."""
  return num / jnp.where(den == 0, jnp.ones_like(den), den)


# ----------------------------------------------------------------------------------------------
# The materialised reference
# ----------------------------------------------------------------------------------------------


def scores_BKGTS(q_BTNH, k_BSKH, scale, K):
  B, T, N, H = q_BTNH.shape
  q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
  return jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH) * scale


def weights_BKGTS(s_BKGTS, allowed, kind, eps, kernel):
  if kind == "ea":
    f = ea_kernel(s_BKGTS, kernel)
    if allowed is not None:
      f = jnp.where(allowed, f, 0.0)
    z = eps + jnp.sum(f, axis=-1, keepdims=True)
    return safe_div(f, z)
  # DPA: softmax over allowed keys; -inf (not a large finite number) keeps masked gradients at 0.
  if allowed is not None:
    s_BKGTS = jnp.where(allowed, s_BKGTS, -jnp.inf)
  m = jnp.max(s_BKGTS, axis=-1, keepdims=True)
  m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
  p = jnp.exp(s_BKGTS - m)
  return safe_div(p, jnp.sum(p, axis=-1, keepdims=True))


def naive(q, k, v, allowed, kind, scale, eps, kernel):
  """q [B,T,N,H], k/v [B,S,K,H] (compute dtype), allowed [b,k,g,t,s] or None -> [B,T,N,H]."""
  B, T, N, H = q.shape
  K = k.shape[2]
  w = weights_BKGTS(scores_BKGTS(q, k, scale, K), allowed, kind, eps, kernel)
  o_BTKGH = jnp.einsum("bkgts,bskh->btkgh", w, v)
  return o_BTKGH.reshape(B, T, N, H)


def attention_weights(
  query, key, *, kind, mask=None, is_causal=False, scale=None, eps=1e-6, kernel="rational"
):
  """Attention weights w [B,N,T,S] (float32, float64 for float64 inputs).

  Args:
    query: [B,T,N,H].
    key: [B,S,K,H], N % K == 0.
    kind: "ea" or "dpa".
    mask: boolean, broadcastable to [B,N,T,S], True = may attend.
    is_causal: causal mask aligned to the end (query i sits at key position S - T + i).
    scale: multiplies q . k (default 1/sqrt(H)).
    eps: added to the EA row sum.
    kernel: EA kernel, "rational" or "square".

  Returns:
    [B,N,T,S]; rows with no allowed key are all zero.
  """
  check_choice("kind", kind, KINDS)
  check_choice("kernel", kernel, KERNELS)
  check_eps(eps)
  B, T, S, N, K, H = check_qkv(query, key)
  mask = check_mask(mask, B, N, T, S)
  ct = compute_dtype(query.dtype)
  allowed = allowed_BKGTS(mask, is_causal, T, S, K)
  s = scores_BKGTS(query.astype(ct), key.astype(ct), default_scale(scale, H), K)
  w_BKGTS = weights_BKGTS(s, allowed, kind, eps, kernel)
  return w_BKGTS.reshape(B, N, T, S)
