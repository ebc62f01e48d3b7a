"""Expressive attention (EA) and dot-product attention (DPA) as pure JAX functions.

EA weights:  w_ij = f(s_ij) / (eps + sum_{l allowed} f(s_il)),  s_ij = scale * q_i . k_j,
             f(s) = s^2 / (1 + s^2) (kernel="rational", default) or f(s) = s^2 (kernel="square").
DPA weights: w_ij = softmax_j(s_ij) over the allowed keys.
Masks are applied *after* the kernel; a query row with no allowed key outputs zeros.

Letters used in array names:
  B batch            T query length        S key/value length
  N query heads      K key/value heads     G = N // K query heads per key/value head
  H head dimension   F = H(H+1)/2 symmetric square features (q (x) q without duplicates)
  C chunk length     L number of chunks    R = C * G rows of a chunk (its G heads folded in)
  X = B * K (batch and key/value head flattened)     P keys visible to a chunk (its prefix)
  h heads processed together in one sequential step of "chunked"

Public API (see DESIGN.md, "Contracts: Attention"):
  dot_product_attention, expressive_attention, attention_weights,
  KVCache, init_kv_cache, kv_cache_step,
  RecurrentState, init_recurrent_state, recurrent_step.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp
import numpy as np

IMPLEMENTATIONS = (None, "naive", "chunked", "linear", "pallas")
KERNELS = ("rational", "square")
KINDS = ("ea", "dpa")


# ----------------------------------------------------------------------------------------------
# Validation and layout helpers
# ----------------------------------------------------------------------------------------------


def _check_choice(name, value, allowed):
  if value not in allowed:
    raise ValueError(f"{name}={value!r} is not supported; allowed: {allowed}")


def _check_qkv(query, key, value=None):
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
    raise ValueError(f"batch size of key ({Bk}, shape {key.shape}) != batch size of query "
                     f"({B}, shape {query.shape})")
  if Hk != H:
    raise ValueError(f"head dim of key ({Hk}, shape {key.shape}) != head dim of query "
                     f"({H}, shape {query.shape})")
  if K == 0 or N % K != 0:
    raise ValueError(f"number of query heads N={N} (query shape {query.shape}) must be a multiple "
                     f"of the number of key/value heads K={K} (key shape {key.shape})")
  return B, T, S, N, K, H


def _check_mask(mask, B, N, T, S):
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


def _check_eps(eps):
  if isinstance(eps, (int, float)) and eps < 0:
    raise ValueError(f"eps must be >= 0, got {eps}")


def _compute_dtype(dtype):
  """float32 for bf16/fp16/fp32 inputs, float64 for float64 inputs."""
  return jnp.promote_types(dtype, jnp.float32)


def _default_scale(scale, H):
  return 1.0 / float(np.sqrt(H)) if scale is None else scale


def _grouped_mask(mask_BNTS, K):
  """[b,n,t,s] (each dim 1 or full) -> [b,k,g,t,s] broadcastable to [B,K,G,T,S]."""
  b, n, t, s = mask_BNTS.shape
  if n == 1:
    return mask_BNTS.reshape(b, 1, 1, t, s)
  return mask_BNTS.reshape(b, K, n // K, t, s)


def _causal_TS(T, S):
  """Causal mask aligned to the end: query i sits at key position S - T + i."""
  return jnp.arange(S)[None, :] <= (jnp.arange(T)[:, None] + (S - T))


def _allowed_BKGTS(mask, is_causal, B, N, T, S, K):
  """Combined boolean mask broadcastable to [B,K,G,T,S], or None when everything is allowed."""
  allowed = None
  if mask is not None:
    allowed = _grouped_mask(mask, K)
  if is_causal:
    causal = _causal_TS(T, S)[None, None, None]
    allowed = causal if allowed is None else jnp.logical_and(allowed, causal)
  return allowed


def ea_kernel(s, kernel):
  """f(s): s^2/(1+s^2) ("rational") or s^2 ("square")."""
  s2 = s * s
  if kernel == "square":
    return s2
  return s2 / (1.0 + s2)


def _safe_div(num, den):
  """num / den with den == 0 treated as 1 (only reached when num is 0 too)."""
  return num / jnp.where(den == 0, jnp.ones_like(den), den)


# ----------------------------------------------------------------------------------------------
# Naive (materialised) reference implementation
# ----------------------------------------------------------------------------------------------


def _scores_BKGTS(q_BTNH, k_BSKH, scale, K):
  B, T, N, H = q_BTNH.shape
  q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
  return jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH) * scale


def _weights_BKGTS(s_BKGTS, allowed, kind, eps, kernel):
  if kind == "ea":
    f = ea_kernel(s_BKGTS, kernel)
    if allowed is not None:
      f = jnp.where(allowed, f, 0.0)
    z = eps + jnp.sum(f, axis=-1, keepdims=True)
    return _safe_div(f, z)
  # DPA: softmax over allowed keys; -inf (not a large finite number) keeps masked gradients at 0.
  if allowed is not None:
    s_BKGTS = jnp.where(allowed, s_BKGTS, -jnp.inf)
  m = jnp.max(s_BKGTS, axis=-1, keepdims=True)
  m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
  p = jnp.exp(s_BKGTS - m)
  return _safe_div(p, jnp.sum(p, axis=-1, keepdims=True))


def _naive(q, k, v, allowed, kind, scale, eps, kernel):
  B, T, N, H = q.shape
  K = k.shape[2]
  w = _weights_BKGTS(_scores_BKGTS(q, k, scale, K), allowed, kind, eps, kernel)
  o_BTKGH = jnp.einsum("bkgts,bskh->btkgh", w, v)
  return o_BTKGH.reshape(B, T, N, H)


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------


def attention_weights(query, key, *, kind, mask=None, is_causal=False, scale=None, eps=1e-6,
                      kernel="rational"):
  """Attention weights w [B,N,T,S] (float32, float64 for float64 inputs).

  query [B,T,N,H], key [B,S,K,H]; kind in {"ea","dpa"}; mask boolean broadcastable to [B,N,T,S].
  Rows with no allowed key are all zero.
  """
  _check_choice("kind", kind, KINDS)
  _check_choice("kernel", kernel, KERNELS)
  _check_eps(eps)
  B, T, S, N, K, H = _check_qkv(query, key)
  mask = _check_mask(mask, B, N, T, S)
  ct = _compute_dtype(query.dtype)
  allowed = _allowed_BKGTS(mask, is_causal, B, N, T, S, K)
  s = _scores_BKGTS(query.astype(ct), key.astype(ct), _default_scale(scale, H), K)
  w_BKGTS = _weights_BKGTS(s, allowed, kind, eps, kernel)
  return w_BKGTS.reshape(B, N, T, S)


def _attention(kind, query, key, value, mask, is_causal, scale, eps, kernel, implementation):
  _check_choice("implementation", implementation, IMPLEMENTATIONS)
  _check_choice("kernel", kernel, KERNELS)
  _check_eps(eps)
  B, T, S, N, K, H = _check_qkv(query, key, value)
  mask = _check_mask(mask, B, N, T, S)
  scale = _default_scale(scale, H)
  if implementation is None:
    implementation = choose_implementation(kind, T=T, S=S, H=H, is_causal=is_causal,
                                           has_mask=mask is not None, kernel=kernel)
  if implementation == "linear":
    _check_linear(kind, is_causal, kernel, mask)
  if implementation == "pallas":
    if kind != "ea":
      raise ValueError("implementation='pallas' is only available for expressive_attention; "
                       "for dot_product_attention use None, 'naive' or 'chunked'")
    try:
      from ea_jax.kernels import pallas_attention  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError("implementation='pallas' needs ea_jax.kernels.pallas_attention, which could "
                        f"not be imported ({e}); use implementation=None, 'naive' or 'chunked'") from e
    return pallas_attention.expressive_attention_pallas(
        query, key, value, mask=mask, is_causal=is_causal, scale=scale, eps=eps, kernel=kernel)

  ct = _compute_dtype(query.dtype)
  q, k, v = query.astype(ct), key.astype(ct), value.astype(ct)
  if implementation == "naive":
    out = _naive(q, k, v, _allowed_BKGTS(mask, is_causal, B, N, T, S, K), kind, scale, eps, kernel)
  elif implementation == "chunked":
    out = _chunked(q, k, v, mask, is_causal, kind, scale, eps, kernel)
  else:  # linear
    out = _linear_causal(q, k, v, scale, eps)
  return out.astype(query.dtype)


def _check_linear(kind, is_causal, kernel, mask):
  if kind != "ea" or kernel != "square":
    raise ValueError("implementation='linear' needs expressive_attention with kernel='square' "
                     f"(got {'dot_product_attention' if kind == 'dpa' else 'kernel=' + repr(kernel)}); "
                     "use 'naive' or 'chunked' otherwise")
  if not is_causal:
    raise ValueError("implementation='linear' needs is_causal=True; use 'naive' or 'chunked' "
                     "for non-causal attention")
  if mask is not None:
    raise ValueError("implementation='linear' allows no mask (only is_causal=True); pass mask=None "
                     "or use 'naive' or 'chunked' for arbitrary masks")


def dot_product_attention(query, key, value, *, mask=None, is_causal=False, scale=None,
                          implementation=None):
  """Softmax attention. query [B,T,N,H], key/value [B,S,K,H] -> [B,T,N,H] (query dtype).

  implementation: None (auto, see `choose_implementation`), "naive" or "chunked".
  """
  if implementation == "linear":
    raise ValueError("implementation='linear' is only available for expressive_attention with "
                     "kernel='square'; for dot_product_attention use None, 'naive' or 'chunked'")
  return _attention("dpa", query, key, value, mask, is_causal, scale, 0.0, "rational",
                    implementation)


def expressive_attention(query, key, value, *, mask=None, is_causal=False, scale=None, eps=1e-6,
                         kernel="rational", implementation=None):
  """Expressive attention. query [B,T,N,H], key/value [B,S,K,H] -> [B,T,N,H] (query dtype).

  kernel: "rational" (s^2/(1+s^2)) or "square" (s^2). implementation: None (auto, see
  `choose_implementation`), "naive", "chunked", "linear" (square kernel, causal, no mask) or
  "pallas" (ea_jax.kernels.pallas_attention).
  """
  return _attention("ea", query, key, value, mask, is_causal, scale, eps, kernel, implementation)


# ----------------------------------------------------------------------------------------------
# Auto rule
# ----------------------------------------------------------------------------------------------

# Thresholds of the auto rule, read off docs/benchmark_attention.txt (see choose_implementation).
AUTO_LINEAR_MIN_LEN = 2048            # CPU: causal mask-free square-kernel EA from this T on: "linear"
AUTO_ACCEL_NAIVE_MAX_SCORES = 1 << 20  # GPU/TPU: "naive" while T * S is at most this


def choose_implementation(kind, *, T, S, H, is_causal, has_mask, kernel="rational", backend=None):
  """The implementation=None rule (backend defaults to jax.default_backend()).

  CPU (never "pallas"), from the fwd+bwd table in docs/benchmark_attention.txt (B=8, N=4, H=32,
  causal float32) and the same measurement at small shapes (B=32, T=64, H=16 up):
    - EA with kernel="square", is_causal, no mask, T >= AUTO_LINEAR_MIN_LEN: "linear"
      (fewer flops than any quadratic form from about T = 2k on: ~2x "chunked" at 4k, ~4x at 8k);
    - otherwise "chunked": faster than "naive" at every measured size (4x at T=64, >10x from
      T=512 on), because a block of scores stays in cache and the backward pass recomputes it
      instead of reading a materialised [B,N,T,S] array.
  GPU/TPU: mask-free EA (causal or not) goes to the fused "pallas" kernel; DPA and masked EA use
  "naive" while T * S <= AUTO_ACCEL_NAIVE_MAX_SCORES and "chunked" beyond (memory).
  """
  del H
  backend = jax.default_backend() if backend is None else backend
  if backend in ("gpu", "tpu"):
    if kind == "ea" and not has_mask:
      return "pallas"
    return "naive" if T * S <= AUTO_ACCEL_NAIVE_MAX_SCORES else "chunked"
  if (kind == "ea" and kernel == "square" and is_causal and not has_mask
      and T >= AUTO_LINEAR_MIN_LEN):
    return "linear"
  return "chunked"


# ----------------------------------------------------------------------------------------------
# Chunked implementation: blocks of C query rows, each against its (causal) key prefix at once,
# a custom VJP that saves only one statistic per row (EA: Z = eps + sum f; DPA: logsumexp).
# Heads run sequentially in small groups so that a block of scores stays in cache, and blocks run
# one after another (optimization barriers), so memory is O(h * C * G * S) plus O(T * H) residuals.
# ----------------------------------------------------------------------------------------------

CHUNK_ROWS = 128            # query rows per block ("chunked")
CHUNK_MAX_BLOCKS = 128      # blocks per sequence at most (the block loop is unrolled)
_STEP_SCORES_CPU = 1 << 18  # score elements per sequential step on CPU (~1 MiB: fits in L2)
_STEP_SCORES_ACCEL = 1 << 26


class _ChunkCfg(NamedTuple):
  kind: str
  kernel: str
  eps: float
  is_causal: bool
  T: int           # unpadded query length
  S: int
  C: int           # rows per block (before folding in the G heads)
  G: int
  heads_per_step: int
  mask_per_head: bool  # mask has a [B*K] axis mapped with the heads (else shared by all)

  def prefixes(self, L):
    """Number of keys each query block can see (static)."""
    if not self.is_causal:
      return [self.S] * L
    return [int(np.clip((i + 1) * self.C + self.S - self.T, 0, self.S)) for i in range(L)]


def _kernel_and_derivative(s, kernel):
  s2 = s * s
  if kernel == "square":
    return s2, 2.0 * s
  r = 1.0 / (1.0 + s2)
  return s2 * r, 2.0 * s * r * r


def _block_masker(m, i, P, cfg):
  """For query block i (rows ordered (t, g)): a function (x [h|1, C*G, P], fill) -> x with the
  disallowed entries set to fill, or None when everything is allowed.

  The causal part of a block is a band: all keys before the block's first row are visible, and
  the last C keys follow one [C*G, C] lower-triangular pattern shared by every block, which is
  applied to that slice only (no [C*G, P] mask per block).
  """
  C, G = cfg.C, cfg.G
  full, band = None, None
  if m is not None:  # [hm, mg, mt, ms]
    hm, mg, mt, ms = m.shape
    mb = m[:, :, i * C:(i + 1) * C] if mt > 1 else m
    mb = mb[..., :P] if ms > 1 else mb
    mb = jnp.broadcast_to(jnp.swapaxes(mb, 1, 2), (hm, C, G, P))
    full = mb.reshape(hm, C * G, P)
  if cfg.is_causal:
    start = i * C + cfg.S - cfg.T  # key position of the block's first query row
    row_t = jnp.arange(C * G) // G
    if start >= 0 and start + C == P:
      band = (start, (jnp.arange(C)[None, :] <= row_t[:, None])[None])
    else:
      causal = (jnp.arange(P)[None, :] <= (row_t + start)[:, None])[None]
      full = causal if full is None else jnp.logical_and(full, causal)
  if full is None and band is None:
    return None

  def apply(x, fill):
    if full is not None:
      x = jnp.where(full, x, fill)
    if band is not None:
      start, mask = band
      x = x.at[..., start:].set(jnp.where(mask, x[..., start:], fill))
    return x

  return apply


def _after(y, *xs):
  """xs, made to depend on y (x + 0 * y[first element]; XLA does not fold 0 * y for floats), so
  that the scheduler finishes y before it starts on xs: the blocks of the unrolled loop then run
  one after another and only one block's scores (and key prefix copy) is alive at a time."""
  zero = 0.0 * y.reshape(-1)[0]
  return tuple(x + zero for x in xs)


def _rows_fwd(q_hTGH, k_hSH, v_hSH, m, cfg):
  """One step (h heads) of the forward: out [h,Tp,G,H] and the row statistic [h,Tp,G]."""
  h, Tp, G, H = q_hTGH.shape
  C = cfg.C
  outs, stats = [], []
  for i, P in enumerate(cfg.prefixes(Tp // C)):
    q_hRH = q_hTGH[:, i * C:(i + 1) * C].reshape(h, C * G, H)
    k_hPH, v_hPH = k_hSH[:, :P], v_hSH[:, :P]
    if outs:  # block i starts after block i-1 ends
      q_hRH, k_hPH, v_hPH = _after(outs[-1], q_hRH, k_hPH, v_hPH)
    if P == 0:
      outs.append(jnp.zeros((h, C, G, H), q_hTGH.dtype))
      fill = cfg.eps if cfg.kind == "ea" else jnp.inf
      stats.append(jnp.full((h, C, G), fill, q_hTGH.dtype))
      continue
    s_hRP = jnp.einsum("hrd,hpd->hrp", q_hRH, k_hPH)
    masker = _block_masker(m, i, P, cfg)
    if cfg.kind == "ea":
      f = ea_kernel(s_hRP, cfg.kernel)
      if masker is not None:
        f = masker(f, 0.0)
      stat = cfg.eps + jnp.sum(f, axis=-1)
      o = _safe_div(jnp.einsum("hrp,hpd->hrd", f, v_hPH), stat[..., None])
    else:
      if masker is not None:
        s_hRP = masker(s_hRP, -jnp.inf)
      mx = jnp.max(s_hRP, axis=-1)
      mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
      p = jnp.exp(s_hRP - mx[..., None])
      l = jnp.sum(p, axis=-1)
      o = _safe_div(jnp.einsum("hrp,hpd->hrd", p, v_hPH), l[..., None])
      stat = jnp.where(l > 0, mx + jnp.log(jnp.where(l > 0, l, 1.0)), jnp.inf)
    outs.append(o.reshape(h, C, G, H))
    stats.append(stat.reshape(h, C, G))
  return jnp.concatenate(outs, axis=1), jnp.concatenate(stats, axis=1)


def _rows_bwd(q_hTGH, k_hSH, v_hSH, m, o_hTGH, stat_hTG, do_hTGH, cfg):
  """One step of the backward: (dq, dk, dv) for h heads (FlashAttention-2 style, no running max
  for EA: dS = f'(s) (dP - delta) / Z with delta = rowsum(dO * O))."""
  h, Tp, G, H = q_hTGH.shape
  C = cfg.C
  delta_hTG = jnp.sum(do_hTGH * o_hTGH, axis=-1)
  dqs = []
  dk, dv = jnp.zeros_like(k_hSH), jnp.zeros_like(v_hSH)
  for i, P in enumerate(cfg.prefixes(Tp // C)):
    if P == 0:
      dqs.append(jnp.zeros((h, C, G, H), q_hTGH.dtype))
      continue
    rows = slice(i * C, (i + 1) * C)
    q_hRH = q_hTGH[:, rows].reshape(h, C * G, H)
    do_hRH = do_hTGH[:, rows].reshape(h, C * G, H)
    k_hPH, v_hPH = k_hSH[:, :P], v_hSH[:, :P]
    # Block i starts after block i-1 ends.
    q_hRH, do_hRH, k_hPH, v_hPH = _after(dk.reshape(-1)[:1] + dv.reshape(-1)[:1], q_hRH, do_hRH,
                                             k_hPH, v_hPH)
    stat = stat_hTG[:, rows].reshape(h, C * G, 1)
    delta = delta_hTG[:, rows].reshape(h, C * G, 1)
    s_hRP = jnp.einsum("hrd,hpd->hrp", q_hRH, k_hPH)
    dp_hRP = jnp.einsum("hrd,hpd->hrp", do_hRH, v_hPH)
    masker = _block_masker(m, i, P, cfg)
    if cfg.kind == "ea":
      f, df = _kernel_and_derivative(s_hRP, cfg.kernel)
      inv_z = _safe_div(jnp.ones_like(stat), stat)  # one division per row, not per score
      p = f * inv_z
      ds = df * (dp_hRP - delta) * inv_z
      if masker is not None:
        p, ds = masker(p, 0.0), masker(ds, 0.0)
    else:
      p = jnp.exp(s_hRP - stat)
      if masker is not None:
        p = masker(p, 0.0)
      ds = p * (dp_hRP - delta)
    dqs.append(jnp.einsum("hrp,hpd->hrd", ds, k_hPH).reshape(h, C, G, H))
    dk = dk.at[:, :P].add(jnp.einsum("hrp,hrd->hpd", ds, q_hRH))
    dv = dv.at[:, :P].add(jnp.einsum("hrp,hrd->hpd", p, do_hRH))
  return jnp.concatenate(dqs, axis=1), dk, dv


def _map_heads(fn, per_head, shared, cfg):
  """Runs fn(per_head_slices..., shared) over [X, ...] arrays, heads_per_step heads at a time."""
  X = per_head[0].shape[0]
  h = cfg.heads_per_step
  # Step j takes heads j, j + X/h, ...: the major (batch) part of X stays in the per-step axis, so
  # a batch sharded over devices stays sharded inside each step.
  grouped = jax.tree.map(lambda a: jnp.swapaxes(a.reshape((h, X // h) + a.shape[1:]), 0, 1),
                         per_head)
  out = jax.lax.map(lambda xs: fn(*xs, shared), grouped)
  return jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1).reshape((X,) + a.shape[2:]), out)


def _split_mask(mask, cfg):
  """(per-head mask or None, shared mask or None) as seen by one step."""
  if mask is None:
    return None, None
  if cfg.mask_per_head:
    return mask, None
  return None, mask[None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _chunked_core(q_XTGH, k_XSH, v_XSH, mask, cfg):
  return _chunked_core_fwd(q_XTGH, k_XSH, v_XSH, mask, cfg)[0]


def _chunked_core_fwd(q_XTGH, k_XSH, v_XSH, mask, cfg):
  per_mask, shared_mask = _split_mask(mask, cfg)

  def step(q, k, v, m, shared):
    return _rows_fwd(q, k, v, m if m is not None else shared, cfg)

  o, stat = _map_heads(step, (q_XTGH, k_XSH, v_XSH, per_mask), shared_mask, cfg)
  return o, (q_XTGH, k_XSH, v_XSH, mask, o, stat)


def _chunked_core_bwd(cfg, res, do_XTGH):
  q_XTGH, k_XSH, v_XSH, mask, o, stat = res
  per_mask, shared_mask = _split_mask(mask, cfg)

  def step(q, k, v, m, o, stat, do, shared):
    return _rows_bwd(q, k, v, m if m is not None else shared, o, stat, do, cfg)

  dq, dk, dv = _map_heads(step, (q_XTGH, k_XSH, v_XSH, per_mask, o, stat, do_XTGH),
                          shared_mask, cfg)
  return dq, dk, dv, None


_chunked_core.defvjp(_chunked_core_fwd, _chunked_core_bwd)


def _chunked(q, k, v, mask, is_causal, kind, scale, eps, kernel):
  """q [B,T,N,H], k/v [B,S,K,H] (compute dtype), mask [b,n,t,s] or None -> [B,T,N,H]."""
  B, T, N, H = q.shape
  S, K = k.shape[1], k.shape[2]
  G = N // K
  # At most CHUNK_MAX_BLOCKS blocks (they are unrolled): longer sequences get longer blocks.
  C = min(max(CHUNK_ROWS, -(-T // CHUNK_MAX_BLOCKS)), T)
  L = -(-T // C)
  Tp = L * C
  q = q * scale
  q_XTGH = jnp.pad(q, ((0, 0), (0, Tp - T), (0, 0), (0, 0))).reshape(B, Tp, K, G, H)
  q_XTGH = q_XTGH.transpose(0, 2, 1, 3, 4).reshape(B * K, Tp, G, H)
  k_XSH = k.transpose(0, 2, 1, 3).reshape(B * K, S, H)
  v_XSH = v.transpose(0, 2, 1, 3).reshape(B * K, S, H)
  mask_per_head = False
  if mask is not None:
    m = _grouped_mask(mask, K)  # [mb, mk, mg, mt, ms]
    mb, mk, mg, mt, ms = m.shape
    if mt > 1 and Tp > T:
      m = jnp.pad(m, ((0, 0), (0, 0), (0, 0), (0, Tp - T), (0, 0)))
    if mb > 1 or mk > 1:
      mask_per_head = True
      mask = jnp.broadcast_to(m, (B, K) + m.shape[2:]).reshape((B * K,) + m.shape[2:])
    else:
      mask = m[0, 0]
  budget = _STEP_SCORES_CPU if jax.default_backend() == "cpu" else _STEP_SCORES_ACCEL
  h = max(1, min(B * K, budget // max(1, C * G * S)))
  h = max(h, min(B * K, jax.device_count()))  # at least one head per device in each step
  while (B * K) % h:
    h -= 1
  cfg = _ChunkCfg(kind, kernel, float(eps), bool(is_causal), T, S, C, G, h, mask_per_head)
  o_XTGH = _chunked_core(q_XTGH, k_XSH, v_XSH, mask, cfg)
  o = o_XTGH.reshape(B, K, Tp, G, H)[:, :, :T]
  return o.transpose(0, 2, 1, 3, 4).reshape(B, T, N, H)


# ----------------------------------------------------------------------------------------------
# Linear implementation (square-kernel causal EA): (q.k)^2 = phi(q) . phi(k) with the F = H(H+1)/2
# symmetric features; exact quadratic form inside a chunk of C tokens, a running state
# (sum phi(k) v^T, sum phi(k)) across chunks; lax.scan with rematerialisation of each chunk.
# Memory: the per-chunk states kept for the backward pass, (T/C) * K * F * H floats per batch row.
# ----------------------------------------------------------------------------------------------

LINEAR_CHUNK = 64


def _linear_causal(q, k, v, scale, eps):
  """Causal square-kernel EA in O(T H^3): q [B,T,N,H], k/v [B,S,K,H] -> [B,T,N,H]."""
  B, T, N, H = q.shape
  S, K = k.shape[1], k.shape[2]
  G = N // K
  F = num_square_features(H)
  q = q * scale
  # Query i sits at key position S - T + i: align queries with keys, zero queries where needed.
  if T >= S:
    q_used = q[:, T - S:]
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
    o = _safe_div(num, (eps + den)[..., None])
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
  return o[:, S - T:]


# ----------------------------------------------------------------------------------------------
# One-step decoding
# ----------------------------------------------------------------------------------------------


class KVCache(NamedTuple):
  """Keys/values of the tokens seen so far; positions >= length are unused."""
  key: jax.Array    # [B,Smax,K,H]
  value: jax.Array  # [B,Smax,K,H]
  length: jax.Array  # int32 []


def init_kv_cache(batch_size, max_len, num_kv_heads, head_dim, dtype=jnp.float32):
  """An empty KVCache with room for max_len tokens."""
  shape = (batch_size, max_len, num_kv_heads, head_dim)
  return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32))


def kv_cache_step(cache, query_B1NH, key_B1KH, value_B1KH, *, kind, scale=None, eps=1e-6,
                  kernel="rational"):
  """Appends one token at position cache.length and attends causally over positions <= length.

  Returns (out [B,1,N,H] in the query dtype, new cache). When length is concrete, writing past
  max_len raises; under jit the caller must keep length < max_len.
  """
  _check_choice("kind", kind, KINDS)
  _check_choice("kernel", kernel, KERNELS)
  _check_eps(eps)
  B, T, S, N, K, H = _check_qkv(query_B1NH, cache.key, cache.value)
  if T != 1 or key_B1KH.shape != (B, 1, K, H) or value_B1KH.shape != (B, 1, K, H):
    raise ValueError(f"kv_cache_step takes one token: query [B,1,N,H], key/value [B,1,K,H] "
                     f"matching the cache {cache.key.shape}; got query {query_B1NH.shape}, "
                     f"key {key_B1KH.shape}, value {value_B1KH.shape}")
  if not isinstance(cache.length, jax.core.Tracer) and int(cache.length) >= S:
    raise ValueError(f"KVCache is full: length {int(cache.length)} >= max_len {S}")
  pos = cache.length
  zero = jnp.zeros((), jnp.int32)
  new_k = jax.lax.dynamic_update_slice(cache.key, key_B1KH.astype(cache.key.dtype),
                                       (zero, pos, zero, zero))
  new_v = jax.lax.dynamic_update_slice(cache.value, value_B1KH.astype(cache.value.dtype),
                                       (zero, pos, zero, zero))
  ct = _compute_dtype(query_B1NH.dtype)
  allowed = (jnp.arange(S) <= pos)[None, None, None, None, :]
  out = _naive(query_B1NH.astype(ct), new_k.astype(ct), new_v.astype(ct), allowed, kind,
               _default_scale(scale, H), eps if kind == "ea" else 0.0, kernel)
  return out.astype(query_B1NH.dtype), KVCache(new_k, new_v, pos + 1)


class RecurrentState(NamedTuple):
  """Square-kernel EA state: kv = sum_j phi(k_j) v_j^T [B,K,F,H], z = sum_j phi(k_j) [B,K,F]."""
  kv: jax.Array
  z: jax.Array


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
    parts.append((x_XH[..., :H - j] * root2) * x_XH[..., j:])
  return jnp.concatenate(parts, axis=-1)


def init_recurrent_state(batch_size, num_kv_heads, head_dim, dtype=jnp.float32):
  """Zero state for square-kernel EA decoding; its size does not depend on sequence length."""
  F = num_square_features(head_dim)
  return RecurrentState(jnp.zeros((batch_size, num_kv_heads, F, head_dim), dtype),
                        jnp.zeros((batch_size, num_kv_heads, F), dtype))


def recurrent_step(state, query_B1NH, key_B1KH, value_B1KH, *, scale=None, eps=1e-6):
  """One causal square-kernel EA step: adds the token to the state, then reads it with the query.

  Returns (out [B,1,N,H] in the query dtype, new state).
  """
  _check_eps(eps)
  B, T, S, N, K, H = _check_qkv(query_B1NH, key_B1KH, value_B1KH)
  F = num_square_features(H)
  if T != 1 or S != 1:
    raise ValueError(f"recurrent_step takes one token: query [B,1,N,H], key/value [B,1,K,H]; got "
                     f"query {query_B1NH.shape}, key {key_B1KH.shape}")
  if state.kv.shape != (B, K, F, H) or state.z.shape != (B, K, F):
    raise ValueError(f"state shapes kv {state.kv.shape}, z {state.z.shape} do not match "
                     f"[B,K,F,H]={[B, K, F, H]} and [B,K,F]={[B, K, F]} for query {query_B1NH.shape}")
  ct = state.kv.dtype
  scale = _default_scale(scale, H)
  phi_k_BKF = square_features(key_B1KH[:, 0].astype(ct))
  kv = state.kv + phi_k_BKF[..., None] * value_B1KH[:, 0].astype(ct)[:, :, None, :]
  z = state.z + phi_k_BKF
  q_BKGH = query_B1NH[:, 0].astype(ct).reshape(B, K, N // K, H) * scale
  phi_q_BKGF = square_features(q_BKGH)
  num_BKGH = jnp.einsum("bkgf,bkfh->bkgh", phi_q_BKGF, kv)
  den_BKG = eps + jnp.maximum(jnp.einsum("bkgf,bkf->bkg", phi_q_BKGF, z), 0.0)
  out = _safe_div(num_BKGH, den_BKG[..., None]).reshape(B, 1, N, H)
  return out.astype(query_B1NH.dtype), RecurrentState(kv, z)
