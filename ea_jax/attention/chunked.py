"""Blockwise ("chunked") EA and DPA: memory linear in T, a custom VJP that saves one statistic
per row (EA: Z = eps + sum f; DPA: the logsumexp), loops instead of Python unrolling.

Forward: for each block of C query rows (`lax.map`), a `fori_loop` over the key blocks it can
see, accumulating the numerator f(s) V (EA) or the online softmax (DPA); the causal mask is only
applied to the key blocks that cross the diagonal (a second loop), blocks wholly in the future
are never visited. When the blocks are aligned with the diagonal (causal, no mask, S - T a
multiple of C) the diagonal block is computed as halves that skip its future quarter
(`_diagonal_masks`): 3/4 of its work, 10% less in all at T = 4 C. Backward (FlashAttention-2
style): a `lax.scan` over key blocks carrying dQ, and for each key block a loop over the query
blocks that see it, accumulating dK and dV.
EA needs no running maximum: dS = f'(s) (dP - delta) / Z with delta = rowsum(dO * O).
Heads run sequentially in groups of h (`lax.map`), so one score block [h, C*G, C] (the backward
lays it out keys by rows, [h, C, C*G]) stays in cache.
Compile time does not grow with T (the loop bodies are traced once).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ea_jax.attention import reference as ref

# Query rows and keys per block, and score elements per sequential head step on CPU (2 heads of
# 512 x 512, 2 MiB): of 256 / 512 blocks with 1-4 heads per step, the fastest on a 2-core AMD EPYC
# (fwd+bwd at T = 2048: 814 ms against 1,167 ms for 256-blocks of 4 heads and 1,634 ms for one
# 512-block head per step; at T = 8192 10.0 s against 14.8 and 20.4 s; benchmarks/attention.py
# rows ea_chunked, ea_chunked_b256, ea_chunked_b512h1: float32, B = 8, N = 4, H = 32, causal).
CHUNK_ROWS = 512
# Aligned causal diagonal blocks as halves (see `_diagonal_masks`); False computes them whole, as
# benchmarks/attention.py's row ea_chunked_whole does to measure the difference.
DIAGONAL_HALVES = True
_STEP_SCORES_CPU = 1 << 19
_STEP_SCORES_ACCEL = 1 << 26


class ChunkCfg(NamedTuple):
  """Static settings of one call (a custom_vjp nondiff argument)."""

  kind: str
  kernel: str
  eps: float
  is_causal: bool
  T: int  # unpadded query length
  S: int  # unpadded key length
  C: int  # query rows per block (before folding in the G heads) = keys per block
  G: int
  L: int  # query blocks
  M: int  # key blocks
  heads_per_step: int
  mask_per_head: bool  # mask has a [B*K] axis mapped with the heads (else shared by all)
  # Causal, no mask, blocks aligned with the diagonal (and DIAGONAL_HALVES when traced): each query
  # block's one masked key block is the diagonal one, computed as halves (`_diagonal_masks`).
  diagonal_halves: bool

  @property
  def offset(self):
    return self.S - self.T  # query row t sits at key position t + offset


def _div(a, b):
  return jax.lax.div(a, b)


def _key_ranges(i, cfg):
  """Key blocks of query block i (traced int32): [0, unmasked) need no mask, [unmasked, end) do."""
  C, M = cfg.C, cfg.M
  padded_keys = cfg.kind == "dpa" and cfg.M * C > cfg.S  # exp(0) of a zero key is not 0
  if not cfg.is_causal:
    end = jnp.int32(M)
    unmasked = jnp.int32(M - 1 if padded_keys else M)
    return unmasked, end
  first_pos = i * C + cfg.offset  # key position of the block's first row
  last_pos = first_pos + C - 1
  end = jnp.clip(_div(jnp.maximum(last_pos, -1) + C, C), 0, M)
  unmasked = jnp.clip(_div(jnp.maximum(first_pos + 1, 0), C), 0, M)
  if padded_keys:
    unmasked = jnp.minimum(unmasked, M - 1)
  return jnp.minimum(unmasked, end), end


def _query_ranges(j, cfg):
  """Query blocks that see key block j: [begin, unmasked) need a mask, [unmasked, L) do not."""
  C, L = cfg.C, cfg.L
  padded_keys = cfg.kind == "dpa" and cfg.M * C > cfg.S
  if not cfg.is_causal:
    masked_all = padded_keys & (j == cfg.M - 1)
    return jnp.int32(0), jnp.where(masked_all, L, 0).astype(jnp.int32)
  # Row t sees key position p iff p <= t + offset.
  begin = jnp.clip(_div(jnp.maximum(j * C - cfg.offset, 0), C), 0, L)
  unmasked = jnp.clip(_div(jnp.maximum((j + 1) * C - 1 - cfg.offset, 0) + C - 1, C), 0, L)
  if padded_keys:
    unmasked = jnp.where(j == cfg.M - 1, L, unmasked)
  return begin, jnp.maximum(unmasked, begin)


def _block_allowed(m, i, j, cfg):
  """Bool [h|1, C*G, C] for query block i and key block j (rows ordered (t, g)), or None."""
  C, G = cfg.C, cfg.G
  allowed = None
  if m is not None:  # [hm, mg, mt, ms], mt in (1, Tp), ms in (1, Sp)
    hm, mg, mt, ms = m.shape
    if mt > 1:
      m = jax.lax.dynamic_slice_in_dim(m, i * C, C, axis=2)
    if ms > 1:
      m = jax.lax.dynamic_slice_in_dim(m, j * C, C, axis=3)
    m = jnp.broadcast_to(jnp.swapaxes(m, 1, 2), (hm, C, G, C))
    allowed = m.reshape(hm, C * G, C)
  row_t = i * C + jnp.arange(C * G) // G
  key_p = j * C + jnp.arange(C)
  structural = None
  if cfg.is_causal:
    structural = key_p[None, :] <= (row_t + cfg.offset)[:, None]
  if cfg.kind == "dpa" and cfg.M * C > cfg.S:
    valid = jnp.broadcast_to(key_p[None, :] < cfg.S, (C * G, C))
    structural = valid if structural is None else jnp.logical_and(structural, valid)
  if structural is not None:
    structural = structural[None]
    allowed = structural if allowed is None else jnp.logical_and(allowed, structural)
  return allowed


def _diagonal_masks(cfg):
  """Static masks of a diagonal block computed as halves (rows ordered (t, g), t = row // G).

  Of the block's four quarters (first / second half of its C query tokens x of its C keys) the
  first tokens never see the second keys: the forward computes the first R/2 rows against the
  first C/2 keys and the last R/2 rows against all C keys; the backward (keys by rows) the first
  C/2 keys against all R rows and the last C/2 keys against the last R/2 rows. Three quarters of
  the block's work instead of all of it.
  Returns (fwd_top [1, R/2, C/2], fwd_bottom [1, R/2, C], bwd_first [1, C/2, R], bwd_last
  [1, C/2, R/2]), True = may attend.
  """
  C, G = cfg.C, cfg.G
  half = C // 2
  t_top = jnp.arange(half * G) // G  # token of each row within its half
  t_all = jnp.arange(C * G) // G
  keys = jnp.arange(half)
  fwd_top = keys[None, :] <= t_top[:, None]
  fwd_bottom = jnp.arange(C)[None, :] <= (half + t_top)[:, None]
  bwd_first = keys[:, None] <= t_all[None, :]
  bwd_last = keys[:, None] <= t_top[None, :]
  return fwd_top[None], fwd_bottom[None], bwd_first[None], bwd_last[None]


def _fwd_update(carry, q_hRH, k_hCH, v_hCH, allowed, cfg):
  """Adds keys k/v (with the mask `allowed` [h|1, R, C] or None) to the rows' accumulators."""
  s_hRC = jnp.einsum("hrd,hcd->hrc", q_hRH, k_hCH)
  if cfg.kind == "ea":
    num, z = carry
    f = ref.ea_kernel(s_hRC, cfg.kernel)
    if allowed is not None:
      f = jnp.where(allowed, f, 0.0)
    return num + jnp.einsum("hrc,hcd->hrd", f, v_hCH), z + jnp.sum(f, axis=-1)
  mx, l, acc = carry
  if allowed is not None:
    s_hRC = jnp.where(allowed, s_hRC, -jnp.inf)
  mx_new = jnp.maximum(mx, jnp.max(s_hRC, axis=-1))
  mx_safe = jnp.where(jnp.isfinite(mx_new), mx_new, 0.0)
  alpha = jnp.exp(mx - mx_safe)
  p = jnp.exp(s_hRC - mx_safe[..., None])
  return (
    mx_new,
    alpha * l + jnp.sum(p, axis=-1),
    alpha[..., None] * acc + jnp.einsum("hrc,hcd->hrd", p, v_hCH),
  )


def _rows_fwd(q_hLRH, k_hMCH, v_hMCH, m, cfg):
  """Forward for h heads: out [h, L, R, H] and the row statistic [h, L, R]."""
  h, L, R, H = q_hLRH.shape
  halves = cfg.diagonal_halves
  if halves:
    top_RC, bottom_RC, _, _ = _diagonal_masks(cfg)

  def query_block(i):
    q_hRH = q_hLRH[:, i]

    def body(j, carry, masked):
      allowed = _block_allowed(m, i, j, cfg) if masked else None
      return _fwd_update(carry, q_hRH, k_hMCH[:, j], v_hMCH[:, j], allowed, cfg)

    def diagonal(j, carry):
      k_hCH, v_hCH, half = k_hMCH[:, j], v_hMCH[:, j], R // 2
      top = jax.tree.map(lambda a: a[:, :half], carry)
      bottom = jax.tree.map(lambda a: a[:, half:], carry)
      c = cfg.C // 2
      top = _fwd_update(top, q_hRH[:, :half], k_hCH[:, :c], v_hCH[:, :c], top_RC, cfg)
      bottom = _fwd_update(bottom, q_hRH[:, half:], k_hCH, v_hCH, bottom_RC, cfg)
      return jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=1), top, bottom)

    zeros_hR = jnp.zeros((h, R), q_hLRH.dtype)
    zeros_hRH = jnp.zeros((h, R, H), q_hLRH.dtype)
    if cfg.kind == "ea":
      init = (zeros_hRH, zeros_hR)
    else:
      init = (jnp.full((h, R), -jnp.inf, q_hLRH.dtype), zeros_hR, zeros_hRH)
    if m is None:
      unmasked, end = _key_ranges(i, cfg)
      carry = jax.lax.fori_loop(0, unmasked, functools.partial(body, masked=False), init)
      masked_body = diagonal if halves else functools.partial(body, masked=True)
      carry = jax.lax.fori_loop(unmasked, end, masked_body, carry)
    else:
      _, end = _key_ranges(i, cfg)
      carry = jax.lax.fori_loop(0, end, functools.partial(body, masked=True), init)
    if cfg.kind == "ea":
      num, z = carry
      stat = cfg.eps + z
      return ref.safe_div(num, stat[..., None]), stat
    mx, l, acc = carry
    mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
    stat = jnp.where(l > 0, mx + jnp.log(jnp.where(l > 0, l, 1.0)), jnp.inf)
    return ref.safe_div(acc, l[..., None]), stat

  o_LhRH, stat_LhR = jax.lax.map(query_block, jnp.arange(L))
  return jnp.swapaxes(o_LhRH, 0, 1), jnp.swapaxes(stat_LhR, 0, 1)


def _bwd_block(k_hCH, v_hCH, q_hRH, do_hRH, stat_h1R, delta_h1R, allowed, cfg):
  """(dk [h,C,H], dv [h,C,H], dq [h,R,H]) of one block, mask `allowed` [h|1, C, R] or None.

  The block is built transposed, keys by rows ([h, C, R]), so that dK = dS^T Q and dV = P^T dO
  are plain matmuls; only dQ = dS K reads a transpose. XLA on CPU runs a matmul that contracts
  both operands' leading axis far slower (benchmarks/attention.py --profile, one block of 2 heads
  x 512 x 512: 3.4 ms this way, 4.1 ms rows by keys).
  """
  s_hCR = jnp.einsum("hcd,hrd->hcr", k_hCH, q_hRH)
  dp_hCR = jnp.einsum("hcd,hrd->hcr", v_hCH, do_hRH)
  if cfg.kind == "ea":
    f, df = ref.kernel_and_derivative(s_hCR, cfg.kernel)
    inv_z = ref.safe_div(jnp.ones_like(stat_h1R), stat_h1R)  # one division per row, not per score
    p = f * inv_z
    ds = df * (dp_hCR - delta_h1R) * inv_z
  else:
    p = jnp.exp(s_hCR - stat_h1R)
    ds = p * (dp_hCR - delta_h1R)
  if allowed is not None:
    p, ds = jnp.where(allowed, p, 0.0), jnp.where(allowed, ds, 0.0)
  return (
    jnp.einsum("hcr,hrd->hcd", ds, q_hRH),
    jnp.einsum("hcr,hrd->hcd", p, do_hRH),
    jnp.einsum("hrc,hcd->hrd", jnp.swapaxes(ds, -1, -2), k_hCH),
  )


def _rows_bwd(q_hLRH, k_hMCH, v_hMCH, m, o_hLRH, stat_hLR, do_hLRH, cfg):
  """Backward for h heads: (dq [h,L,R,H], dk [h,M,C,H], dv [h,M,C,H])."""
  delta_hLR = jnp.sum(do_hLRH * o_hLRH, axis=-1)
  R = q_hLRH.shape[2]
  halves = cfg.diagonal_halves
  if halves:
    _, _, first_CR, last_CR = _diagonal_masks(cfg)

  def key_block(dq_hLRH, j):
    k_hCH, v_hCH = k_hMCH[:, j], v_hMCH[:, j]

    def rows(i):
      return q_hLRH[:, i], do_hLRH[:, i], stat_hLR[:, i, None, :], delta_hLR[:, i, None, :]

    def body(i, carry, masked):
      dk_hCH, dv_hCH, dq = carry
      allowed = _block_allowed(m, i, j, cfg) if masked else None
      if allowed is not None:
        allowed = jnp.swapaxes(allowed, -1, -2)
      dk, dv, dq_i = _bwd_block(k_hCH, v_hCH, *rows(i), allowed, cfg)
      return dk_hCH + dk, dv_hCH + dv, dq.at[:, i].add(dq_i)

    def diagonal(i, carry):
      dk_hCH, dv_hCH, dq = carry
      q, do, stat, delta = rows(i)
      c, half = cfg.C // 2, R // 2
      dk0, dv0, dq0 = _bwd_block(k_hCH[:, :c], v_hCH[:, :c], q, do, stat, delta, first_CR, cfg)
      dk1, dv1, dq1 = _bwd_block(
        k_hCH[:, c:],
        v_hCH[:, c:],
        q[:, half:],
        do[:, half:],
        stat[..., half:],
        delta[..., half:],
        last_CR,
        cfg,
      )
      dq = dq.at[:, i].add(dq0).at[:, i, half:].add(dq1)
      return (
        dk_hCH + jnp.concatenate([dk0, dk1], axis=1),
        dv_hCH + jnp.concatenate([dv0, dv1], axis=1),
        dq,
      )

    init = (jnp.zeros_like(k_hCH), jnp.zeros_like(v_hCH), dq_hLRH)
    if m is None:
      begin, unmasked = _query_ranges(j, cfg)
      masked_body = diagonal if halves else functools.partial(body, masked=True)
      carry = jax.lax.fori_loop(begin, unmasked, masked_body, init)
      carry = jax.lax.fori_loop(unmasked, cfg.L, functools.partial(body, masked=False), carry)
    else:
      begin, _ = _query_ranges(j, cfg)
      carry = jax.lax.fori_loop(begin, cfg.L, functools.partial(body, masked=True), init)
    dk_hCH, dv_hCH, dq_hLRH = carry
    return dq_hLRH, (dk_hCH, dv_hCH)

  dq, (dk_MhCH, dv_MhCH) = jax.lax.scan(key_block, jnp.zeros_like(q_hLRH), jnp.arange(cfg.M))
  return dq, jnp.swapaxes(dk_MhCH, 0, 1), jnp.swapaxes(dv_MhCH, 0, 1)


def _map_heads(fn, per_head, shared, cfg):
  """Runs fn(per_head_slices..., shared) over [X, ...] arrays, heads_per_step heads at a time."""
  X = per_head[0].shape[0]
  h = cfg.heads_per_step
  # Step j takes heads j, j + X/h, ...: the major (batch) part of X stays in the per-step axis, so
  # a batch sharded over devices stays sharded inside each step.
  grouped = jax.tree.map(
    lambda a: jnp.swapaxes(a.reshape((h, X // h) + a.shape[1:]), 0, 1), per_head
  )
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
def _chunked_core(q_XLRH, k_XMCH, v_XMCH, mask, cfg):
  return _chunked_core_fwd(q_XLRH, k_XMCH, v_XMCH, mask, cfg)[0]


def _chunked_core_fwd(q_XLRH, k_XMCH, v_XMCH, mask, cfg):
  per_mask, shared_mask = _split_mask(mask, cfg)

  def step(q, k, v, m, shared):
    return _rows_fwd(q, k, v, m if m is not None else shared, cfg)

  o, stat = _map_heads(step, (q_XLRH, k_XMCH, v_XMCH, per_mask), shared_mask, cfg)
  return o, (q_XLRH, k_XMCH, v_XMCH, mask, o, stat)


def _chunked_core_bwd(cfg, res, do_XLRH):
  q_XLRH, k_XMCH, v_XMCH, mask, o, stat = res
  per_mask, shared_mask = _split_mask(mask, cfg)

  def step(q, k, v, m, o, stat, do, shared):
    return _rows_bwd(q, k, v, m if m is not None else shared, o, stat, do, cfg)

  dq, dk, dv = _map_heads(
    step, (q_XLRH, k_XMCH, v_XMCH, per_mask, o, stat, do_XLRH), shared_mask, cfg
  )
  return dq, dk, dv, None


_chunked_core.defvjp(_chunked_core_fwd, _chunked_core_bwd)


def chunked(q, k, v, mask, is_causal, kind, scale, eps, kernel):
  """q [B,T,N,H], k/v [B,S,K,H] (compute dtype), mask [b,n,t,s] or None -> [B,T,N,H]."""
  B, T, N, H = q.shape
  S, K = k.shape[1], k.shape[2]
  G = N // K
  C = min(CHUNK_ROWS, max(T, S))
  L, M = -(-T // C), -(-S // C)
  Tp, Sp = L * C, M * C
  q = q * scale
  q_XLRH = jnp.pad(q, ((0, 0), (0, Tp - T), (0, 0), (0, 0))).reshape(B, L, C, K, G, H)
  q_XLRH = q_XLRH.transpose(0, 3, 1, 2, 4, 5).reshape(B * K, L, C * G, H)  # rows ordered (t, g)
  kv_pad = ((0, 0), (0, Sp - S), (0, 0), (0, 0))
  k_XMCH = (
    jnp.pad(k, kv_pad).reshape(B, M, C, K, H).transpose(0, 3, 1, 2, 4).reshape(B * K, M, C, H)
  )
  v_XMCH = (
    jnp.pad(v, kv_pad).reshape(B, M, C, K, H).transpose(0, 3, 1, 2, 4).reshape(B * K, M, C, H)
  )
  mask_per_head = False
  if mask is not None:
    m = ref.grouped_mask(mask, K)  # [mb, mk, mg, mt, ms]
    mb, mk, mg, mt, ms = m.shape
    m = jnp.pad(
      m, ((0, 0), (0, 0), (0, 0), (0, Tp - T if mt > 1 else 0), (0, Sp - S if ms > 1 else 0))
    )
    if mb > 1 or mk > 1:
      mask_per_head = True
      mask = jnp.broadcast_to(m, (B, K) + m.shape[2:]).reshape((B * K,) + m.shape[2:])
    else:
      mask = m[0, 0]
  budget = _STEP_SCORES_CPU if jax.default_backend() == "cpu" else _STEP_SCORES_ACCEL
  h = max(1, min(B * K, budget // max(1, C * G * C)))
  h = max(h, min(B * K, jax.device_count()))  # at least one head per device in each step
  while (B * K) % h:
    h -= 1
  halves = DIAGONAL_HALVES and is_causal and mask is None and (S - T) % C == 0 and C % 2 == 0
  cfg = ChunkCfg(
    kind, kernel, float(eps), bool(is_causal), T, S, C, G, L, M, h, mask_per_head, halves
  )
  o_XLRH = _chunked_core(q_XLRH, k_XMCH, v_XMCH, mask, cfg)
  o = o_XLRH.reshape(B, K, L, C, G, H).transpose(0, 2, 3, 1, 4, 5).reshape(B, Tp, N, H)
  return o[:, :T]
