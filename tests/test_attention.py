"""Tests of ea_jax.attention against a float64 numpy reference written here, and invariants."""

import functools
import sys
import types

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import test_util as jtu

from ea_jax import attention as A

IMPLS = ("naive", "chunked", "linear")
VARIANTS = (("ea", "rational"), ("ea", "square"), ("dpa", None))
# The modules' own block sizes, before `small_blocks` patches them (the ill-conditioned cases
# run at these: what the automatic rule and a hand-picked `linear` use).
DEFAULT_CHUNK_ROWS, DEFAULT_LINEAR_CHUNK = A.chunked.CHUNK_ROWS, A.linear.LINEAR_CHUNK
# t_ne_s: the causal diagonal crosses the blocks (general masked path); t_ne_s_aligned: S - T is a
# multiple of the test's 16-key block, so chunked computes its diagonal blocks as halves.
CASES = ("causal", "mask", "gqa", "t_ne_s", "t_ne_s_aligned", "bf16")


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
  """Small blocks so that short test sequences span several blocks (and a padded last one)."""
  monkeypatch.setattr(A.chunked, "CHUNK_ROWS", 16)
  monkeypatch.setattr(A.linear, "LINEAR_CHUNK", 8)


# ----------------------------------------------------------------------------------------------
# Independent reference: float64 numpy, one (batch, head) at a time.
# ----------------------------------------------------------------------------------------------


def ref_weights(q, k, kind, mask=None, causal=False, scale=None, eps=1e-6, kernel="rational"):
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  B, T, N, H = q.shape
  S, K = k.shape[1], k.shape[2]
  scale = 1.0 / np.sqrt(H) if scale is None else scale
  allowed = np.ones((B, N, T, S), bool)
  if mask is not None:
    allowed &= np.broadcast_to(np.asarray(mask), (B, N, T, S))
  if causal:
    allowed &= np.arange(S)[None, :] <= np.arange(T)[:, None] + (S - T)
  w = np.zeros((B, N, T, S))
  for b in range(B):
    for n in range(N):
      s = scale * q[b, :, n] @ k[b, :, n // (N // K)].T
      a = allowed[b, n]
      if kind == "ea":
        f = s**2 if kernel == "square" else s**2 / (1 + s**2)
        f = np.where(a, f, 0.0)
        z = eps + f.sum(-1, keepdims=True)
        w[b, n] = f / np.where(z > 0, z, 1.0)
      else:
        for t in range(T):
          if a[t].any():
            e = np.exp(s[t, a[t]] - s[t, a[t]].max())
            w[b, n, t, a[t]] = e / e.sum()
  return w


def ref_attention(q, k, v, kind, **kw):
  w = ref_weights(q, k, kind, **kw)
  v = np.asarray(v, np.float64)
  B, T, N, H = np.shape(q)
  K = v.shape[2]
  out = np.zeros((B, T, N, H))
  for n in range(N):
    out[:, :, n] = np.einsum("bts,bsh->bth", w[:, n], v[:, :, n // (N // K)])
  return out


def run(impl, kind, kernel, q, k, v, *, mask=None, is_causal=False, scale=None, eps=1e-6):
  """The function under test, jitted (block sizes are part of the cache key)."""
  return _run(
    q,
    k,
    v,
    mask,
    impl=impl,
    kind=kind,
    kernel=kernel,
    is_causal=is_causal,
    scale=scale,
    eps=eps,
    blocks=(A.chunked.CHUNK_ROWS, A.linear.LINEAR_CHUNK),
  )


@functools.partial(
  jax.jit, static_argnames=("impl", "kind", "kernel", "is_causal", "scale", "eps", "blocks")
)
def _run(q, k, v, mask, *, impl, kind, kernel, is_causal, scale, eps, blocks):
  del blocks
  if kind == "ea":
    return A.expressive_attention(
      q,
      k,
      v,
      mask=mask,
      is_causal=is_causal,
      scale=scale,
      eps=eps,
      kernel=kernel,
      implementation=impl,
    )
  return A.dot_product_attention(
    q, k, v, mask=mask, is_causal=is_causal, scale=scale, implementation=impl
  )


def make(rng, B=2, T=37, S=None, N=2, K=None, H=8, dtype=jnp.float32, scale=1.0):
  S = T if S is None else S
  K = N if K is None else K
  q = rng.normal(size=(B, T, N, H)) * scale
  k = rng.normal(size=(B, S, K, H)) * scale
  v = rng.normal(size=(B, S, K, H))
  return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def applicable(impl, kind, kernel, causal, has_mask):
  """Whether implementation `impl` accepts this variant ("linear": causal square-kernel EA only)."""
  return impl != "linear" or (kind == "ea" and kernel == "square" and causal and not has_mask)


def valid_params(
  impls, variants, cases=(None,), causal_of=lambda case: True, masked_of=lambda case: False
):
  """(impl, kind, kernel[, case]) combinations that `impl` accepts (no skipped parametrisations)."""
  out = []
  for impl in impls:
    for kind, kernel in variants:
      for case in cases:
        if applicable(impl, kind, kernel, causal_of(case), masked_of(case)):
          out.append((impl, kind, kernel) if case is None else (impl, kind, kernel, case))
  return out


# ----------------------------------------------------------------------------------------------
# Every implementation x kernel x case against the reference
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "impl,kind,kernel,case",
  valid_params(
    IMPLS, VARIANTS, CASES, causal_of=lambda c: c != "mask", masked_of=lambda c: c == "mask"
  ),
)
def test_matches_reference(impl, kind, kernel, case):
  rng = np.random.default_rng(0)
  dtype = jnp.bfloat16 if case == "bf16" else jnp.float32
  shape = dict(
    gqa=dict(N=4, K=2), t_ne_s=dict(T=21, S=45), t_ne_s_aligned=dict(T=21, S=53, N=4, K=2)
  ).get(case, {})
  q, k, v = make(rng, dtype=dtype, **shape)
  mask = None
  causal = case != "mask"
  if case == "mask":
    mask = jnp.asarray(rng.random((2, 1, 37, 37)) > 0.4)
  out = run(impl, kind, kernel, q, k, v, mask=mask, is_causal=causal)
  assert out.dtype == dtype and out.shape == q.shape
  want = ref_attention(
    q.astype(jnp.float32),
    k.astype(jnp.float32),
    v.astype(jnp.float32),
    kind,
    mask=mask,
    causal=causal,
    kernel=kernel,
  )
  tol = 2e-2 if case == "bf16" else 2e-5
  np.testing.assert_allclose(np.asarray(out, np.float64), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("impl", IMPLS)
def test_float16_accumulates_in_float32(impl):
  rng = np.random.default_rng(15)
  q, k, v = make(rng, dtype=jnp.float16, scale=4.0)  # row sums of s^2 exceed the float16 range
  out = run(impl, "ea", "square", q, k, v, is_causal=True)
  assert out.dtype == jnp.float16 and np.all(np.isfinite(out))
  want = ref_attention(
    q.astype(jnp.float32),
    k.astype(jnp.float32),
    v.astype(jnp.float32),
    "ea",
    causal=True,
    kernel="square",
  )
  np.testing.assert_allclose(np.asarray(out, np.float64), want, atol=5e-3, rtol=5e-3)


@pytest.mark.parametrize("kind,kernel", VARIANTS)
def test_attention_weights_match_reference_and_rows_sum_to_one(kind, kernel):
  rng = np.random.default_rng(1)
  q, k, _ = make(rng, T=19, S=23, N=4, K=2)
  mask = rng.random((2, 4, 19, 23)) > 0.5
  mask[0, 1, 3] = False  # a row with nothing allowed
  w = A.attention_weights(
    q, k, kind=kind, mask=jnp.asarray(mask), is_causal=True, eps=0.0, kernel=kernel or "rational"
  )
  want = ref_weights(q, k, kind, mask=mask, causal=True, eps=0.0, kernel=kernel)
  assert w.shape == (2, 4, 19, 23)
  np.testing.assert_allclose(w, want, atol=1e-5, rtol=1e-5)
  sums = np.asarray(w).sum(-1)
  any_allowed = want.sum(-1) > 0
  np.testing.assert_allclose(sums[any_allowed], 1.0, atol=1e-5)
  assert np.all(sums[~any_allowed] == 0) and (~any_allowed).any()


def test_per_head_mask_with_gqa():
  """A mask with a full [B,N] part, so each query head of a group sees a different mask."""
  rng = np.random.default_rng(2)
  q, k, v = make(rng, T=40, N=4, K=2)
  mask = jnp.asarray(rng.random((2, 4, 40, 40)) > 0.3)
  for impl in ("naive", "chunked"):
    for kind, kernel in VARIANTS:
      out = run(impl, kind, kernel, q, k, v, mask=mask)
      want = ref_attention(q, k, v, kind, mask=mask, kernel=kernel)
      np.testing.assert_allclose(out, want, atol=2e-5, rtol=2e-5, err_msg=f"{impl} {kind}")


# ----------------------------------------------------------------------------------------------
# Invariants
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl,kind,kernel", valid_params(IMPLS, VARIANTS[:2]))
def test_ea_unchanged_when_a_key_flips_sign(impl, kind, kernel):
  rng = np.random.default_rng(3)
  q, k, v = make(rng)
  flip = jnp.where(jnp.arange(37)[None, :, None, None] % 3 == 1, -1.0, 1.0)
  out = run(impl, kind, kernel, q, k, v, is_causal=True)
  out_flipped = run(impl, kind, kernel, q, k * flip, v, is_causal=True)
  np.testing.assert_allclose(out_flipped, out, atol=1e-5, rtol=1e-5)
  # ...whereas dot-product attention does change (the invariance is not vacuous).
  dpa = run("naive", "dpa", None, q, k, v, is_causal=True)
  assert not np.allclose(run("naive", "dpa", None, q, k * flip, v, is_causal=True), dpa, atol=1e-3)


@pytest.mark.parametrize("impl,kind,kernel", valid_params(IMPLS, VARIANTS))
def test_future_token_never_changes_past_output(impl, kind, kernel):
  rng = np.random.default_rng(4)
  q, k, v = make(rng, N=4, K=2)
  t = 20
  noise = jnp.asarray(rng.normal(size=q.shape[:1] + (37 - t,) + q.shape[2:]), jnp.float32)
  q2 = q.at[:, t:].add(noise)
  k2 = k.at[:, t:].add(10 * noise[:, :, :2])
  v2 = v.at[:, t:].add(noise[:, :, :2])
  out = run(impl, kind, kernel, q, k, v, is_causal=True)
  out2 = run(impl, kind, kernel, q2, k2, v2, is_causal=True)
  np.testing.assert_array_equal(np.asarray(out[:, :t]), np.asarray(out2[:, :t]))
  assert not np.allclose(out[:, t:], out2[:, t:])


@pytest.mark.parametrize("impl,kind,kernel", valid_params(IMPLS, VARIANTS))
def test_empty_rows_are_zero_and_large_inputs_stay_exact(impl, kind, kernel):
  rng = np.random.default_rng(5)
  # Causal with T > S: the first T - S = 12 queries see no key; the mask empties row 20 too.
  q, k, v = make(rng, T=30, S=18, scale=300.0)
  mask = np.ones((1, 1, 30, 18), bool)
  mask[..., 20, :] = False
  mask = None if impl == "linear" else jnp.asarray(mask)
  out = run(impl, kind, kernel, q, k, v, mask=mask, is_causal=True)
  want = ref_attention(q, k, v, kind, mask=mask, causal=True, kernel=kernel)
  assert np.all(np.isfinite(out))
  np.testing.assert_array_equal(np.asarray(out[:, :12]), 0.0)
  if mask is not None:
    np.testing.assert_array_equal(np.asarray(out[:, 20]), 0.0)
  # |out| <= 2.5 here: within ~8 float32 ulps (2.4e-7 at 2) of the reference, although the
  # scores are ~1e5 (measured: at most 3.8e-7 over every implementation).
  np.testing.assert_allclose(out, want, atol=2e-6, rtol=0)


# ----------------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl,kind,kernel", valid_params(IMPLS, VARIANTS))
def test_check_grads_float64(impl, kind, kernel, monkeypatch):
  monkeypatch.setattr(A.chunked, "CHUNK_ROWS", 4)
  monkeypatch.setattr(A.linear, "LINEAR_CHUNK", 4)
  with jax.enable_x64(True):
    rng = np.random.default_rng(7)
    q, k, v = make(rng, B=1, T=7, S=9, N=2, K=1, H=3, dtype=jnp.float64)
    mask = None if impl == "linear" else jnp.asarray(rng.random((1, 2, 7, 9)) > 0.3)
    f = functools.partial(run, impl, kind, kernel, mask=mask, is_causal=True)
    jtu.check_grads(f, (q, k, v), order=1, modes=("rev",), atol=1e-6, rtol=1e-6, eps=1e-6)


@functools.partial(jax.jit, static_argnames=("impl", "kind", "kernel", "is_causal", "blocks"))
def _grads(q, k, v, mask, ct, *, impl, kind, kernel, is_causal, blocks):
  """d/d(q, k, v) of sum(out * ct) (jitted and cached across tests; blocks in the cache key)."""

  def loss(q, k, v):
    return jnp.sum(
      _run(
        q,
        k,
        v,
        mask,
        impl=impl,
        kind=kind,
        kernel=kernel,
        is_causal=is_causal,
        scale=None,
        eps=1e-6,
        blocks=blocks,
      )
      * ct
    )

  return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


@pytest.mark.parametrize(
  "impl,kind,kernel,case",
  valid_params(
    ("chunked", "linear"),
    VARIANTS,
    ("causal_gqa", "causal_aligned_offset", "mask_t_ne_s"),
    causal_of=lambda c: c != "mask_t_ne_s",
    masked_of=lambda c: c == "mask_t_ne_s",
  ),
)
def test_gradients_match_naive(impl, kind, kernel, case):
  rng = np.random.default_rng(8)
  if case == "causal_gqa":
    q, k, v = make(rng, N=4, K=2)
    kw = dict(is_causal=True)
  elif case == "causal_aligned_offset":  # S - T = 32: chunked's diagonal halves, T != S
    q, k, v = make(rng, T=21, S=53)
    kw = dict(is_causal=True)
  else:
    q, k, v = make(rng, T=21, S=45)
    mask = rng.random((2, 2, 21, 45)) > 0.4
    mask[:, :, 9] = False  # gradients stay finite on rows with nothing to attend to ...
    kw = dict(mask=jnp.asarray(mask))
  q = q.at[:, :5].set(0.0)  # ... and at q = 0
  ct = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  got = _grads(
    q,
    k,
    v,
    kw.get("mask"),
    ct,
    impl=impl,
    kind=kind,
    kernel=kernel,
    is_causal=kw.get("is_causal", False),
    blocks=(A.chunked.CHUNK_ROWS, A.linear.LINEAR_CHUNK),
  )
  want = _grads(
    q,
    k,
    v,
    kw.get("mask"),
    ct,
    impl="naive",
    kind=kind,
    kernel=kernel,
    is_causal=kw.get("is_causal", False),
    blocks=None,
  )
  for g, w, name in zip(got, want, "qkv"):
    assert np.all(np.isfinite(g)) and np.all(np.isfinite(w)), f"d{name} not finite"
    np.testing.assert_allclose(
      g, w, atol=5e-5 * float(np.abs(w).max()), rtol=1e-4, err_msg=f"d{name}"
    )


def test_gradient_flows_to_scale():
  rng = np.random.default_rng(9)
  q, k, v = make(rng, T=12)
  for impl in ("naive", "chunked"):
    f = jax.jit(
      lambda s, impl=impl: jnp.sum(
        A.expressive_attention(q, k, v, scale=s, implementation=impl) * v[:, :, :1]
      )
    )
    g, h = float(jax.grad(f)(0.7)), 1e-3
    assert abs(g - (float(f(0.7 + h)) - float(f(0.7 - h))) / (2 * h)) < 1e-2 * (1 + abs(g))


# ----------------------------------------------------------------------------------------------
# One-step decoding
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,kernel", VARIANTS)
def test_kv_cache_decode_equals_full_sequence(kind, kernel):
  rng = np.random.default_rng(10)
  B, T, N, K, H = 2, 12, 4, 2, 8
  q, k, v = make(rng, B=B, T=T, N=N, K=K, H=H)
  full = run("naive", kind, kernel, q, k, v, is_causal=True)
  step = jax.jit(functools.partial(A.kv_cache_step, kind=kind, kernel=kernel or "rational"))
  cache = A.init_kv_cache(B, T + 3, K, H)
  outs = []
  for t in range(T):
    out, cache = step(cache, q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1])
    outs.append(out)
  assert int(cache.length) == T
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-5, rtol=1e-5)


def test_recurrent_decode_equals_full_sequence_and_state_size_is_constant():
  rng = np.random.default_rng(11)
  B, T, N, K, H = 2, 40, 4, 2, 6
  q, k, v = make(rng, B=B, T=T, N=N, K=K, H=H)
  full = ref_attention(q, k, v, "ea", causal=True, kernel="square")
  state = A.init_recurrent_state(B, K, H)
  assert state.kv.shape == (B, K, H * (H + 1) // 2, H) and state.z.shape == (B, K, H * (H + 1) // 2)
  step = jax.jit(A.recurrent_step)
  outs = []
  for t in range(T):
    out, new_state = step(state, q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1])
    assert jax.tree.map(jnp.shape, new_state) == jax.tree.map(jnp.shape, state)
    state = new_state
    outs.append(out)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=2e-5, rtol=2e-5)


def test_square_features_reproduce_squared_dot_product():
  rng = np.random.default_rng(12)
  x, y = rng.normal(size=(2, 5, 7))
  phi = A.square_features(jnp.asarray(x)), A.square_features(jnp.asarray(y))
  assert phi[0].shape == (5, 28)
  np.testing.assert_allclose(jnp.sum(phi[0] * phi[1], -1), np.sum(x * y, -1) ** 2, rtol=1e-5)


def test_square_features_by_rows_and_their_written_out_transpose():
  """linear.py lays features out by rows and writes the feature map's VJP by hand: the rows layout
  is the transpose of the features-last one, and the hand VJP equals autodiff's."""
  rng = np.random.default_rng(13)
  x_XHR = jnp.asarray(rng.normal(size=(3, 6, 5)))
  by_rows = A.square_features(x_XHR, axis=-2)
  np.testing.assert_array_equal(
    by_rows, jnp.swapaxes(A.square_features(jnp.swapaxes(x_XHR, 1, 2)), 1, 2)
  )
  d_XFR = jnp.asarray(rng.normal(size=by_rows.shape))
  (want,) = jax.vjp(lambda x: A.square_features(x, axis=-2), x_XHR)[1](d_XFR)
  got = A.linear._square_features_vjp_rows(x_XHR, d_XFR)  # pylint: disable=protected-access
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_kv_cache_full_raises_outside_jit():
  cache = A.init_kv_cache(1, 2, 1, 4)._replace(length=jnp.asarray(2, jnp.int32))
  x = jnp.zeros((1, 1, 1, 4))
  with pytest.raises(ValueError, match="full"):
    A.kv_cache_step(cache, x, x, x, kind="ea")


@pytest.mark.parametrize("kind,kernel", VARIANTS)
def test_kv_cache_past_its_end_under_jit_drops_the_token_and_flags_it(kind, kernel):
  rng = np.random.default_rng(17)
  B, S, N, K, H = 2, 5, 4, 2, 8
  q, k, v = make(rng, B=B, T=S + 2, N=N, K=K, H=H)
  step = jax.jit(functools.partial(A.kv_cache_step, kind=kind, kernel=kernel or "rational"))
  cache = A.init_kv_cache(B, S, K, H)
  for t in range(S):
    _, cache = step(cache, q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1])
  assert not bool(cache.overflowed) and int(cache.length) == S
  full = cache
  for t in (S, S + 1):
    out, cache = step(cache, q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1])
    assert bool(cache.overflowed) and int(cache.length) == S
    np.testing.assert_array_equal(cache.key, full.key)
    np.testing.assert_array_equal(cache.value, full.value)
    # The query attends over the S cached tokens only (not over its own dropped token).
    want = ref_attention(q[:, t : t + 1], k[:, :S], v[:, :S], kind, kernel=kernel)
    np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Auto rule and dispatch
# ----------------------------------------------------------------------------------------------


def test_auto_rule():
  choose = A.choose_implementation
  big = dict(T=4096, S=4096, H=32)
  for backend in ("gpu", "tpu"):
    for causal in (False, True):
      for kernel in A.KERNELS:
        assert (
          choose("ea", is_causal=causal, has_mask=False, kernel=kernel, backend=backend, **big)
          == "pallas"
        )
        assert (
          choose("ea", is_causal=causal, has_mask=True, kernel=kernel, backend=backend, **big)
          == "chunked"
        )
    assert choose("dpa", is_causal=True, has_mask=False, backend=backend, **big) == "chunked"
    assert (
      choose("dpa", T=512, S=512, H=32, is_causal=True, has_mask=False, backend=backend) == "naive"
    )
    assert (
      choose("ea", T=512, S=512, H=32, is_causal=True, has_mask=True, backend=backend) == "naive"
    )
  # CPU: always "chunked"; never "linear", whose error on nearly orthogonal queries exceeds 1e-4
  # (test_auto_rule_is_exact_on_ill_conditioned_queries, test_linear_stays_within_its_bound).
  for kind in A.KINDS:
    for kernel in A.KERNELS:
      for causal in (False, True):
        for has_mask in (False, True):
          for T in (16, 128, 1024, 8192, 32768):
            got = choose(
              kind,
              T=T,
              S=T,
              H=32,
              is_causal=causal,
              has_mask=has_mask,
              kernel=kernel,
              backend="cpu",
            )
            assert got == "chunked", (kind, kernel, causal, has_mask, T, got)
  rng = np.random.default_rng(13)
  q, k, v = make(rng)
  np.testing.assert_allclose(
    A.expressive_attention(q, k, v, is_causal=True),
    ref_attention(q, k, v, "ea", causal=True),
    atol=2e-5,
  )


def test_dpa_matches_jax_nn_dot_product_attention():
  """An external oracle: jax.nn.dot_product_attention (XLA), with a mask, GQA, causal, T != S.

  jax.nn's is_causal aligns to the start (tril of [T, S]); ours aligns to the end (query i at key
  position S - T + i), so for T != S the oracle gets that mask explicitly.
  """
  rng = np.random.default_rng(16)
  for T, S, causal in ((21, 45, True), (40, 23, False)):
    q, k, v = make(rng, T=T, S=S, N=4, K=2)
    mask = jnp.asarray(rng.random((2, 4, T, S)) > 0.2) if not causal else None
    end_aligned = jnp.arange(S)[None, :] <= jnp.arange(T)[:, None] + (S - T)
    oracle_mask = end_aligned[None, None] if causal and T != S else mask
    want = jax.nn.dot_product_attention(
      q, k, v, mask=oracle_mask, is_causal=causal and T == S, implementation="xla"
    )
    for impl in ("naive", "chunked"):
      got = run(impl, "dpa", None, q, k, v, mask=mask, is_causal=causal)
      np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5, err_msg=f"{impl} T={T} S={S}")


# ----------------------------------------------------------------------------------------------
# Ill-conditioned inputs: queries nearly orthogonal to every key
# ----------------------------------------------------------------------------------------------


def nearly_orthogonal(T, H, f, *, N=2, subspace=8, seed=0):
  """Keys in a random `subspace`-dim subspace of R^H; queries with a fraction f of their norm in
  it (the rest orthogonal to it); float32 [1,T,N,H] each."""
  rng = np.random.default_rng(seed)
  basis = np.linalg.qr(rng.normal(size=(H, H)))[0]
  inside, outside = basis[:, :subspace], basis[:, subspace:]
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  a = unit(rng.normal(size=(T, N, subspace)) @ inside.T)
  b = unit(rng.normal(size=(T, N, H - subspace)) @ outside.T)
  q = np.sqrt(H) * (f * a + np.sqrt(1 - f * f) * b)
  k = np.sqrt(H) * unit(rng.normal(size=(T, N, subspace)) @ inside.T)
  v = rng.normal(size=(T, N, H))
  return tuple(jnp.asarray(x[None], jnp.float32) for x in (q, k, v))


def causal_square_ea_float64(q, k, v, eps=1e-6):
  """The float64 truth from the float32 inputs (one head at a time)."""
  q, k, v = (np.asarray(x, np.float64)[0] for x in (q, k, v))
  T, N, H = q.shape
  out = np.zeros((T, N, H))
  for n in range(N):
    s = (q[:, n] / np.sqrt(H)) @ k[:, n].T
    w = np.tril(s * s)
    out[:, n] = (w @ v[:, n]) / (eps + w.sum(-1, keepdims=True))
  return out[None]


def normwise_error(out, want):
  return float(np.max(np.abs(np.asarray(out, np.float64) - want)) / np.max(np.abs(want)))


@pytest.fixture(scope="module")
def ill_conditioned():
  """f = 0.01, T = 2048, H = 32, B = 1, N = 2: the case the automatic rule must get right."""
  q, k, v = nearly_orthogonal(2048, 32, 0.01)
  return q, k, v, causal_square_ea_float64(q, k, v)


def test_auto_rule_is_exact_on_ill_conditioned_queries(ill_conditioned):
  q, k, v, want = ill_conditioned
  for impl in (None, "naive", "chunked"):
    with pytest.MonkeyPatch.context() as mp:
      mp.setattr(A.chunked, "CHUNK_ROWS", DEFAULT_CHUNK_ROWS)
      out = jax.jit(
        lambda q, k, v, impl=impl: A.expressive_attention(
          q, k, v, is_causal=True, kernel="square", implementation=impl
        )
      )(q, k, v)
    assert normwise_error(out, want) < 1e-4, impl


def test_linear_stays_within_its_bound(ill_conditioned):
  """linear's documented bound at f = 0.01 (linear.py: ~2e-4; float32 rounding would be ~1e-5)."""
  q, k, v, want = ill_conditioned
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(A.linear, "LINEAR_CHUNK", DEFAULT_LINEAR_CHUNK)
    out = A.expressive_attention(q, k, v, is_causal=True, kernel="square", implementation="linear")
  err = normwise_error(out, want)
  assert err < 1e-3, err


RECURRENT_BOUND_F01 = 1e-3  # decode.recurrent_step's documented bound: ~3e-4 measured


def test_recurrent_state_stays_within_its_bound():
  """recurrent_step over T = 512 tokens at f = 0.1 against float64 (decode.py's bound)."""
  q, k, v = nearly_orthogonal(512, 32, 0.1)
  want = causal_square_ea_float64(q, k, v)

  @jax.jit
  def decode(q, k, v):
    def body(state, x):
      out, state = A.recurrent_step(state, *x)
      return state, out

    xs = tuple(jnp.swapaxes(x, 0, 1)[:, :, None] for x in (q, k, v))
    return jnp.swapaxes(jax.lax.scan(body, A.init_recurrent_state(1, 2, 32), xs)[1][:, :, 0], 0, 1)

  assert normwise_error(decode(q, k, v), want) < RECURRENT_BOUND_F01


# ----------------------------------------------------------------------------------------------
# Chunked: structure and sharding
# ----------------------------------------------------------------------------------------------


def test_chunked_trace_does_not_grow_with_length():
  """The block loops are loops: the fwd+bwd program is the same size at 4 and at 64 blocks."""

  def size(T):
    q = jnp.zeros((1, T, 2, 8))
    loss = lambda q: jnp.sum(
      A.expressive_attention(q, q, q, is_causal=True, implementation="chunked")
    )
    return str(jax.make_jaxpr(jax.grad(loss))(q)).count("dot_general")

  # Forward: 2 products in the unmasked loop, 2 x 2 in the diagonal block's two halves;
  # backward: 5 unmasked, 2 x 5 diagonal. Unrolled code would have them once per block.
  assert size(64) == size(1024) == 21


_MESH_SCRIPT = r"""
import os
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from ea_jax import attention as A
A.chunked.CHUNK_ROWS = 16
rng = np.random.default_rng(0)
B, T, N, K, H = 8, 72, 4, 2, 8           # 5 query blocks, the last one padded
q = jnp.asarray(rng.normal(size=(B, T, N, H)), jnp.float32)
k = jnp.asarray(rng.normal(size=(B, T, K, H)), jnp.float32)
v = jnp.asarray(rng.normal(size=(B, T, K, H)), jnp.float32)
mask = jnp.asarray(rng.random((B, 1, T, T)) < 0.8)
for kind, kernel, m, causal in (("ea", "rational", None, True), ("dpa", "rational", mask, True)):
  def loss(q, k, v, impl):
    if kind == "ea":
      o = A.expressive_attention(q, k, v, mask=m, is_causal=causal, kernel=kernel,
                                 implementation=impl)
    else:
      o = A.dot_product_attention(q, k, v, mask=m, is_causal=causal, implementation=impl)
    return jnp.sum(o * jnp.cos(o))
  want = jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v, "naive")
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
  with jax.set_mesh(mesh):
    put = lambda x: jax.device_put(x, NamedSharding(mesh, P("data")))
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)), static_argnums=3)
    got = step(put(q), put(k), put(v), "chunked")
    assert len(got[1][0].sharding.device_set) == 8
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    err = float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
    assert err < 2e-5, (kind, err)
print("MESH_OK")
"""


def test_chunked_with_several_blocks_under_an_8_device_mesh():
  import train_helpers  # pylint: disable=g-import-not-at-top

  proc = train_helpers.run_script(_MESH_SCRIPT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "MESH_OK" in proc.stdout


_EXPLICIT_MESH_SCRIPT = r"""
import os
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from ea_jax import attention as A
A.chunked.CHUNK_ROWS = 16
A.linear.LINEAR_CHUNK = 16
rng = np.random.default_rng(1)
B, T, N, K, H = 4, 40, 4, 2, 8            # 3 blocks of 16 (the last padded), 2 query heads per kv head
q = jnp.asarray(rng.normal(size=(B, T, N, H)), jnp.float32)
k = jnp.asarray(rng.normal(size=(B, T, K, H)), jnp.float32)
v = jnp.asarray(rng.normal(size=(B, T, K, H)), jnp.float32)
mask = jnp.asarray(rng.random((B, 1, T, T)) < 0.8)
mesh = jax.make_mesh((4, 2), ("data", "tensor"))   # jax.make_mesh's default: Explicit axes
assert mesh.axis_types == (AxisType.Explicit, AxisType.Explicit), mesh.axis_types
spec = P("data", None, "tensor", None)             # batch over data, heads over tensor
put = lambda x, s=spec: jax.device_put(x, NamedSharding(mesh, s))

def close(got, want, what, rtol=2e-5):
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    if not jnp.issubdtype(b.dtype, jnp.floating):   # a cache's length and overflow flag
      assert np.array_equal(a, b), (what, a, b)
      continue
    err = float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
    assert err < rtol, (what, err)

cases = (
  ("ea", "rational", None, "naive"), ("ea", "rational", None, "chunked"),
  ("ea", "square", None, "linear"), ("dpa", "rational", mask, "chunked"),
  ("ea", "rational", mask, "naive"),
)
for kind, kernel, m, impl in cases:
  def loss(q, k, v, m=m, kind=kind, kernel=kernel, impl=impl):
    if kind == "ea":
      o = A.expressive_attention(q, k, v, mask=m, is_causal=True, kernel=kernel,
                                 implementation=impl)
    else:
      o = A.dot_product_attention(q, k, v, mask=m, is_causal=True, implementation=impl)
    return jnp.sum(o * jnp.cos(o)), o
  want = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
  with jax.set_mesh(mesh):
    got = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(put(q), put(k), put(v))
    (_, out), (dq, dk, dv) = got
    assert jax.typeof(out).sharding.spec == spec, (impl, jax.typeof(out))
    assert jax.typeof(dq).sharding.spec == spec, (impl, jax.typeof(dq))
  close((out, got[1]), (want[0][1], want[1]), (kind, impl))  # the output and the gradients

# Outside jit too (op by op), and the materialised weights.
with jax.set_mesh(mesh):
  eager = A.expressive_attention(put(q), put(k), put(v), is_causal=True, implementation="chunked")
  weights = A.attention_weights(put(q), put(k), kind="ea", is_causal=True)
close(eager, A.expressive_attention(q, k, v, is_causal=True, implementation="chunked"), "eager")
close(weights, A.attention_weights(q, k, kind="ea", is_causal=True), "weights")

# Decode: a cache / state built unsharded, sharded tokens; outputs as the query, new cache as given.
cache0, state0 = A.init_kv_cache(B, 8, K, H), A.init_recurrent_state(B, K, H)
tok = lambda x: x[:, :1]
kv = lambda c, q, k, v: A.kv_cache_step(c, q, k, v, kind="ea")
rec = lambda s, q, k, v: A.recurrent_step(s, q, k, v)
for name, fn, s0 in (("kv_cache_step", kv, cache0), ("recurrent_step", rec, state0)):
  want = fn(s0, tok(q), tok(k), tok(v))
  with jax.set_mesh(mesh):
    got = jax.jit(fn)(s0, put(tok(q)), put(tok(k)), put(tok(v)))
    assert jax.typeof(got[0]).sharding.spec == spec, (name, jax.typeof(got[0]))
  close(got, want, name)
print("EXPLICIT_OK")
"""


def test_every_implementation_under_an_explicit_mesh():
  """jax.make_mesh's default mesh has Explicit axes, under which a reshape of a sharded axis
  must name its result's sharding: the blockwise forms fold batch and heads together, the decode
  steps write sharded tokens into unsharded buffers. Each public function matches its unsharded
  value and gradients, and returns the query's sharding (batch over data, heads over tensor)."""
  import train_helpers  # pylint: disable=g-import-not-at-top

  proc = train_helpers.run_script(_EXPLICIT_MESH_SCRIPT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "EXPLICIT_OK" in proc.stdout


def test_explicit_axes_wrapper_leaves_functions_alone_without_them():
  """No mesh, or a mesh of Auto axes: the attention functions trace exactly as they would
  without the Explicit-mesh wrapper (it hands back the function itself)."""
  fn = lambda x: x
  assert A.reference.auto_where_explicit(fn, jnp.ones(2)) is fn
  with jax.set_mesh(jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))):
    assert A.reference.auto_where_explicit(fn, jnp.ones(2)) is fn
  with jax.set_mesh(jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))):
    assert A.reference.auto_where_explicit(fn, jnp.ones(2)) is not fn


def test_pallas_dispatch_passes_keyword_arguments(monkeypatch):
  calls = []

  def fake(query, key, value, *, mask, is_causal, scale, eps, kernel):
    calls.append(dict(mask=mask, is_causal=is_causal, scale=scale, eps=eps, kernel=kernel))
    return query

  module = types.ModuleType("ea_jax.kernels.pallas_attention")
  module.expressive_attention_pallas = fake
  monkeypatch.setitem(sys.modules, "ea_jax.kernels.pallas_attention", module)
  import ea_jax.kernels  # pylint: disable=g-import-not-at-top

  monkeypatch.setattr(ea_jax.kernels, "pallas_attention", module, raising=False)
  q, k, v = make(np.random.default_rng(14), H=4)
  A.expressive_attention(
    q, k, v, is_causal=True, scale=0.5, eps=1e-3, kernel="square", implementation="pallas"
  )
  assert calls == [dict(mask=None, is_causal=True, scale=0.5, eps=1e-3, kernel="square")]
  monkeypatch.setattr(A, "choose_implementation", lambda *a, **kw: "pallas")
  A.expressive_attention(q, k, v)
  assert len(calls) == 2


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------


def test_errors_name_the_argument():
  x = jnp.zeros((2, 5, 4, 8))
  kv = jnp.zeros((2, 5, 2, 8))
  ea = A.expressive_attention
  cases = [
    (lambda: ea(x[0], kv, kv), "query must have rank 4"),
    (lambda: ea(x, kv[0], kv), "key must have rank 4"),
    (lambda: ea(x, kv, kv[:, :3]), "value shape"),
    (lambda: ea(x, jnp.zeros((2, 5, 3, 8)), jnp.zeros((2, 5, 3, 8))), "multiple"),
    (lambda: ea(x, jnp.zeros((2, 5, 2, 4)), jnp.zeros((2, 5, 2, 4))), "head dim"),
    (lambda: ea(x, jnp.zeros((3, 5, 2, 8)), jnp.zeros((3, 5, 2, 8))), "batch size"),
    (lambda: ea(x, kv, kv, implementation="flash"), "implementation"),
    (lambda: ea(x, kv, kv, kernel="cubic"), "kernel"),
    (lambda: ea(x, kv, kv, eps=-1.0), "eps"),
    (lambda: ea(x, kv, kv, implementation="linear", kernel="square"), "is_causal"),
    (lambda: ea(x, kv, kv, implementation="linear", is_causal=True), "kernel='square'"),
    (
      lambda: ea(
        x,
        kv,
        kv,
        implementation="linear",
        is_causal=True,
        kernel="square",
        mask=jnp.ones((5, 5), bool),
      ),
      "no mask",
    ),
    (lambda: ea(x, kv, kv, mask=jnp.ones((3, 5, 5), bool)), r"mask of shape \(3, 5, 5\)"),
    (lambda: ea(x, kv, kv, mask=jnp.ones((5, 5))), "boolean"),
    (lambda: A.dot_product_attention(x, kv, kv, implementation="linear"), "linear"),
    (lambda: A.dot_product_attention(x, kv, kv, implementation="pallas"), "pallas"),
    (lambda: A.attention_weights(x, kv, kind="softmax"), "kind"),
    (lambda: A.kv_cache_step(A.init_kv_cache(2, 8, 2, 8), x, kv, kv, kind="ea"), "one token"),
    (
      lambda: A.recurrent_step(A.init_recurrent_state(2, 2, 4), x[:, :1], kv[:, :1], kv[:, :1]),
      "state shapes",
    ),
  ]
  for fn, message in cases:
    with pytest.raises(ValueError, match=message):
      fn()


# ----------------------------------------------------------------------------------------------
# Random shapes
# ----------------------------------------------------------------------------------------------


@hypothesis.settings(max_examples=6, deadline=None, derandomize=True)
@hypothesis.given(
  B=st.integers(1, 2),
  T=st.integers(1, 40),
  S=st.integers(1, 40),
  K=st.integers(1, 2),
  G=st.integers(1, 3),
  H=st.integers(1, 8),
  causal=st.booleans(),
  masked=st.booleans(),
  variant=st.sampled_from(VARIANTS),
  seed=st.integers(0, 2**16),
)
def test_random_shapes_match_reference(B, T, S, K, G, H, causal, masked, variant, seed):
  kind, kernel = variant
  rng = np.random.default_rng(seed)
  q, k, v = make(rng, B=B, T=T, S=S, N=K * G, K=K, H=H)
  mask = jnp.asarray(rng.random((B, 1, T, S)) > 0.3) if masked else None
  want = ref_attention(q, k, v, kind, mask=mask, causal=causal, kernel=kernel)
  impls = ["chunked"] + (["linear"] if applicable("linear", kind, kernel, causal, masked) else [])
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(A.chunked, "CHUNK_ROWS", 8)
    mp.setattr(A.linear, "LINEAR_CHUNK", 4)
    for impl in impls:
      out = run(impl, kind, kernel, q, k, v, mask=mask, is_causal=causal)
      np.testing.assert_allclose(out, want, atol=3e-5, rtol=3e-5, err_msg=impl)
