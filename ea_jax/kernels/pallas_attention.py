"""Public entry point of the Pallas EA kernels: validation, padding, backend choice, custom_vjp.

    o_BTNH = expressive_attention_pallas(q_BTNH, k_BSKH, v_BSKH, is_causal=True)

Same contract as ea_jax.attention.expressive_attention: query [B, T, N, H], key/value
[B, S, K, H] with N % K == 0 (query head n uses kv head n // (N // K)); s = scale * q . k
(scale defaults to 1/sqrt(H)); weights f(s) / (eps + sum over allowed keys of f(s)) with
f(s) = s^2/(1+s^2) ("rational") or s^2 ("square"); rows with no allowed key output zeros;
float32 accumulation; output in the query dtype. `mask` is boolean, broadcastable to
[B, N, T, S], True = may attend; causal masking is aligned to the end when T != S.

Forward and backward are both Pallas kernels (jax.custom_vjp): the GPU (Triton) kernels in
`pallas_gpu`, the TPU (Mosaic) kernels in `pallas_tpu`. `backend=None` uses the default JAX
backend; on CPU it runs the GPU kernels in Pallas interpret mode (slow: meant for tests).
`interpret=True` interprets either backend's kernels on any device. Under `jax.set_mesh` the
kernels run per batch/head shard (`mesh_map`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from ea_jax.kernels import mesh_map, pallas_gpu, scores
from ea_jax.kernels.config import KernelConfig

BACKENDS = ("gpu", "tpu")
# Default tiles: forward (rows, columns) and backward (rows, columns).
_GPU_BLOCKS = dict(block_q=128, block_k=64, block_q_bwd=64, block_k_bwd=64)
_TPU_BLOCKS = dict(block_q=512, block_k=512, block_q_bwd=256, block_k_bwd=512)
_GPU_MIN_BLOCK = 16  # Triton dot tiles need >= 16 rows/columns.
_TPU_LANES = 128


def _next_pow2(x: int) -> int:
  return 1 << max(0, int(x) - 1).bit_length()


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _check_shapes(query, key, value):
  for name, x in (("query", query), ("key", key), ("value", value)):
    if x.ndim != 4:
      raise ValueError(f"{name} must have rank 4 ([B, T|S, N|K, H]), got shape {x.shape}")
  b, _, n, h = query.shape
  if key.shape != value.shape:
    raise ValueError(f"key and value must have the same shape, got {key.shape} and {value.shape}")
  if key.shape[0] != b or key.shape[3] != h:
    raise ValueError(
      f"key/value [B, S, K, H] must match query [B, T, N, H] in B and H: "
      f"query {query.shape}, key {key.shape}"
    )
  if n % key.shape[2] != 0:
    raise ValueError(f"query heads N={n} must be a multiple of key/value heads K={key.shape[2]}")
  for name, x in (("query", query), ("key", key), ("value", value)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{name} must be floating point, got {x.dtype}")


def _resolve_backend(backend, interpret):
  platform = jax.default_backend()
  if backend is None:
    backend = platform if platform in BACKENDS else "gpu"
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
  if interpret is None:
    interpret = platform != backend
  # interpret=False with another platform is left to the caller: it allows lowering ahead of
  # time for a GPU/TPU target from a CPU host (jit(...).trace(...).lower(lowering_platforms)).
  # Interpreter parameter objects (e.g. pltpu.InterpretParams) pass through unchanged.
  return backend, bool(interpret) if isinstance(interpret, (bool, int)) else interpret


def _gpu_blocks(t, s, block_q, block_k, interpret):
  """Power-of-two tiles no larger than the (padded) sequence."""
  for name, val in (("block_q", block_q), ("block_k", block_k)):
    if val is None:
      continue
    if val <= 0 or val & (val - 1):
      raise ValueError(f"{name} must be a positive power of two on gpu, got {val}")
    if val < _GPU_MIN_BLOCK and not interpret:
      raise ValueError(f"{name} must be >= {_GPU_MIN_BLOCK} on gpu, got {val}")
  t_cap = max(_GPU_MIN_BLOCK, _next_pow2(t))
  s_cap = max(_GPU_MIN_BLOCK, _next_pow2(s))
  out = {}
  for key_, default in _GPU_BLOCKS.items():
    user = block_q if key_.startswith("block_q") else block_k
    cap = t_cap if key_.startswith("block_q") else s_cap
    out[key_] = min(user if user is not None else default, cap)
  return out


def _tpu_blocks(t, s, block_q, block_k):
  """Multiples of 128, no larger than the sequence rounded up to 128."""
  for name, val in (("block_q", block_q), ("block_k", block_k)):
    if val is not None and (val <= 0 or val % _TPU_LANES):
      raise ValueError(f"{name} must be a positive multiple of {_TPU_LANES} on tpu, got {val}")
  t_cap = _round_up(t, _TPU_LANES)
  s_cap = _round_up(s, _TPU_LANES)
  out = {}
  for key_, default in _TPU_BLOCKS.items():
    user = block_q if key_.startswith("block_q") else block_k
    cap = t_cap if key_.startswith("block_q") else s_cap
    out[key_] = min(user if user is not None else default, cap)
  return out


def _normalise_mask(mask, b, n, t, s, t_pad, s_pad):
  """Bool mask broadcastable to [B, N, T, S] -> int8 [Bm, Nm, T_pad, S_pad], Bm in {1, B},
  Nm in {1, N}; padding is 0 (may not attend)."""
  mask = jnp.asarray(mask)
  if mask.dtype != jnp.bool_:
    raise ValueError(f"mask must be boolean (True = may attend), got dtype {mask.dtype}")
  if mask.ndim > 4:
    raise ValueError(
      f"mask must be broadcastable to [B, N, T, S]=({b}, {n}, {t}, {s}), got shape {mask.shape}"
    )
  mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
  for axis, (got, want, letter) in enumerate(zip(mask.shape, (b, n, t, s), "BNTS")):
    if got not in (1, want):
      raise ValueError(
        f"mask must be broadcastable to [B, N, T, S]=({b}, {n}, {t}, {s}), "
        f"got shape {mask.shape} (axis {letter})"
      )
  mask = jnp.broadcast_to(mask, mask.shape[:2] + (t, s)).astype(jnp.int8)
  return jnp.pad(mask, ((0, 0), (0, 0), (0, t_pad - t), (0, s_pad - s)))


def _backend_module(backend):
  if backend == "gpu":
    return pallas_gpu
  from ea_jax.kernels import pallas_tpu  # pylint: disable=import-outside-toplevel

  return pallas_tpu


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attend(q, k, v, mask, backend, cfg):
  o, _ = _backend_module(backend).forward(q, k, v, mask, cfg)
  return o


def _attend_fwd(q, k, v, mask, backend, cfg):
  o, z = _backend_module(backend).forward(q, k, v, mask, cfg)
  return o, (q, k, v, mask, o, z)


def _attend_bwd(backend, cfg, residuals, do):
  q, k, v, mask, o, z = residuals
  dq, dk, dv = _backend_module(backend).backward(q, k, v, mask, o, z, do, cfg)
  return dq, dk, dv, None


_attend.defvjp(_attend_fwd, _attend_bwd)


def _run(q_BTNH, k_BSKH, v_BSKH, mask, *, backend, cfg):
  """Padded inputs (mask int8 [Bm, Nm, T, S] or None) -> padded o_BTNH via the backend."""
  if backend == "gpu":
    if mask is not None:
      n, kh = q_BTNH.shape[2], k_BSKH.shape[2]
      bm, nm, t, s = mask.shape
      mask = mask.reshape(bm, kh, n // kh, t, s) if nm == n else mask[:, :, None]
    return _attend(q_BTNH, k_BSKH, v_BSKH, mask, backend, cfg)
  # The TPU kernels use [B, heads, length, H] so that tiles are (rows, H) matrices.
  q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q_BTNH, k_BSKH, v_BSKH))
  return jnp.swapaxes(_attend(q, k, v, mask, backend, cfg), 1, 2)


def expressive_attention_pallas(
  query,
  key,
  value,
  *,
  mask=None,
  is_causal=False,
  scale=None,
  eps=1e-6,
  kernel="rational",
  block_q=None,
  block_k=None,
  backend=None,
  interpret=None,
):
  """Expressive attention with Pallas kernels (forward and backward).

  Args:
    query: [B, T, N, H]. key, value: [B, S, K, H], N % K == 0.
    mask: optional bool, broadcastable to [B, N, T, S]; True = may attend.
    is_causal: causal mask aligned to the end (column j visible to row i iff j <= i + S - T).
    scale: multiplies q . k; default 1/sqrt(H).
    eps: added to the row sum of f(s) (>= 0).
    kernel: "rational" or "square".
    block_q, block_k: tile sizes (rows, columns) for all kernels; None = per-kernel defaults.
      gpu: powers of two (>= 16 unless interpreting); tpu: multiples of 128.
    backend: "gpu", "tpu" or None (default JAX backend; CPU -> gpu kernels interpreted).
    interpret: run in Pallas interpret mode; None = only when the backend is not the platform
      (False with another platform only lowers, e.g. ahead of time for a GPU/TPU target).
      A `pltpu.InterpretParams()` selects the TPU-faithful interpreter (backend="tpu").

  Returns:
    [B, T, N, H] in the query dtype.
  """
  _check_shapes(query, key, value)
  if kernel not in scores.KERNELS:
    raise ValueError(f"kernel must be one of {scores.KERNELS}, got {kernel!r}")
  eps = float(eps)
  if not eps >= 0.0:
    raise ValueError(f"eps must be >= 0, got {eps}")
  b, t, n, h = query.shape
  _, s, kh, _ = key.shape
  scale = 1.0 / math.sqrt(h) if scale is None else float(scale)
  backend, interpret = _resolve_backend(backend, interpret)
  out_dtype = query.dtype
  dtype = jnp.result_type(query.dtype, key.dtype, value.dtype)
  q, k, v = (x.astype(dtype) for x in (query, key, value))

  if backend == "gpu":
    blocks = _gpu_blocks(t, s, block_q, block_k, interpret)
  else:
    blocks = _tpu_blocks(t, s, block_q, block_k)
  t_pad = _round_up(t, max(blocks["block_q"], blocks["block_q_bwd"]))
  s_pad = _round_up(s, max(blocks["block_k"], blocks["block_k_bwd"]))
  h_pad = max(_GPU_MIN_BLOCK, _next_pow2(h)) if backend == "gpu" else h
  cfg = KernelConfig(
    scale=scale,
    eps=eps,
    kernel=kernel,
    causal=bool(is_causal),
    seq_offset=s - t,
    interpret=interpret,
    **blocks,
  )

  # Zero padding is exact: padded keys give s = 0 and f(0) = 0; padded rows are cut off.
  if (t_pad, h_pad) != (t, h):
    q = jnp.pad(q, ((0, 0), (0, t_pad - t), (0, 0), (0, h_pad - h)))
  if (s_pad, h_pad) != (s, h):
    k = jnp.pad(k, ((0, 0), (0, s_pad - s), (0, 0), (0, h_pad - h)))
    v = jnp.pad(v, ((0, 0), (0, s_pad - s), (0, 0), (0, h_pad - h)))
  m = None if mask is None else _normalise_mask(mask, b, n, t, s, t_pad, s_pad)
  o = mesh_map.map_over_mesh(functools.partial(_run, backend=backend, cfg=cfg), q, k, v, m)
  return o[:, :t, :, :h].astype(out_dtype)


__all__ = ["expressive_attention_pallas", "BACKENDS"]
