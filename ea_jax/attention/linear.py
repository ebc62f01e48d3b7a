"""Causal square-kernel EA in linear time: (q.k)^2 = phi(q) . phi(k) with the F = H(H+1)/2
symmetric features; the exact quadratic form inside a chunk of C tokens, a running state
S = sum phi(k) [v | 1]^T across chunks (its last column is z = sum phi(k), the denominator's).

Forward: a `lax.scan` over chunks carrying S; each chunk reads S (num and den in one matmul),
adds its own masked (q.k)^2 part and updates S. Backward: a custom VJP, a reverse `lax.scan`
carrying dU (the cotangent of the state the later chunks read), which gives each chunk's keys
their share; the chunk's queries take theirs from the state it read (saved by the forward).
Features are laid out by rows ([F, C]: every product is of two contiguous rows), so that the
state update and the backward's cotangents of phi(q), phi(k) and S contract no operand along its
leading axis; the state read and dV do (both operands' feature axis: a layout with the state
transposed, which avoids that, was slower in an exploration). The feature map's transpose is
written out (`_square_features_vjp_rows`). Memory: the per-chunk states kept for the backward
pass, (T/C) * K * F * (H+1) floats per batch row.

Accuracy (measured, benchmarks/attention_exactness.py, table in docs/attention/README.md): the
state contraction phi(q) . sum_j phi(k_j) = q^T (sum_j k_j k_j^T) q has float32 rounding error
~ eps32 * |q|^2 * |sum_j k_j k_j^T| instead of ~ eps32 * the result, so when queries are nearly
orthogonal to the keys (a fraction f of |q| in the keys' span) the relative error grows as
~ eps32 / f^2: 1.8e-6 at f = 0.1, 2.9e-4 at f = 0.01 and 1.8e-2 at f = 0.001 (T = 2048,
H = 32, chunk 128; 2.2e-4 at chunk 256 and 3.8e-4 at chunk 64 for f = 0.01: the longer the
chunk, the more of the sum is exact in-chunk work), against ~ eps32 / f for the quadratic forms
("naive", "chunked"). The automatic rule therefore never picks "linear"; choose it by hand where
queries are not that close to orthogonal to every key. The recurrent decode state
(decode.recurrent_step) has the same contraction and the same bound.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ea_jax.attention import reference as ref

# Keys per chunk (the queries of a chunk attend to its keys exactly, to earlier chunks through the
# state). The state matmuls cost the same at any chunk; the in-chunk part grows with it. Fwd+bwd at
# T = 8192, B = 8, N = 4, H = 32 on a 2-core AMD EPYC, side by side in one run of
# benchmarks/attention.py (rows ea_sq_linear, ea_sq_linear_c*): chunk 128 1.93 s, 256 2.12 s,
# 64 2.49 s. (At T = 2048 in the same run 256 was ahead, 490 against 538 ms.)
LINEAR_CHUNK = 128


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


def _feature_blocks(H):
  """The feature order both `square_features` and its transpose read: one (j, start, stop) per
  diagonal offset j = 0..H-1; features [start, stop) are the H - j products x_a x_{a+j}."""
  blocks, start = [], 0
  for j in range(H):
    blocks.append((j, start, start + H - j))
    start += H - j
  return blocks


def square_features(x, axis=-1):
  """phi(x) with phi(x) . phi(y) = (x . y)^2, F = H(H+1)/2 features along `axis` (H there).

  The distinct products x_a x_b (a <= b), grouped by diagonal offset j = b - a
  (`_feature_blocks`): first x_a^2, then sqrt(2) x_a x_{a+j} for j = 1..H-1. Slices only (no
  gathers), so one fused elementwise loop. linear_causal lays its chunks out features by rows
  (axis=-2: every product is of two contiguous rows), the decode state features last (axis=-1).
  """
  axis = axis % x.ndim
  H = x.shape[axis]
  root2 = jnp.asarray(np.sqrt(2.0), x.dtype)
  take = lambda start, stop: jax.lax.slice_in_dim(x, start, stop, axis=axis)
  parts = []
  for j, _, _ in _feature_blocks(H):
    parts.append(x * x if j == 0 else (take(0, H - j) * root2) * take(j, H))
  return jnp.concatenate(parts, axis=axis)


def _square_features_vjp_rows(x_XHR, d_XFR):
  """The cotangent of x_XHR from that of square_features(x_XHR, axis=-2).

  Written out (d/dx_a of sqrt(2) x_a x_{a+j} is sqrt(2) x_{a+j}, and so on) because autodiff's
  transpose of the concatenated slices is one fused loop that evaluates all 2H - 1 padded terms at
  every output element, several times slower on CPU than these 2H - 1 row-block adds.
  """
  H = x_XHR.shape[-2]
  root2 = jnp.asarray(np.sqrt(2.0), x_XHR.dtype)
  dx = None
  for j, start, stop in _feature_blocks(H):
    if j == 0:
      dx = 2.0 * x_XHR * d_XFR[:, start:stop]
      continue
    d_j = d_XFR[:, start:stop] * root2
    dx = dx.at[:, : H - j].add(d_j * x_XHR[:, j:])
    dx = dx.at[:, j:].add(d_j * x_XHR[:, : H - j])
  return dx


class _Cfg(NamedTuple):
  """Static settings of one call (a custom_vjp nondiff argument)."""

  eps: float
  C: int  # keys per chunk
  G: int  # query heads per key/value head (rows of a chunk: R = C * G, ordered (c, g))


def _causal_RC(cfg):
  """Bool [R, C]: row (c, g) of a chunk may attend to the chunk's key c' iff c' <= c."""
  return jnp.arange(cfg.C)[None, :] <= (jnp.arange(cfg.C * cfg.G) // cfg.G)[:, None]


def _with_ones(v_XCH):
  """[v | 1]: one matmul then gives both the state (sum phi(k) v^T) and z (sum phi(k))."""
  return jnp.concatenate([v_XCH, jnp.ones(v_XCH.shape[:-1] + (1,), v_XCH.dtype)], axis=-1)


def _transposed(x):
  """x with its last two axes swapped (e.g. [X, R, H] -> [X, H, R])."""
  return jnp.swapaxes(x, -1, -2)


def _forward(q_LXRH, k_LXCH, v_LXCH, cfg):
  """o [L,X,R,H], den [L,X,R], pos [L,X,R] (state part of den > 0), states S [L,X,F,H+1].

  S[l] = sum over the keys of chunks before l of phi(k) [v | 1]^T (the running state, a `lax.scan`
  carry), read as S^T phi(q) with the features by rows.
  """
  H = q_LXRH.shape[-1]
  causal_RC = _causal_RC(cfg)

  def step(S_XFh, chunk):
    q_XRH, k_XCH, v_XCH = chunk
    nd_XhR = jnp.einsum("xfh,xfr->xhr", S_XFh, square_features(_transposed(q_XRH), axis=-2))
    nd_XRh = _transposed(nd_XhR)
    s_XRC = jnp.einsum("xrd,xcd->xrc", q_XRH, k_XCH)
    a_XRC = jnp.where(causal_RC, s_XRC * s_XRC, 0.0)
    num_XRH = nd_XRh[..., :H] + jnp.einsum("xrc,xcd->xrd", a_XRC, v_XCH)
    inter_XR = nd_XRh[..., H]
    den_XR = cfg.eps + jnp.maximum(inter_XR, 0.0) + jnp.sum(a_XRC, axis=-1)
    o_XRH = ref.safe_div(num_XRH, den_XR[..., None])
    update = jnp.einsum(
      "xfc,xch->xfh", square_features(_transposed(k_XCH), axis=-2), _with_ones(v_XCH)
    )
    return S_XFh + update, (o_XRH, den_XR, inter_XR > 0, S_XFh)

  X, F = q_LXRH.shape[1], num_square_features(H)
  S0 = jnp.zeros((X, F, H + 1), q_LXRH.dtype)
  _, (o, den, pos, S) = jax.lax.scan(step, S0, (q_LXRH, k_LXCH, v_LXCH))
  return o, den, pos, S


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _linear_core(q_LXRH, k_LXCH, v_LXCH, cfg):
  return _forward(q_LXRH, k_LXCH, v_LXCH, cfg)[0]


def _linear_core_fwd(q_LXRH, k_LXCH, v_LXCH, cfg):
  o, den, pos, S = _forward(q_LXRH, k_LXCH, v_LXCH, cfg)
  return o, (q_LXRH, k_LXCH, v_LXCH, o, den, pos, S)


def _linear_core_bwd(cfg, res, do_LXRH):
  """A reverse `lax.scan` over chunks carrying dU = the cotangent of the state read after the chunk.

  Per chunk: o = num / den with num = phi(q) S + A v, den = eps + phi(q) z + rowsum A (A the
  masked in-chunk (q.k)^2); the state's cotangent flows to the keys of earlier chunks through dU.
  """
  q_L, k_L, v_L, o_L, den_L, pos_L, S_L = res
  H = q_L.shape[-1]
  causal_CR = _causal_RC(cfg).T

  def step(dU_XFh, chunk):
    q_XRH, k_XCH, v_XCH, o_XRH, den_XR, pos_XR, S_XFh, do_XRH = chunk
    inv_XR = ref.safe_div(jnp.ones_like(den_XR), den_XR)
    dnum_XRH = do_XRH * inv_XR[..., None]
    dden_XR = -jnp.sum(do_XRH * o_XRH, axis=-1) * inv_XR
    dnd_XRh = jnp.concatenate([dnum_XRH, jnp.where(pos_XR, dden_XR, 0.0)[..., None]], axis=-1)
    # Through the state read: d phi(q) = S dnd^T, dS = phi(q) dnd (features by rows).
    qT_XHR = _transposed(q_XRH)
    dphi_XFR = jnp.einsum("xfh,xrh->xfr", S_XFh, dnd_XRh)
    dq_XRH = _transposed(_square_features_vjp_rows(qT_XHR, dphi_XFR))
    dS_XFh = jnp.einsum("xfr,xrh->xfh", square_features(qT_XHR, axis=-2), dnd_XRh)
    # Through the state update (this chunk's keys are read by every later chunk: dU).
    kT_XHC = _transposed(k_XCH)
    dphik_XFC = jnp.einsum("xfh,xch->xfc", dU_XFh, _with_ones(v_XCH))
    dk_XCH = _transposed(_square_features_vjp_rows(kT_XHC, dphik_XFC))
    dv_XhC = jnp.einsum("xhf,xfc->xhc", _transposed(dU_XFh), square_features(kT_XHC, axis=-2))
    dv_XCH = _transposed(dv_XhC[:, :H])
    # In-chunk quadratic part, laid out keys by rows (dK, dV plain matmuls; see chunked.py).
    s_XCR = jnp.einsum("xcd,xrd->xcr", k_XCH, q_XRH)
    a_XCR = jnp.where(causal_CR, s_XCR * s_XCR, 0.0)
    da_XCR = jnp.einsum("xcd,xrd->xcr", v_XCH, dnum_XRH) + dden_XR[:, None, :]
    ds_XCR = jnp.where(causal_CR, 2.0 * s_XCR * da_XCR, 0.0)
    dv_XCH = dv_XCH + jnp.einsum("xcr,xrd->xcd", a_XCR, dnum_XRH)
    dk_XCH = dk_XCH + jnp.einsum("xcr,xrd->xcd", ds_XCR, q_XRH)
    dq_XRH = dq_XRH + jnp.einsum("xrc,xcd->xrd", _transposed(ds_XCR), k_XCH)
    return dU_XFh + dS_XFh, (dq_XRH, dk_XCH, dv_XCH)

  X, F = q_L.shape[1], num_square_features(H)
  dU0 = jnp.zeros((X, F, H + 1), q_L.dtype)
  chunks = (q_L, k_L, v_L, o_L, den_L, pos_L, S_L, do_LXRH)
  _, (dq, dk, dv) = jax.lax.scan(step, dU0, chunks, reverse=True)
  return dq, dk, dv


_linear_core.defvjp(_linear_core_fwd, _linear_core_bwd)


def linear_causal(q, k, v, scale, eps):
  """Causal square-kernel EA in O(T H^3): q [B,T,N,H], k/v [B,S,K,H] -> [B,T,N,H]."""
  B, T, N, H = q.shape
  S, K = k.shape[1], k.shape[2]
  G = N // K
  q = q * scale
  # Query i sits at key position S - T + i: align queries with keys, zero queries where needed.
  if T >= S:
    q_used = q[:, T - S :]
  else:
    q_used = jnp.pad(q, ((0, 0), (S - T, 0), (0, 0), (0, 0)))
  C = min(LINEAR_CHUNK, S)
  L = -(-S // C)
  pad = ((0, 0), (0, L * C - S), (0, 0), (0, 0))
  q_LXRH = jnp.pad(q_used, pad).reshape(B, L, C, K, G, H).transpose(1, 0, 3, 2, 4, 5)
  q_LXRH = q_LXRH.reshape(L, B * K, C * G, H)  # rows ordered (c, g)

  def chunks(x):
    return jnp.pad(x, pad).reshape(B, L, C, K, H).transpose(1, 0, 3, 2, 4).reshape(L, B * K, C, H)

  o_LXRH = _linear_core(q_LXRH, chunks(k), chunks(v), _Cfg(float(eps), C, G))
  o = o_LXRH.reshape(L, B, K, C, G, H).transpose(1, 0, 3, 2, 4, 5).reshape(B, L * C, N, H)[:, :S]
  if T >= S:
    return jnp.pad(o, ((0, 0), (T - S, 0), (0, 0), (0, 0)))
  return o[:, S - T :]
