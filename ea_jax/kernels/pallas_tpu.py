"""Pallas TPU (Mosaic) kernels for expressive attention: forward, dQ and dK/dV.

Layout: q_BNTH, k_BKSH, v_BKSH (heads before length, so that every tile is a (rows, H)
matrix), N = K * G query heads grouped over K kv heads (query head n uses kv head n // G).
T, S are already zero-padded to multiples of the tiles (multiples of 128); `seq_offset` =
S_true - T_true aligns causal attention to the end. Per-row vectors (Z, delta, 1/(eps+Z)) are
stored lane-dense as [B, N, 1, T] float32 and turned into (rows, 1) columns inside the kernels.

The math is that of `pallas_gpu` (see its docstring): forward accumulates f(s) V and
Z = sum f(s) in float32 VMEM scratch with no running max and saves Z; backward uses
delta = rowsum(dO * O), dS = f'(s) (dP - delta) / (eps + Z).

Each kernel walks a grid whose last axis (or axes) is the reduction, carried in VMEM scratch:
  forward, dQ:  (B, N, q-blocks, k-blocks)
  dK/dV:        (B, K, k-blocks, G, q-blocks)
Causal mode is block-sparse: tiles no row may see are skipped with `pl.when`, and their
index maps repeat the nearest needed block so the pipeline issues no copy for them; the causal
mask is computed only on diagonal tiles. An optional explicit mask arrives as int8
[Bm, Nm, T, S] (Bm in {1, B}, Nm in {1, N}), nonzero = may attend.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ea_jax.kernels import scores
from ea_jax.kernels.config import KernelConfig

_LANES = 128


def _dot_nt(a, b):
  """a [m, h] . b [n, h]^T -> float32 [m, n]."""
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_nn(a, b):
  """a [m, n] . b [n, h] -> float32 [m, h]."""
  return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _masked(x, allowed):
  return x if allowed is None else jnp.where(allowed, x, 0.0)


def _allowed(mask_ref, q_block, k_block, diagonal: bool, cfg: KernelConfig, bq: int, bk: int):
  allowed = None
  if diagonal:
    allowed = scores.causal_allowed(q_block, k_block, block_q=bq, block_k=bk, offset=cfg.seq_offset)
  if mask_ref is not None:
    explicit = mask_ref[...] != 0
    allowed = explicit if allowed is None else jnp.logical_and(allowed, explicit)
  return allowed


def _run_tiles(step, block_index, full_end, diag_end, causal: bool):
  """Calls step(diagonal) for the tile at `block_index` of the reduction axis.

  Causal: tiles [0, full_end) need no causal mask, [full_end, diag_end) do, the rest is
  skipped. Non-causal: every tile runs unmasked.
  """
  if not causal:
    step(False)
    return
  pl.when(block_index < full_end)(lambda: step(False))
  pl.when(jnp.logical_and(block_index >= full_end, block_index < diag_end))(lambda: step(True))


def _mask_spec(mask, bq, bk, index_map):
  if mask is None:
    return None
  bm, nm = mask.shape[:2]

  def spec_map(*ids):
    b, n, qb, kb = index_map(*ids)
    return (b if bm > 1 else 0, n if nm > 1 else 0, qb, kb)

  return pl.BlockSpec((None, None, bq, bk), spec_map)


def _column(ref):
  """(1, rows) row-vector tile -> (rows, 1) column."""
  return jnp.expand_dims(ref[0], -1)


def _params(semantics):
  return pltpu.CompilerParams(dimension_semantics=semantics)


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
  acc_ref,
  zacc_ref,
  *,
  cfg: KernelConfig,
  num_k_blocks: int,
):
  bq, bk = cfg.block_q, cfg.block_k
  qb, kb = pl.program_id(2), pl.program_id(3)

  @pl.when(kb == 0)
  def _init():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
    zacc_ref[...] = jnp.zeros(zacc_ref.shape, jnp.float32)

  def step(diagonal: bool):
    v = v_ref[...]
    f = scores.score(_dot_nt(q_ref[...], k_ref[...]) * cfg.scale, cfg.kernel)  # [bq, bk]
    f = _masked(f, _allowed(mask_ref, qb, kb, diagonal, cfg, bq, bk))
    zacc_ref[...] += jnp.sum(f, axis=1, keepdims=True)  # [bq, 128], lanes equal
    acc_ref[...] += _dot_nn(f.astype(v.dtype), v)

  kw = dict(block_q=bq, block_k=bk, offset=cfg.seq_offset, num_k_blocks=num_k_blocks)
  full_end = scores.key_blocks_unmasked(qb, **kw) if cfg.causal else None
  diag_end = scores.key_blocks_needed(qb, **kw) if cfg.causal else None
  _run_tiles(step, kb, full_end, diag_end, cfg.causal)

  @pl.when(kb == num_k_blocks - 1)
  def _finish():
    z_cols = zacc_ref[...]  # [bq, 128]
    r = scores.safe_reciprocal(cfg.eps + z_cols[:, :1])  # [bq, 1]
    o_ref[...] = (acc_ref[...] * r).astype(o_ref.dtype)
    z_ref[...] = jnp.transpose(z_cols)[:1, :]  # [1, bq]


def _kv_block_for_rows(qb, kb, cfg: KernelConfig, bq: int, bk: int, num_k_blocks: int):
  """Key block to fetch at grid step (qb, kb): kb itself, or for skipped causal steps the
  last needed one (unchanged block index -> no copy)."""
  if not cfg.causal:
    return kb
  needed = scores.key_blocks_needed(
    qb, block_q=bq, block_k=bk, offset=cfg.seq_offset, num_k_blocks=num_k_blocks
  )
  return jnp.maximum(jnp.minimum(kb, needed - 1), 0)


def forward(q_BNTH, k_BKSH, v_BKSH, mask, cfg: KernelConfig):
  """Returns (o_BNTH in q's dtype, z_BN1T float32)."""
  b, n, t, h = q_BNTH.shape
  _, kh, s, _ = k_BKSH.shape
  g = n // kh
  bq, bk = cfg.block_q, cfg.block_k
  nq, nk = t // bq, s // bk

  def kv_map(bb, nn, qb, kb):
    return (bb, nn // g, _kv_block_for_rows(qb, kb, cfg, bq, bk, nk), 0)

  def mask_map(bb, nn, qb, kb):
    return (bb, nn, qb, _kv_block_for_rows(qb, kb, cfg, bq, bk, nk))

  row_spec = pl.BlockSpec((None, None, bq, h), lambda bb, nn, qb, kb: (bb, nn, qb, 0))
  vec_spec = pl.BlockSpec((None, None, 1, bq), lambda bb, nn, qb, kb: (bb, nn, 0, qb))
  kv_spec = pl.BlockSpec((None, None, bk, h), kv_map)
  kernel = functools.partial(_fwd_kernel, cfg=cfg, num_k_blocks=nk)
  return pl.pallas_call(
    kernel,
    grid=(b, n, nq, nk),
    in_specs=[row_spec, kv_spec, kv_spec, _mask_spec(mask, bq, bk, mask_map)],
    out_specs=[row_spec, vec_spec],
    out_shape=[
      jax.ShapeDtypeStruct(q_BNTH.shape, q_BNTH.dtype),
      jax.ShapeDtypeStruct((b, n, 1, t), jnp.float32),
    ],
    scratch_shapes=[pltpu.VMEM((bq, h), jnp.float32), pltpu.VMEM((bq, _LANES), jnp.float32)],
    compiler_params=_params(("parallel", "parallel", "parallel", "arbitrary")),
    interpret=cfg.interpret,
    name="ea_forward_tpu",
  )(q_BNTH, k_BKSH, v_BKSH, mask)


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
  dq_acc_ref,
  *,
  cfg: KernelConfig,
  num_k_blocks: int,
):
  bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
  qb, kb = pl.program_id(2), pl.program_id(3)

  @pl.when(kb == 0)
  def _init():
    dq_acc_ref[...] = jnp.zeros(dq_acc_ref.shape, jnp.float32)

  def step(diagonal: bool):
    k = k_ref[...]
    s = _dot_nt(q_ref[...], k) * cfg.scale  # [bq, bk]
    dp = _dot_nt(do_ref[...], v_ref[...])  # [bq, bk]
    ds = scores.score_grad(s, cfg.kernel) * ((dp - _column(delta_ref)) * _column(r_ref))
    ds = _masked(ds, _allowed(mask_ref, qb, kb, diagonal, cfg, bq, bk))
    dq_acc_ref[...] += _dot_nn(ds.astype(k.dtype), k)

  kw = dict(block_q=bq, block_k=bk, offset=cfg.seq_offset, num_k_blocks=num_k_blocks)
  full_end = scores.key_blocks_unmasked(qb, **kw) if cfg.causal else None
  diag_end = scores.key_blocks_needed(qb, **kw) if cfg.causal else None
  _run_tiles(step, kb, full_end, diag_end, cfg.causal)

  @pl.when(kb == num_k_blocks - 1)
  def _finish():
    dq_ref[...] = (dq_acc_ref[...] * cfg.scale).astype(dq_ref.dtype)


def _backward_dq(q, k, v, do, delta, r, mask, cfg: KernelConfig):
  b, n, t, h = q.shape
  _, kh, s, _ = k.shape
  g = n // kh
  bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
  nq, nk = t // bq, s // bk

  def kv_map(bb, nn, qb, kb):
    return (bb, nn // g, _kv_block_for_rows(qb, kb, cfg, bq, bk, nk), 0)

  def mask_map(bb, nn, qb, kb):
    return (bb, nn, qb, _kv_block_for_rows(qb, kb, cfg, bq, bk, nk))

  row_spec = pl.BlockSpec((None, None, bq, h), lambda bb, nn, qb, kb: (bb, nn, qb, 0))
  vec_spec = pl.BlockSpec((None, None, 1, bq), lambda bb, nn, qb, kb: (bb, nn, 0, qb))
  kv_spec = pl.BlockSpec((None, None, bk, h), kv_map)
  kernel = functools.partial(_dq_kernel, cfg=cfg, num_k_blocks=nk)
  return pl.pallas_call(
    kernel,
    grid=(b, n, nq, nk),
    in_specs=[
      row_spec,
      kv_spec,
      kv_spec,
      row_spec,
      vec_spec,
      vec_spec,
      _mask_spec(mask, bq, bk, mask_map),
    ],
    out_specs=row_spec,
    out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
    scratch_shapes=[pltpu.VMEM((bq, h), jnp.float32)],
    compiler_params=_params(("parallel", "parallel", "parallel", "arbitrary")),
    interpret=cfg.interpret,
    name="ea_backward_dq_tpu",
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
  dk_acc_ref,
  dv_acc_ref,
  *,
  cfg: KernelConfig,
  num_groups: int,
  num_q_blocks: int,
):
  bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
  kb, grp, qb = pl.program_id(2), pl.program_id(3), pl.program_id(4)

  @pl.when(jnp.logical_and(grp == 0, qb == 0))
  def _init():
    dk_acc_ref[...] = jnp.zeros(dk_acc_ref.shape, jnp.float32)
    dv_acc_ref[...] = jnp.zeros(dv_acc_ref.shape, jnp.float32)

  def step(diagonal: bool):
    q, do = q_ref[...], do_ref[...]
    r = _column(r_ref)  # [bq, 1]
    s = _dot_nt(q, k_ref[...]) * cfg.scale  # [bq, bk]
    dp = _dot_nt(do, v_ref[...])  # [bq, bk]
    allowed = _allowed(mask_ref, qb, kb, diagonal, cfg, bq, bk)
    p = _masked(scores.score(s, cfg.kernel) * r, allowed)
    ds = _masked(scores.score_grad(s, cfg.kernel) * ((dp - _column(delta_ref)) * r), allowed)
    dv_acc_ref[...] += _dot_nn(p.T.astype(do.dtype), do)
    dk_acc_ref[...] += _dot_nn(ds.T.astype(q.dtype), q)

  if cfg.causal:
    kw = dict(block_q=bq, block_k=bk, offset=cfg.seq_offset, num_q_blocks=num_q_blocks)
    lo = scores.first_query_block(kb, **kw)
    mid = jnp.maximum(scores.first_unmasked_query_block(kb, **kw), lo)
    pl.when(jnp.logical_and(qb >= lo, qb < mid))(lambda: step(True))
    pl.when(qb >= mid)(lambda: step(False))
  else:
    step(False)

  @pl.when(jnp.logical_and(grp == num_groups - 1, qb == num_q_blocks - 1))
  def _finish():
    dk_ref[...] = (dk_acc_ref[...] * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_acc_ref[...].astype(dv_ref.dtype)


def _backward_dkv(q, k, v, do, delta, r, mask, cfg: KernelConfig):
  b, n, t, h = q.shape
  _, kh, s, _ = k.shape
  g = n // kh
  bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
  nq, nk = t // bq, s // bk

  def q_block(kb, qb):
    if not cfg.causal:
      return qb
    lo = scores.first_query_block(
      kb, block_q=bq, block_k=bk, offset=cfg.seq_offset, num_q_blocks=nq
    )
    return jnp.minimum(jnp.maximum(qb, lo), nq - 1)

  def row_map(bb, kk, kb, grp, qb):
    return (bb, kk * g + grp, q_block(kb, qb), 0)

  def mask_map(bb, kk, kb, grp, qb):
    return (bb, kk * g + grp, q_block(kb, qb), kb)

  def vec_map(bb, kk, kb, grp, qb):
    return (bb, kk * g + grp, 0, q_block(kb, qb))

  row_spec = pl.BlockSpec((None, None, bq, h), row_map)
  vec_spec = pl.BlockSpec((None, None, 1, bq), vec_map)
  kv_spec = pl.BlockSpec((None, None, bk, h), lambda bb, kk, kb, grp, qb: (bb, kk, kb, 0))
  kernel = functools.partial(_dkv_kernel, cfg=cfg, num_groups=g, num_q_blocks=nq)
  return pl.pallas_call(
    kernel,
    grid=(b, kh, nk, g, nq),
    in_specs=[
      row_spec,
      kv_spec,
      kv_spec,
      row_spec,
      vec_spec,
      vec_spec,
      _mask_spec(mask, bq, bk, mask_map),
    ],
    out_specs=[kv_spec, kv_spec],
    out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
    scratch_shapes=[pltpu.VMEM((bk, h), jnp.float32), pltpu.VMEM((bk, h), jnp.float32)],
    compiler_params=_params(("parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
    interpret=cfg.interpret,
    name="ea_backward_dkv_tpu",
  )(q, k, v, do, delta, r, mask)


def backward(q_BNTH, k_BKSH, v_BKSH, mask, o_BNTH, z_BN1T, do_BNTH, cfg: KernelConfig):
  """Returns (dq, dk, dv) in the dtypes of q, k, v."""
  # delta_i = dO_i . O_i and r_i = 1/(eps + Z_i): elementwise O(B N T H) work, left to XLA.
  delta_BN1T = jnp.einsum(
    "bnth,bnth->bnt", do_BNTH.astype(jnp.float32), o_BNTH.astype(jnp.float32)
  )[:, :, None, :]
  r_BN1T = scores.safe_reciprocal(cfg.eps + z_BN1T)
  dq = _backward_dq(q_BNTH, k_BKSH, v_BKSH, do_BNTH, delta_BN1T, r_BN1T, mask, cfg)
  dk, dv = _backward_dkv(q_BNTH, k_BKSH, v_BKSH, do_BNTH, delta_BN1T, r_BN1T, mask, cfg)
  return dq, dk, dv
