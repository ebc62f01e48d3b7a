"""Expressive attention (EA) and dot-product attention (DPA) as pure JAX functions.

EA weights:  w_ij = f(s_ij) / (eps + sum_{l allowed} f(s_il)),  s_ij = scale * q_i . k_j,
             f(s) = s^2 / (1 + s^2) (kernel="rational", default) or f(s) = s^2 (kernel="square").
DPA weights: w_ij = softmax_j(s_ij) over the allowed keys.
Masks are applied *after* the kernel; a query row with no allowed key outputs zeros.

Letters used in array names:
  B batch            T query length        S key/value length
  N query heads      K key/value heads     G = N // K query heads per key/value head
  H head dimension   F = H(H+1)/2 symmetric square features (q (x) q without duplicates)
  C block (chunk) length: query rows of a block and keys of a key block
  L number of query blocks                 M number of key blocks
  R = C * G rows of a block (its G heads folded in)
  X = B * K (batch and key/value head flattened)
  h heads processed together in one sequential step of "chunked"

Modules (one implementation each; no project imports, the Pallas path imports ea_jax.kernels
lazily):
  reference  the materialised ("naive") reference, attention_weights, shared validation/kernels
  chunked    blockwise with a custom VJP, memory linear in T
  linear     causal square-kernel feature form (documents its accuracy bound)
  decode     KV cache and the constant-size recurrent state

Sharding: inputs may be sharded over a mesh (batch, heads). Under a mesh with Explicit axes
(`jax.make_mesh`'s default) "naive", "chunked", "linear" and the decode steps run with those
axes treated as Auto (`reference.auto_where_explicit`: their reshapes fold sharded batch and
head axes together) and return the query's sharding; a decode step's new cache or state keeps
the given one's. The "pallas" path is called as it is (untested under Explicit axes).

Public API (see DESIGN.md, "Contracts: Attention"):
  dot_product_attention, expressive_attention, attention_weights, choose_implementation,
  KVCache, init_kv_cache, kv_cache_step,
  RecurrentState, init_recurrent_state, recurrent_step,
  IMPLEMENTATIONS, KERNELS, KINDS.
"""

from __future__ import annotations

import jax

from ea_jax.attention import chunked, decode, linear, reference  # noqa: F401 (public submodules)
from ea_jax.attention.decode import (
  KVCache,
  RecurrentState,
  init_kv_cache,
  init_recurrent_state,
  kv_cache_step,
  recurrent_step,
)
from ea_jax.attention.linear import num_square_features, square_features
from ea_jax.attention.reference import IMPLEMENTATIONS, KERNELS, KINDS, attention_weights, ea_kernel

__all__ = [
  "IMPLEMENTATIONS",
  "KERNELS",
  "KINDS",
  "KVCache",
  "RecurrentState",
  "attention_weights",
  "choose_implementation",
  "dot_product_attention",
  "ea_kernel",
  "expressive_attention",
  "init_kv_cache",
  "init_recurrent_state",
  "kv_cache_step",
  "num_square_features",
  "recurrent_step",
  "square_features",
]


# ----------------------------------------------------------------------------------------------
# The automatic rule
# ----------------------------------------------------------------------------------------------

AUTO_ACCEL_NAIVE_MAX_SCORES = 1 << 20  # GPU/TPU: "naive" while T * S is at most this


def choose_implementation(kind, *, T, S, H, is_causal, has_mask, kernel="rational", backend=None):
  """The implementation=None rule (backend defaults to jax.default_backend()).

  Only implementations that agree with float64 to float32 rounding (relative error ~ eps32 / f
  on queries with a fraction f of their norm in the keys' span, docs/attention/README.md) are
  chosen: "linear" never is, since its error grows as eps32 / f^2 (4e-4 at f = 0.01, T = 2048,
  H = 32, above the 1e-4 the rule must keep); choose it by hand.
    CPU (never "pallas"): "chunked", faster than "naive" at every measured size (blocks of
      scores stay in cache; the backward recomputes them instead of reading a materialised
      [B,N,T,S] array).
    GPU/TPU: mask-free EA (causal or not) goes to the fused "pallas" kernel; DPA and masked EA
      use "naive" while T * S <= AUTO_ACCEL_NAIVE_MAX_SCORES and "chunked" beyond (memory).
  """
  del H, is_causal, kernel
  reference.check_choice("kind", kind, KINDS)
  backend = jax.default_backend() if backend is None else backend
  if backend in ("gpu", "tpu"):
    if kind == "ea" and not has_mask:
      return "pallas"
    return "naive" if T * S <= AUTO_ACCEL_NAIVE_MAX_SCORES else "chunked"
  return "chunked"


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------


def _attention(kind, query, key, value, mask, is_causal, scale, eps, kernel, implementation):
  reference.check_choice("implementation", implementation, IMPLEMENTATIONS)
  reference.check_choice("kernel", kernel, KERNELS)
  reference.check_eps(eps)
  B, T, S, N, K, H = reference.check_qkv(query, key, value)
  mask = reference.check_mask(mask, B, N, T, S)
  scale = reference.default_scale(scale, H)
  if implementation is None:
    implementation = choose_implementation(
      kind, T=T, S=S, H=H, is_causal=is_causal, has_mask=mask is not None, kernel=kernel
    )
  if implementation == "linear":
    linear.check_linear(kind, is_causal, kernel, mask)
  if implementation == "pallas":
    if kind != "ea":
      raise ValueError(
        "implementation='pallas' is only available for expressive_attention; "
        "for dot_product_attention use None, 'naive' or 'chunked'"
      )
    try:
      from ea_jax.kernels import pallas_attention  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(
        "implementation='pallas' needs ea_jax.kernels.pallas_attention, which could "
        f"not be imported ({e}); use implementation=None, 'naive' or 'chunked'"
      ) from e
    return pallas_attention.expressive_attention_pallas(
      query, key, value, mask=mask, is_causal=is_causal, scale=scale, eps=eps, kernel=kernel
    )

  ct = reference.compute_dtype(query.dtype)

  def run(query, key, value, mask):
    q, k, v = query.astype(ct), key.astype(ct), value.astype(ct)
    if implementation == "naive":
      allowed = reference.allowed_BKGTS(mask, is_causal, T, S, K)
      out = reference.naive(q, k, v, allowed, kind, scale, eps, kernel)
    elif implementation == "chunked":
      out = chunked.chunked(q, k, v, mask, is_causal, kind, scale, eps, kernel)
    else:
      out = linear.linear_causal(q, k, v, scale, eps)
    return out.astype(query.dtype)

  # The output has the query's sharding, under an Explicit mesh too.
  return reference.auto_where_explicit(run, query)(query, key, value, mask)


def dot_product_attention(
  query, key, value, *, mask=None, is_causal=False, scale=None, implementation=None
):
  """Softmax attention. query [B,T,N,H], key/value [B,S,K,H] -> [B,T,N,H] (query dtype).

  implementation: None (auto, see `choose_implementation`), "naive" or "chunked".
  """
  if implementation == "linear":
    raise ValueError(
      "implementation='linear' is only available for expressive_attention with "
      "kernel='square'; for dot_product_attention use None, 'naive' or 'chunked'"
    )
  return _attention(
    "dpa", query, key, value, mask, is_causal, scale, 0.0, "rational", implementation
  )


def expressive_attention(
  query,
  key,
  value,
  *,
  mask=None,
  is_causal=False,
  scale=None,
  eps=1e-6,
  kernel="rational",
  implementation=None,
):
  """Expressive attention. query [B,T,N,H], key/value [B,S,K,H] -> [B,T,N,H] (query dtype).

  kernel: "rational" (s^2/(1+s^2)) or "square" (s^2). implementation: None (auto, see
  `choose_implementation`), "naive", "chunked", "linear" (square kernel, causal, no mask; its
  float32 error grows as eps32 / f^2 for queries nearly orthogonal to the keys, see
  ea_jax.attention.linear) or "pallas" (ea_jax.kernels.pallas_attention).
  """
  return _attention("ea", query, key, value, mask, is_causal, scale, eps, kernel, implementation)
