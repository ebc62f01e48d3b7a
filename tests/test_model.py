"""Tests for ea_jax.model: shapes, causality, dtypes, logical axes, decode == prefill, maps, config."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec

from ea_jax import attention as attn
from ea_jax import model as M

VOCAB, MAX_LEN, B = 13, 12, 2
LOGICAL_NAMES = {"vocab", "embed", "mlp", "heads", "kv_heads", "head_dim", "norm"}


def make_cfg(**overrides):
  fields = dict(
    vocab_size=VOCAB,
    max_len=MAX_LEN,
    num_layers=1,
    num_heads=4,
    num_kv_heads=2,
    embed_dim=16,
    mlp_dim=32,
  )
  fields.update(overrides)
  return M.ModelConfig(**fields)


def tokens(seed=0, length=MAX_LEN):
  return jax.random.randint(jax.random.key(seed), (B, length), 0, VOCAB, dtype=jnp.int32)


def _random_params(abstract_params, seed=0):
  """Parameters drawn with numpy at the shapes/dtypes of the model's init (no XLA compile).

  Matrices ~ N(0, 1/fan_in), embeddings ~ N(0, 1/D), norm scales ~ 1 + N(0, 0.1^2) and biases
  ~ N(0, 0.1^2): non-trivial values everywhere, so the tests exercise every parameter.
  """
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    z = rng.standard_normal(leaf.shape)
    if "norm" in name:
      z = (1.0 if "scale" in name else 0.0) + 0.1 * z
    elif "embed" in name:
      z = z / np.sqrt(leaf.shape[-1])
    else:  # attention "out" [N,H,D] has fan-in N*H; every other matrix fan-in shape[0]
      z = z / np.sqrt(np.prod(leaf.shape[:2]) if "'out'" in name else leaf.shape[0])
    return jnp.asarray(z, leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, abstract_params)


@functools.lru_cache(maxsize=None)
def init(cfg):
  """(module, boxed abstract variables, random params); cached per config, shared by tests."""
  model, variables = abstract_init(cfg)
  return model, variables, _random_params(nn.meta.unbox(variables)["params"])


def abstract_init(cfg):
  """(module, boxed abstract variables) without running anything."""
  model = M.Transformer(cfg)
  return model, jax.eval_shape(model.init, jax.random.key(0), tokens())


_FORWARD = {}


def forward(model, params, tokens_BL):
  """Jitted model.apply, compiled once per config."""
  if model.cfg not in _FORWARD:
    _FORWARD[model.cfg] = jax.jit(model.apply)
  return _FORWARD[model.cfg]({"params": params}, tokens_BL)


# ----------------------------------------------------------------------------------------------
# Shapes, causality, dtypes
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attention", ["ea", "dpa"])
@pytest.mark.parametrize("pos_encoding", ["rope", "learned", "none"])
def test_logits_shape_dtype_and_causality(attention, pos_encoding):
  cfg = make_cfg(attention=attention, pos_encoding=pos_encoding)
  model, _, params = init(cfg)
  x_BL = tokens(1)
  logits = forward(model, params, x_BL)
  assert logits.shape == (B, MAX_LEN, VOCAB) and logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))
  # Changing the token at position j must leave logits at positions < j unchanged, and change j.
  j = 7
  y_BL = x_BL.at[:, j].set((x_BL[:, j] + 1) % VOCAB)
  changed = forward(model, params, y_BL)
  np.testing.assert_allclose(changed[:, :j], logits[:, :j], rtol=0, atol=1e-6)
  assert float(jnp.max(jnp.abs(changed[:, j] - logits[:, j]))) > 1e-4


@pytest.mark.parametrize(
  "overrides",
  [
    dict(norm="rmsnorm", mlp="swiglu", tie_embeddings=True),
    dict(attention="ea", ea_kernel="square", attention_impl="linear", qk_norm=True),
    dict(attention="dpa", num_kv_heads=1, attention_scale=0.5),
  ],
)
def test_variants_are_causal(overrides):
  """Perturbing a future token, and the gradient of past logits w.r.t. future embeddings."""
  cfg = make_cfg(**overrides)
  model, _, params = init(cfg)
  x_BL = tokens(2)
  t = 4
  logits = forward(model, params, x_BL)
  changed = forward(model, params, x_BL.at[:, t + 1].set((x_BL[:, t + 1] + 3) % VOCAB))
  np.testing.assert_allclose(changed[:, : t + 1], logits[:, : t + 1], rtol=0, atol=1e-6)
  assert float(jnp.max(jnp.abs(changed[:, t + 1] - logits[:, t + 1]))) > 1e-4
  if cfg.tie_embeddings:
    return  # tied: every embedding row also feeds the output projection, so grads are non-zero

  def logit_sum(params):
    return jnp.sum(model.apply({"params": params}, x_BL)[:, t])

  # Rows of the embedding table for tokens that occur only after position t get no gradient.
  grad_VD = jax.jit(jax.grad(logit_sum))(params)["embed"]["embedding"]
  seen = set(np.asarray(x_BL[:, : t + 1]).ravel().tolist())
  later_only = set(np.asarray(x_BL[:, t + 1 :]).ravel().tolist()) - seen
  assert later_only, "test tokens should contain a token that only occurs after t"
  for v in later_only:
    assert float(jnp.max(jnp.abs(grad_VD[v]))) == 0.0, v
  assert min(float(jnp.max(jnp.abs(grad_VD[v]))) for v in seen) > 0.0


def test_bfloat16_compute_is_finite_and_close_to_float32():
  model32, _, params = init(make_cfg())
  model16 = M.Transformer(make_cfg(dtype="bfloat16"))
  x_BL = tokens(3)
  ref = forward(model32, params, x_BL)
  out = forward(model16, params, x_BL)
  assert out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))
  err = float(jnp.max(jnp.abs(out - ref)))
  # bf16 keeps 8 significant bits (relative rounding 2^-9 = 0.2%); this one-layer model
  # compounds a few roundings: measured 0.8% of the largest logit, bound 2%.
  assert err < 0.02 * float(jnp.max(jnp.abs(ref))), err
  # bf16 rounding must actually have happened (the compute dtype is used).
  assert err > 0.0


def test_init_with_bfloat16_params():
  model = M.Transformer(make_cfg(dtype="bfloat16", param_dtype="bfloat16"))
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), tokens()))["params"]
  assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(params))
  out = forward(model, params, tokens())
  assert out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))


# ----------------------------------------------------------------------------------------------
# Logical partitioning
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "overrides",
  [
    dict(pos_encoding="learned", mlp="swiglu"),
    dict(norm="rmsnorm", tie_embeddings=True),
  ],
)
def test_every_param_has_logical_axis_names(overrides):
  _, variables = abstract_init(make_cfg(**overrides))
  params = nn.meta.unbox(variables)["params"]
  assert set(variables) == {"params"}  # nothing but params at init (no sown maps)
  specs = nn.get_partition_spec(variables)["params"]
  flat_specs = jax.tree_util.tree_leaves_with_path(
    specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
  )
  flat_params = jax.tree_util.tree_leaves_with_path(params)
  assert [p for p, _ in flat_specs] == [p for p, _ in flat_params]
  for (path, spec), (_, leaf) in zip(flat_specs, flat_params):
    assert isinstance(spec, PartitionSpec), path
    assert len(spec) == leaf.ndim, (path, spec, leaf.shape)
    names = [n for n in spec if n is not None]
    assert names, f"{jax.tree_util.keystr(path)} has no logical axis name: {spec}"
    assert set(names) <= LOGICAL_NAMES, (path, spec)


def test_runs_under_logical_rules_and_mesh():
  """With rules and a (1-device) mesh the activation constraints apply and change nothing."""
  cfg = make_cfg()
  model, _, params = init(cfg)
  x_BL = tokens(4)
  ref = forward(model, params, x_BL)
  rules = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
  )
  mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    out = jax.jit(model.apply)({"params": params}, x_BL)
  np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Decode == prefill
# ----------------------------------------------------------------------------------------------


DECODE_CASES = [
  dict(attention="ea", qk_norm=True),
  dict(attention="dpa", pos_encoding="learned"),
  dict(attention="ea", ea_kernel="square", attention_impl="linear"),
  dict(
    attention="ea",
    ea_kernel="square",
    attention_impl="linear",
    pos_encoding="learned",
    num_kv_heads=4,
    qk_norm=True,
  ),
]


@pytest.mark.parametrize("overrides", DECODE_CASES)
def test_generate_matches_full_forward(overrides):
  cfg = make_cfg(num_layers=2, **overrides)
  model, _, params = init(cfg)
  state = M.init_decode_state(cfg, B, MAX_LEN)
  want_type = attn.RecurrentState if cfg.uses_recurrent_decode else attn.KVCache
  assert all(isinstance(s, want_type) for s in state.layers)

  P, num_new = 4, MAX_LEN - 4
  prompt_BP = tokens(5, length=P)
  gen = jax.jit(M.generate, static_argnums=(0, 3), static_argnames="return_logits")
  toks_BT, logits_BTV = gen(model, params, prompt_BP, num_new, return_logits=True)
  assert toks_BT.shape == (B, MAX_LEN) and logits_BTV.shape == (B, MAX_LEN - 1, VOCAB)
  np.testing.assert_array_equal(toks_BT[:, :P], prompt_BP)
  full = forward(model, params, toks_BT[:, :-1])
  np.testing.assert_allclose(logits_BTV, full, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(toks_BT[:, P:], jnp.argmax(full[:, P - 1 :], axis=-1))
  if cfg.attention == "dpa":  # without return_logits only the (same) tokens come back
    np.testing.assert_array_equal(gen(model, params, prompt_BP, num_new), toks_BT)


def test_generate_rejects_bad_lengths():
  model, params = M.Transformer(make_cfg(pos_encoding="learned")), None  # checked before use
  with pytest.raises(ValueError, match="max_len"):
    M.generate(model, params, tokens(length=6), MAX_LEN)
  with pytest.raises(ValueError, match="num_new"):
    M.generate(model, params, tokens(length=6), 0)


# ----------------------------------------------------------------------------------------------
# Attention maps
# ----------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=0)
def _layer0_attention_output(model, params, x_BL):
  _, state = model.apply(
    {"params": params},
    x_BL,
    capture_intermediates=lambda mdl, _: isinstance(mdl, M.Attention),
    mutable=["intermediates"],
  )
  return state["intermediates"]["block_0"]["attention"]["__call__"][0]


def _layernorm(x_BLD, p):
  mu = jnp.mean(x_BLD, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x_BLD - mu), axis=-1, keepdims=True)
  return (x_BLD - mu) / jnp.sqrt(var + M.NORM_EPS) * p["scale"][None, None, :] + p["bias"][
    None, None, :
  ]


@pytest.mark.parametrize("overrides", DECODE_CASES[:3])
def test_attention_maps_are_the_weights_used(overrides):
  cfg = make_cfg(num_layers=2, **overrides)
  model, _, params = init(cfg)
  x_BL = tokens(6)
  maps = jax.jit(M.attention_maps, static_argnums=0)(model, params, x_BL)
  L, N, K = MAX_LEN, cfg.num_heads, cfg.num_kv_heads
  assert len(maps) == cfg.num_layers
  for w in maps:
    assert w.shape == (B, N, L, L) and w.dtype == jnp.float32
    rows = jnp.sum(w, axis=-1)
    if cfg.attention == "dpa":
      np.testing.assert_allclose(rows, 1.0, atol=1e-5)
    else:  # EA rows sum to sum(f) / (eps + sum(f)): at most 1, and 1 unless sum(f) ~ eps
      assert float(jnp.max(rows)) <= 1.0 + 1e-6 and float(jnp.mean(rows)) > 0.99, rows
    assert float(jnp.max(jnp.abs(jnp.triu(w, k=1)))) == 0.0  # causal
    assert bool(jnp.all(w >= 0))

  # Layer 0 recomputed by hand: out = (maps @ v) W_out with v = LN(embed(x)) W_v.
  p0 = params["block_0"]
  x_BLD = params["embed"]["embedding"][x_BL]
  if cfg.pos_encoding == "learned":
    x_BLD = x_BLD + params["pos_embed"][None, :L]
  v_BLKH = jnp.einsum(
    "bld,dkh->blkh", _layernorm(x_BLD, p0["attention_norm"]), p0["attention"]["value"]
  )
  v_BLNH = jnp.repeat(v_BLKH, N // K, axis=2)  # query head n reads kv head n // (N // K)
  o_BLNH = jnp.einsum("bnts,bsnh->btnh", maps[0], v_BLNH)
  want = jnp.einsum("blnh,nhd->bld", o_BLNH, p0["attention"]["out"])
  got = _layer0_attention_output(model, params, x_BL)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# FLOPs and configuration
# ----------------------------------------------------------------------------------------------


def _dot_flops(jaxpr) -> int:
  """2 x multiply-adds of every dot_general in a jaxpr, sub-jaxprs included (an independent
  count of a forward pass's matmul FLOPs)."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (lhs_contract, _), (lhs_batch, _) = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      out = eqn.outvars[0].aval.shape
      total += 2 * int(np.prod(out)) * int(np.prod([lhs[d] for d in lhs_contract]))
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          total += _dot_flops(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          total += _dot_flops(sub)
  return total


@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
def test_flops_per_token_counts_the_forward_matmuls(mlp):
  # flops_per_token = 3 x (forward FLOPs per token), the forward counted from the jaxpr of the
  # materialised ("naive") model: projections, MLP, output layer and the full T x T scores.
  cfg = make_cfg(mlp=mlp, attention_impl="naive")
  model, variables = abstract_init(cfg)
  T = MAX_LEN
  jaxpr = jax.make_jaxpr(model.apply)(nn.meta.unbox(variables), tokens())
  forward_per_token = _dot_flops(jaxpr.jaxpr) / (B * T)
  assert M.flops_per_token(cfg, T) == 3 * forward_per_token
  with pytest.raises(ValueError, match="seq_len"):
    M.flops_per_token(cfg, 0)


def model_config(**overrides):
  fields = dict(
    attention="ea",
    ea_kernel="rational",
    attention_impl=None,
    attention_scale=None,
    ea_eps=1e-6,
    qk_norm=False,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    embed_dim=16,
    mlp_dim=32,
    pos_encoding="rope",
    norm="layernorm",
    mlp="gelu",
    tie_embeddings=False,
    dtype="float32",
    param_dtype="float32",
  )
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)


def test_from_config_round_trip():
  cfg = M.ModelConfig.from_config(
    model_config(attention="dpa", num_kv_heads=1), vocab_size=VOCAB, max_len=MAX_LEN
  )
  assert cfg == make_cfg(attention="dpa", num_kv_heads=1, num_layers=2)
  assert cfg.head_dim == 4


@pytest.mark.parametrize(
  "overrides, match",
  [
    (dict(attention="linear"), r"model.attention='linear'.*allowed"),
    (dict(ea_kernel="cubic"), r"ea_kernel.*allowed"),
    (dict(attention_impl="flash"), r"attention_impl.*allowed"),
    (dict(embed_dim=18), r"embed_dim=18.*num_heads=4"),
    (dict(num_kv_heads=3), r"num_heads=4.*num_kv_heads=3"),
    (dict(attention_impl="linear"), r"attention_impl='linear'.*ea_kernel='square'"),
    (dict(attention="dpa", ea_kernel="square", attention_impl="linear"), r"attention='ea'"),
    (dict(attention="dpa", attention_impl="pallas"), r"attention_impl='pallas'"),
    (dict(pos_encoding="alibi"), r"pos_encoding.*allowed"),
    (dict(norm="batchnorm"), r"norm.*allowed"),
    (dict(mlp="relu"), r"mlp.*allowed"),
    (dict(dtype="float16"), r"dtype.*allowed"),
    (dict(param_dtype="int8"), r"param_dtype.*allowed"),
    (dict(num_layers=0), r"num_layers"),
    (dict(mlp_dim=2.5), r"mlp_dim"),
    (dict(qk_norm="yes"), r"qk_norm"),
    (dict(attention_scale=-1.0), r"attention_scale"),
    (dict(ea_eps=-1e-3), r"ea_eps"),
    (dict(embed_dim=12, num_heads=4, num_kv_heads=4), r"even head_dim"),
    (dict(num_head=4), r"unknown field.*num_head"),
  ],
)
def test_config_errors_name_the_field(overrides, match):
  with pytest.raises(ValueError, match=match):
    M.ModelConfig.from_config(model_config(**overrides), vocab_size=VOCAB, max_len=MAX_LEN)


def test_config_missing_field_and_bad_sizes():
  c = model_config().to_dict()
  del c["mlp_dim"]
  with pytest.raises(ValueError, match="missing.*mlp_dim"):
    M.ModelConfig.from_config(c, vocab_size=VOCAB, max_len=MAX_LEN)
  with pytest.raises(ValueError, match="vocab_size"):
    M.ModelConfig.from_config(model_config(), vocab_size=0, max_len=MAX_LEN)
  with pytest.raises(ValueError, match="max_len"):
    M.ModelConfig.from_config(model_config(), vocab_size=VOCAB, max_len=-1)
