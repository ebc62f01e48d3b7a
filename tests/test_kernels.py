"""Pallas EA kernels (GPU and TPU variants) in interpret mode vs a float64 numpy reference.

The reference below materialises the [B, N, T, S] weights in float64 and differentiates them
by hand; `test_reference_gradient_matches_finite_differences` checks that hand derivation
against central differences, so the kernels are compared with an independently verified truth.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ea_jax import attention
from ea_jax.kernels import pallas_attention
from ea_jax.kernels.pallas_attention import expressive_attention_pallas


# ---------------------------------------------------------------------------------------------
# float64 numpy reference (forward and hand-derived backward)
# ---------------------------------------------------------------------------------------------
def _allowed_BNTS(b, n, t, s, causal, mask):
  allowed = np.ones((b, n, t, s), bool)
  if causal:  # aligned to the end: column j visible to row i iff j <= i + s - t
    allowed &= np.arange(s)[None, :] <= np.arange(t)[:, None] + (s - t)
  if mask is not None:
    allowed &= np.broadcast_to(mask, (b, n, t, s))
  return allowed


def reference(
  q, k, v, do=None, *, causal=False, mask=None, scale=None, eps=1e-6, kernel="rational"
):
  """Returns o_BTNH, and (dq, dk, dv) for the loss sum(o * do) when do is given."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  g = n // kh
  scale = 1.0 / np.sqrt(h) if scale is None else scale
  k_BSNH, v_BSNH = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
  s_BNTS = scale * np.einsum("btnh,bsnh->bnts", q, k_BSNH)
  if kernel == "rational":
    f, df = s_BNTS**2 / (1 + s_BNTS**2), 2 * s_BNTS / (1 + s_BNTS**2) ** 2
  else:
    f, df = s_BNTS**2, 2 * s_BNTS
  allowed = _allowed_BNTS(b, n, t, s, causal, mask)
  f, df = np.where(allowed, f, 0.0), np.where(allowed, df, 0.0)
  denom = eps + f.sum(-1, keepdims=True)
  denom_inv = np.where(denom > 0, 1.0 / np.where(denom > 0, denom, 1.0), 0.0)
  p_BNTS = f * denom_inv
  o = np.einsum("bnts,bsnh->btnh", p_BNTS, v_BSNH)
  if do is None:
    return o
  do = np.asarray(do, np.float64)
  dp = np.einsum("btnh,bsnh->bnts", do, v_BSNH)
  # d/df_ij of sum_i do_i . (sum_j f_ij v_j) / (eps + sum_j f_ij)
  dfij = (dp - (dp * p_BNTS).sum(-1, keepdims=True)) * denom_inv
  ds = df * dfij * scale
  dq = np.einsum("bnts,bsnh->btnh", ds, k_BSNH)
  dk = np.einsum("bnts,btnh->bsnh", ds, q).reshape(b, s, kh, g, h).sum(3)
  dv = np.einsum("bnts,btnh->bsnh", p_BNTS, do).reshape(b, s, kh, g, h).sum(3)
  return o, (dq, dk, dv)


def test_reference_gradient_matches_finite_differences():
  rng = np.random.default_rng(0)
  q, k, v = (
    rng.normal(size=(1, 5, 2, 3)),
    rng.normal(size=(1, 6, 1, 3)),
    rng.normal(size=(1, 6, 1, 3)),
  )
  do = rng.normal(size=(1, 5, 2, 3))
  mask = rng.random((1, 2, 5, 6)) < 0.7
  for kernel in ("rational", "square"):
    kw = dict(causal=True, mask=mask, kernel=kernel, scale=0.8, eps=1e-3)
    _, grads = reference(q, k, v, do, **kw)
    for arg, grad in enumerate(grads):
      args = [q, k, v]
      numeric = np.zeros_like(args[arg])
      for idx in np.ndindex(numeric.shape):
        plus = [a.copy() for a in args]
        minus = [a.copy() for a in args]
        plus[arg][idx] += 1e-6
        minus[arg][idx] -= 1e-6
        numeric[idx] = ((reference(*plus, **kw) - reference(*minus, **kw)) * do).sum() / 2e-6
      np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8)


# ---------------------------------------------------------------------------------------------
# Kernels vs reference
# ---------------------------------------------------------------------------------------------
def _inputs(seed, b, t, s, n, kh, h, dtype):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(b, t, n, h)) * 1.5
  k = rng.normal(size=(b, s, kh, h)) * 1.5
  v = rng.normal(size=(b, s, kh, h))
  do = rng.normal(size=(b, t, n, h))
  q, k, v, do = (jnp.asarray(x, dtype) for x in (q, k, v, do))
  return q, k, v, do


def _run(q, k, v, do, **kw):
  """Kernel output and jax.grad of sum(o * do), in one jitted program."""

  def loss(q, k, v):
    o = expressive_attention_pallas(q, k, v, interpret=True, **kw)
    return jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32)), o

  (_, o), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return o, grads


def _rel_err(got, want):
  got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
  return np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30)


# (backend, B, T, S, N, K, H, causal, block_q, block_k, kernel, dtype, mask kind, eps)
CASES = [
  # GPU kernels: T not a multiple of the tile, several tiles, GQA, T < S and T > S.
  ("gpu", 1, 40, 40, 2, 2, 16, True, 16, 16, "rational", "float32", None, 1e-6),
  ("gpu", 2, 24, 40, 4, 2, 8, True, 8, 16, "square", "float32", None, 1e-6),
  # Causal with T > S: the first T - S rows see no key (zeros); eps = 0 must not give NaN.
  ("gpu", 1, 33, 20, 2, 1, 16, True, 16, 8, "rational", "float32", None, 0.0),
  ("gpu", 1, 20, 28, 4, 2, 16, False, 16, 8, "rational", "float32", "per_head", 1e-6),
  ("gpu", 2, 48, 48, 2, 1, 32, True, None, None, "rational", "bfloat16", None, 1e-6),
  ("gpu", 1, 50, 50, 4, 1, 16, True, 32, 8, "square", "bfloat16", "per_head", 1e-6),
  # TPU kernels: tiles are multiples of 128.
  ("tpu", 1, 200, 300, 4, 2, 16, True, 128, 128, "rational", "float32", None, 1e-6),
  ("tpu", 1, 130, 140, 2, 1, 16, False, None, None, "square", "bfloat16", "shared", 1e-6),
  ("tpu", 1, 300, 290, 2, 2, 16, True, 256, 128, "square", "float32", "per_head", 1e-6),
  ("tpu", 2, 160, 140, 2, 1, 8, True, None, None, "rational", "bfloat16", None, 0.0),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(x) for x in c))
def test_kernel_matches_reference(case):
  backend, b, t, s, n, kh, h, causal, bq, bk, kernel, dtype, mask_kind, eps = case
  q, k, v, do = _inputs(len(str(case)), b, t, s, n, kh, h, jnp.dtype(dtype))
  mask = None
  if mask_kind is not None:
    rng = np.random.default_rng(1)
    shape = (b, n, t, s) if mask_kind == "per_head" else (t, s)
    mask = rng.random(shape) < 0.6
    mask[..., 3, :] = False  # a row with nothing allowed
  kw = dict(
    is_causal=causal,
    block_q=bq,
    block_k=bk,
    kernel=kernel,
    eps=eps,
    mask=None if mask is None else jnp.asarray(mask),
    backend=backend,
  )
  o, grads = _run(q, k, v, do, **kw)
  want_o, want_grads = reference(
    q.astype(jnp.float32),
    k.astype(jnp.float32),
    v.astype(jnp.float32),
    do.astype(jnp.float32),
    causal=causal,
    mask=mask,
    eps=eps,
    kernel=kernel,
  )
  assert o.shape == q.shape and o.dtype == q.dtype
  for name, g, x in zip("qkv", grads, (q, k, v)):
    assert g.shape == x.shape and g.dtype == x.dtype, name
  # float32: far inside check_grads' float32 tolerances; bfloat16 in/out, float32 inside.
  fwd_tol, bwd_tol = (1e-5, 2e-5) if dtype == "float32" else (1e-2, 1e-2)
  assert np.all(np.isfinite(np.asarray(o, np.float32)))
  errors = [_rel_err(o, want_o)] + [_rel_err(g, w) for g, w in zip(grads, want_grads)]
  assert errors[0] < fwd_tol, errors
  assert max(errors[1:]) < bwd_tol, errors
  empty_rows = ~_allowed_BNTS(b, n, t, s, causal, mask).any(-1)  # [B, N, T]
  if empty_rows.any():
    o_BNTH = np.asarray(jnp.swapaxes(o, 1, 2), np.float32)
    assert np.all(o_BNTH[empty_rows] == 0.0)


# ---------------------------------------------------------------------------------------------
# Argument checking and dispatch
# ---------------------------------------------------------------------------------------------
def test_bad_arguments_name_the_argument():
  q = jnp.zeros((1, 4, 2, 8))
  kv = jnp.zeros((1, 4, 1, 8))
  with pytest.raises(ValueError, match="kernel"):
    expressive_attention_pallas(q, kv, kv, kernel="cubic")
  with pytest.raises(ValueError, match="backend"):
    expressive_attention_pallas(q, kv, kv, backend="cuda")
  with pytest.raises(ValueError, match="block_q"):
    expressive_attention_pallas(q, kv, kv, block_q=24, backend="gpu")
  with pytest.raises(ValueError, match="block_k"):
    expressive_attention_pallas(q, kv, kv, block_k=64, backend="tpu")
  with pytest.raises(ValueError, match="multiple of key/value heads"):
    expressive_attention_pallas(
      jnp.zeros((1, 4, 3, 8)), jnp.zeros((1, 4, 2, 8)), jnp.zeros((1, 4, 2, 8))
    )
  with pytest.raises(ValueError, match="mask"):
    expressive_attention_pallas(q, kv, kv, mask=jnp.ones((3, 4, 4), bool))
  with pytest.raises(ValueError, match="mask"):
    expressive_attention_pallas(q, kv, kv, mask=jnp.ones((4, 4), jnp.float32))
  with pytest.raises(ValueError, match="eps"):
    expressive_attention_pallas(q, kv, kv, eps=-1.0)


def test_attention_module_dispatches_to_pallas(monkeypatch):
  q, k, v, _ = _inputs(3, 1, 12, 12, 2, 1, 8, jnp.float32)
  calls = []
  real = pallas_attention.expressive_attention_pallas

  def spy(*args, **kwargs):
    calls.append(kwargs)
    return real(*args, **kwargs)

  monkeypatch.setattr(pallas_attention, "expressive_attention_pallas", spy)
  o = attention.expressive_attention(
    q, k, v, is_causal=True, kernel="square", implementation="pallas"
  )
  assert len(calls) == 1 and calls[0].get("is_causal") is True
  want = reference(q, k, v, causal=True, kernel="square")
  assert _rel_err(o, want) < 2e-5


# ---------------------------------------------------------------------------------------------
# Ahead-of-time lowering for the real targets (no accelerator needed)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_kernels_lower_for_accelerators(platform, monkeypatch):
  """Forward and backward lower to Triton (cuda) / Mosaic (tpu) custom calls from a CPU host.

  Catches primitives or tile shapes the real compilers' front ends reject (the device-side
  compilation itself needs the hardware).
  """
  if platform == "tpu":
    from jax._src.pallas.mosaic import tpu_info  # pylint: disable=g-import-not-at-top

    # The Mosaic lowering asks the default device for the chip; pretend it is a v5e.
    monkeypatch.setattr(tpu_info, "get_device_kind", lambda: "TPU v5 lite")
    monkeypatch.setattr(tpu_info, "get_num_device_cores", lambda: 1)
  backend = "gpu" if platform == "cuda" else "tpu"
  q = jax.ShapeDtypeStruct((2, 1024, 4, 128), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((2, 1024, 2, 128), jnp.bfloat16)
  mask = jax.ShapeDtypeStruct((1024, 1024), jnp.bool_)

  def loss(q, k, v, mask):
    o = expressive_attention_pallas(
      q, k, v, mask=mask, is_causal=True, backend=backend, interpret=False
    )
    return jnp.sum(o.astype(jnp.float32))

  lowered = (
    jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    .trace(q, kv, kv, mask)
    .lower(lowering_platforms=(platform,))
  )
  text = lowered.as_text()
  target = "__gpu$xla.gpu.triton" if platform == "cuda" else "tpu_custom_call"
  assert text.count(target) == 3, "expected forward, dQ and dK/dV kernels"


def test_tpu_kernels_in_tpu_faithful_interpreter():
  """The TPU interpreter runs 'parallel' grid axes in random order split over two cores and
  fills scratch with NaN: checks the scratch-carried reductions and the causal skips."""
  pltpu = pytest.importorskip("jax.experimental.pallas.tpu")
  params = pltpu.InterpretParams(random_seed=5, num_cores_or_threads=2)
  q, k, v, do = _inputs(11, 1, 250, 200, 2, 1, 8, jnp.float32)
  kw = dict(is_causal=True, block_q=128, block_k=128, kernel="rational", backend="tpu")

  def loss(q, k, v):
    o = expressive_attention_pallas(q, k, v, interpret=params, **kw)
    return jnp.sum(o * do), o

  (_, o), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
  want_o, want_grads = reference(q, k, v, do, causal=True)
  errors = [_rel_err(o, want_o)] + [_rel_err(g, w) for g, w in zip(grads, want_grads)]
  assert max(errors) < 2e-5, errors


# ---------------------------------------------------------------------------------------------
# Device mesh: kernels run per (batch, head) shard
# ---------------------------------------------------------------------------------------------
_MESH_SCRIPT = r"""
import os
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from ea_jax.kernels import pallas_attention as pa

seen = []
real = pa._attend
def spy(q, k, v, mask, backend, cfg):
    seen.append((q.shape, k.shape, None if mask is None else mask.shape))
    return real(q, k, v, mask, backend, cfg)
pa._attend = spy

rng = np.random.default_rng(0)
q = jnp.asarray(rng.normal(size=(4, 20, 4, 8)), jnp.float32)
k = jnp.asarray(rng.normal(size=(4, 20, 2, 8)), jnp.float32)
v = jnp.asarray(rng.normal(size=(4, 20, 2, 8)), jnp.float32)
mask = jnp.asarray(rng.random((4, 4, 20, 20)) < 0.7)

def loss(q, k, v, mask):
    o = pa.expressive_attention_pallas(q, k, v, mask=mask, is_causal=True, block_q=16,
                                       block_k=16)
    return jnp.sum(o * jnp.cos(o)), o

step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
(_, want_o), want_g = step(q, k, v, mask)
mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
seen.clear()
with jax.set_mesh(mesh):
    put = lambda x: jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"), None, "tensor")))
    (_, o), g = step(put(q), put(k), put(v), mask)
for a, b in zip((o, *g), (want_o, *want_g)):
    err = float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
    assert err < 1e-5, err
print("SHARD_SHAPES", seen[0])
"""


def test_kernels_run_per_shard_under_a_mesh():
  import train_helpers

  proc = train_helpers.run_script(_MESH_SCRIPT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  # Batch 4 over data x fsdp (2 x 2), heads 4 / kv heads 2 over tensor (2); T padded to 32.
  assert "SHARD_SHAPES ((1, 32, 2, 16), (1, 32, 1, 16), (1, 1, 2, 32, 32))" in proc.stdout
