"""Pallas GPU (Triton) kernels for expressive attention: forward, dQ and dK/dV.

Layout (letters as in ea_jax.attention): q_BTNH, k_BSKH, v_BSKH, with N = K * G query heads
grouped over K key/value heads (query head n uses kv head n // G). T, S are already padded to
multiples of the block sizes and H to a power of two (>= 16) by the caller, all with zeros;
`seq_offset` = S_true - T_true aligns causal attention to the end.

Forward (grid over q-blocks x B x N; each program loops over key blocks):
  acc = sum_j f(s_ij) v_j and Z_i = sum_j f(s_ij) in float32, no running max (f is bounded
  below by 0 and needs no stabilisation); O_i = acc_i / (eps + Z_i). Saves Z only.
Backward, with D_i = eps + Z_i, r_i = 1/D_i, P = f(s) r, delta_i = dO_i . O_i, dP = dO V^T:
  dL/df_ij = (dP_ij - delta_i) r_i, dS_ij = f'(s_ij) (dP_ij - delta_i) r_i,
  dV_j = sum_i P_ij dO_i, dQ_i = scale sum_j dS_ij k_j, dK_j = scale sum_i dS_ij q_i.
dQ: grid over q-blocks x B x N, loop over key blocks. dK/dV: grid over key blocks x B x K, loop
over the G query heads of the group and the query blocks. Causal mode skips key (query) blocks
that no row (column) of the tile may see and applies the causal mask only on diagonal tiles.
An optional explicit mask arrives as int8 [Bm, Km, Gm, T, S] (Bm in {1, B}, (Km, Gm) in
{(1, 1), (K, G)}), nonzero = may attend.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ea_jax.kernels import scores
from ea_jax.kernels.config import KernelConfig


def _dot_nt(a, b):
  """a [m, h] . b [n, h]^T -> float32 [m, n]."""
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_tn(a, b):
  """a [m, n]^T . b [m, h] -> float32 [n, h]."""
  return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_nn(a, b):
  """a [m, n] . b [n, h] -> float32 [m, h]."""
  return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _where(allowed, x):
  return x if allowed is None else jnp.where(allowed, x, 0.0)


def _and(a, b):
  if a is None:
    return b
  if b is None:
    return a
  return jnp.logical_and(a, b)


def _compiler_params(cfg: KernelConfig, block_rows: int, head_dim: int):
  num_warps = cfg.num_warps
  if num_warps is None:
    num_warps = 8 if block_rows >= 128 and head_dim >= 128 else 4
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=cfg.num_stages)


def _q_block_index(i, num_q_blocks: int, causal: bool):
  # Causal row blocks near the end do the most work: launch them first.
  return num_q_blocks - 1 - i if causal else i


# ----------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------
def _fwd_kernel(
  q_ref,
  k_ref,
  v_ref,
  mask_ref,
  o_ref,
  z_ref,
  *,
  cfg: KernelConfig,
  num_q_blocks: int,
  num_k_blocks: int,
):
  bq, bk = cfg.block_q, cfg.block_k
  qb = _q_block_index(pl.program_id(0), num_q_blocks, cfg.causal)
  q = q_ref[...]  # [bq, H]
  head_dim = q.shape[-1]

  def step(kb, carry, diagonal: bool):
    acc, z = carry
    cols = pl.ds(kb * bk, bk)
    k = k_ref[cols, :]
    v = v_ref[cols, :]
    f = scores.score(_dot_nt(q, k) * cfg.scale, cfg.kernel)  # [bq, bk] f32
    allowed = None
    if diagonal:
      allowed = scores.causal_allowed(qb, kb, block_q=bq, block_k=bk, offset=cfg.seq_offset)
    if mask_ref is not None:
      allowed = _and(allowed, mask_ref[:, cols] != 0)
    f = _where(allowed, f)
    z = z + jnp.sum(f, axis=1)
    acc = acc + _dot_nn(f.astype(v.dtype), v)
    return acc, z

  carry = (jnp.zeros((bq, head_dim), jnp.float32), jnp.zeros((bq,), jnp.float32))
  if cfg.causal:
    kw = dict(block_q=bq, block_k=bk, offset=cfg.seq_offset, num_k_blocks=num_k_blocks)
    n_full = scores.key_blocks_unmasked(qb, **kw)
    n_all = scores.key_blocks_needed(qb, **kw)
    carry = lax.fori_loop(0, n_full, functools.partial(step, diagonal=False), carry)
    carry = lax.fori_loop(n_full, n_all, functools.partial(step, diagonal=True), carry)
  else:
    carry = lax.fori_loop(0, num_k_blocks, functools.partial(step, diagonal=False), carry)
  acc, z = carry
  r = scores.safe_reciprocal(cfg.eps + z)
  o_ref[...] = (acc * r[:, None]).astype(o_ref.dtype)
  z_ref[...] = z


def forward(q_BTNH, k_BSKH, v_BSKH, mask, cfg: KernelConfig):
  """Returns (o_BTNH in q's dtype, z_BNT float32)."""
  b, t, n, h = q_BTNH.shape
  _, s, kh, _ = k_BSKH.shape
  g = n // kh
  nq, nk = t // cfg.block_q, s // cfg.block_k
  grid = (nq, b, n)

  def qi(i):
    return _q_block_index(i, nq, cfg.causal)

  in_specs = [
    pl.BlockSpec((None, cfg.block_q, None, h), lambda i, bb, nn: (bb, qi(i), nn, 0)),
    pl.BlockSpec((None, s, None, h), lambda i, bb, nn: (bb, 0, lax.div(nn, g), 0)),
    pl.BlockSpec((None, s, None, h), lambda i, bb, nn: (bb, 0, lax.div(nn, g), 0)),
  ]
  if mask is None:
    in_specs.append(None)
  else:
    bm, km, gm = mask.shape[:3]
    in_specs.append(
      pl.BlockSpec(
        (None, None, None, cfg.block_q, s),
        lambda i, bb, nn: (
          bb if bm > 1 else 0,
          lax.div(nn, g) if km > 1 else 0,
          lax.rem(nn, g) if gm > 1 else 0,
          qi(i),
          0,
        ),
      )
    )
  out_specs = [
    pl.BlockSpec((None, cfg.block_q, None, h), lambda i, bb, nn: (bb, qi(i), nn, 0)),
    pl.BlockSpec((None, None, cfg.block_q), lambda i, bb, nn: (bb, nn, qi(i))),
  ]
  out_shape = [
    jax.ShapeDtypeStruct(q_BTNH.shape, q_BTNH.dtype),
    jax.ShapeDtypeStruct((b, n, t), jnp.float32),
  ]
  kernel = functools.partial(_fwd_kernel, cfg=cfg, num_q_blocks=nq, num_k_blocks=nk)
  o, z = pl.pallas_call(
    kernel,
    grid=grid,
    in_specs=in_specs,
    out_specs=out_specs,
    out_shape=out_shape,
    compiler_params=_compiler_params(cfg, cfg.block_q, h),
    interpret=cfg.interpret,
    name="ea_forward",
  )(q_BTNH, k_BSKH, v_BSKH, mask)
  return o, z


# ----------------------------------------------------------------------------------------
# Backward: dQ
# ----------------------------------------------------------------------------------------
def _dq_kernel(
  q_ref,
  k_ref,
  v_ref,
  do_ref,
  delta_ref,
  r_ref,
  mask_ref,
  dq_ref,
  *,
  cfg: KernelConfig,
  num_q_blocks: int,
  num_k_blocks: int,
):
  bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
  qb = _q_block_index(pl.program_id(0), num_q_blocks, cfg.causal)
  q = q_ref[...]  # [bq, H]
  do = do_ref[...]  # [bq, H]
  delta = delta_ref[...][:, None]  # [bq, 1]
  r = r_ref[...][:, None]  # [bq, 1]

  def step(kb, dq, diagonal: bool):
    cols = pl.ds(kb * bk, bk)
    k = k_ref[cols, :]
    v = v_ref[cols, :]
    s = _dot_nt(q, k) * cfg.scale  # [bq, bk]
    dp = _dot_nt(do, v)  # [bq, bk]
    ds = scores.score_grad(s, cfg.kernel) * ((dp - delta) * r)
    allowed = None
    if diagonal:
      allowed = scores.causal_allowed(qb, kb, block_q=bq, block_k=bk, offset=cfg.seq_offset)
    if mask_ref is not None:
      allowed = _and(allowed, mask_ref[:, cols] != 0)
    ds = _where(allowed, ds)
    return dq + _dot_nn(ds.astype(k.dtype), k)

  dq = jnp.zeros(q.shape, jnp.float32)
  if cfg.causal:
    kw = dict(block_q=bq, block_k=bk, offset=cfg.seq_offset, num_k_blocks=num_k_blocks)
    n_full = scores.key_blocks_unmasked(qb, **kw)
    n_all = scores.key_blocks_needed(qb, **kw)
    dq = lax.fori_loop(0, n_full, functools.partial(step, diagonal=False), dq)
    dq = lax.fori_loop(n_full, n_all, functools.partial(step, diagonal=True), dq)
  else:
    dq = lax.fori_loop(0, num_k_blocks, functools.partial(step, diagonal=False), dq)
  dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _backward_dq(q, k, v, do, delta, r, mask, cfg: KernelConfig):
  b, t, n, h = q.shape
  _, s, kh, _ = k.shape
  g = n // kh
  bq = cfg.block_q_bwd
  nq, nk = t // bq, s // cfg.block_k_bwd

  def qi(i):
    return _q_block_index(i, nq, cfg.causal)

  row_spec = pl.BlockSpec((None, bq, None, h), lambda i, bb, nn: (bb, qi(i), nn, 0))
  kv_spec = pl.BlockSpec((None, s, None, h), lambda i, bb, nn: (bb, 0, lax.div(nn, g), 0))
  vec_spec = pl.BlockSpec((None, None, bq), lambda i, bb, nn: (bb, nn, qi(i)))
  if mask is None:
    mask_spec = None
  else:
    bm, km, gm = mask.shape[:3]
    mask_spec = pl.BlockSpec(
      (None, None, None, bq, s),
      lambda i, bb, nn: (
        bb if bm > 1 else 0,
        lax.div(nn, g) if km > 1 else 0,
        lax.rem(nn, g) if gm > 1 else 0,
        qi(i),
        0,
      ),
    )
  kernel = functools.partial(_dq_kernel, cfg=cfg, num_q_blocks=nq, num_k_blocks=nk)
  return pl.pallas_call(
    kernel,
    grid=(nq, b, n),
    in_specs=[row_spec, kv_spec, kv_spec, row_spec, vec_spec, vec_spec, mask_spec],
    out_specs=row_spec,
    out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
    compiler_params=_compiler_params(cfg, bq, h),
    interpret=cfg.interpret,
    name="ea_backward_dq",
  )(q, k, v, do, delta, r, mask)


# ----------------------------------------------------------------------------------------
# Backward: dK, dV
# ----------------------------------------------------------------------------------------
def _dkv_kernel(
  q_ref,
  k_ref,
  v_ref,
  do_ref,
  delta_ref,
  r_ref,
  mask_ref,
  dk_ref,
  dv_ref,
  *,
  cfg: KernelConfig,
  num_groups: int,
  num_q_blocks: int,
):
  bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
  kb = pl.program_id(0)
  k = k_ref[...]  # [bk, H]
  v = v_ref[...]  # [bk, H]

  def step(qb, carry, group: int, diagonal: bool):
    dk, dv = carry
    rows = pl.ds(qb * bq, bq)
    q = q_ref[rows, group, :]  # [bq, H]
    do = do_ref[rows, group, :]  # [bq, H]
    delta = delta_ref[group, rows][:, None]  # [bq, 1]
    r = r_ref[group, rows][:, None]  # [bq, 1]
    s = _dot_nt(q, k) * cfg.scale  # [bq, bk]
    dp = _dot_nt(do, v)  # [bq, bk]
    p = scores.score(s, cfg.kernel) * r
    ds = scores.score_grad(s, cfg.kernel) * ((dp - delta) * r)
    allowed = None
    if diagonal:
      allowed = scores.causal_allowed(qb, kb, block_q=bq, block_k=bk, offset=cfg.seq_offset)
    if mask_ref is not None:
      mask_group = group if mask_ref.shape[0] > 1 else 0
      allowed = _and(allowed, mask_ref[mask_group, rows, :] != 0)
    p = _where(allowed, p)
    ds = _where(allowed, ds)
    dv = dv + _dot_tn(p.astype(do.dtype), do)
    dk = dk + _dot_tn(ds.astype(q.dtype), q)
    return dk, dv

  carry = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  kw = dict(block_q=bq, block_k=bk, offset=cfg.seq_offset, num_q_blocks=num_q_blocks)
  if cfg.causal:
    lo = scores.first_query_block(kb, **kw)
    mid = jnp.maximum(scores.first_unmasked_query_block(kb, **kw), lo)
  for group in range(num_groups):
    if cfg.causal:
      carry = lax.fori_loop(lo, mid, functools.partial(step, group=group, diagonal=True), carry)
      carry = lax.fori_loop(
        mid, num_q_blocks, functools.partial(step, group=group, diagonal=False), carry
      )
    else:
      carry = lax.fori_loop(
        0, num_q_blocks, functools.partial(step, group=group, diagonal=False), carry
      )
  dk, dv = carry
  dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _backward_dkv(q, k, v, do, delta, r, mask, cfg: KernelConfig):
  b, t, n, h = q.shape
  _, s, kh, _ = k.shape
  g = n // kh
  bk = cfg.block_k_bwd
  nq, nk = t // cfg.block_q_bwd, s // bk
  # Free reshapes: the G query heads of kv head kk are contiguous.
  q5 = q.reshape(b, t, kh, g, h)
  do5 = do.reshape(b, t, kh, g, h)
  delta4 = delta.reshape(b, kh, g, t)
  r4 = r.reshape(b, kh, g, t)
  rows_spec = pl.BlockSpec((None, t, None, g, h), lambda j, bb, kk: (bb, 0, kk, 0, 0))
  kv_spec = pl.BlockSpec((None, bk, None, h), lambda j, bb, kk: (bb, j, kk, 0))
  vec_spec = pl.BlockSpec((None, None, g, t), lambda j, bb, kk: (bb, kk, 0, 0))
  if mask is None:
    mask_spec = None
  else:
    bm, km, gm = mask.shape[:3]
    mask_spec = pl.BlockSpec(
      (None, None, gm, t, bk), lambda j, bb, kk: (bb if bm > 1 else 0, kk if km > 1 else 0, 0, 0, j)
    )
  kernel = functools.partial(_dkv_kernel, cfg=cfg, num_groups=g, num_q_blocks=nq)
  dk, dv = pl.pallas_call(
    kernel,
    grid=(nk, b, kh),
    in_specs=[rows_spec, kv_spec, kv_spec, rows_spec, vec_spec, vec_spec, mask_spec],
    out_specs=[kv_spec, kv_spec],
    out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
    compiler_params=_compiler_params(cfg, bk, h),
    interpret=cfg.interpret,
    name="ea_backward_dkv",
  )(q5, k, v, do5, delta4, r4, mask)
  return dk, dv


def backward(q_BTNH, k_BSKH, v_BSKH, mask, o_BTNH, z_BNT, do_BTNH, cfg: KernelConfig):
  """Returns (dq, dk, dv) in the dtypes of q, k, v."""
  # delta_i = dO_i . O_i and r_i = 1/(eps + Z_i): O(B N T H) elementwise work, left to XLA.
  delta_BNT = jnp.einsum("btnh,btnh->bnt", do_BTNH.astype(jnp.float32), o_BTNH.astype(jnp.float32))
  r_BNT = scores.safe_reciprocal(cfg.eps + z_BNT)
  dq = _backward_dq(q_BTNH, k_BSKH, v_BSKH, do_BTNH, delta_BNT, r_BNT, mask, cfg)
  dk, dv = _backward_dkv(q_BTNH, k_BSKH, v_BSKH, do_BTNH, delta_BNT, r_BNT, mask, cfg)
  return dq, dk, dv
