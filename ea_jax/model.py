"""Decoder-only transformer (Flax Linen) with expressive (EA) or dot-product (DPA) attention.

The module holds the projections, norms and residual stream; the attention math lives in
`ea_jax.attention` (pure functions), called with `is_causal=True`.

Letters used in array names:
  B batch     L sequence length   P prompt length   V vocabulary   D embed_dim
  N query heads   K key/value heads   H head_dim   M mlp_dim

Public API:
  ModelConfig (frozen; `ModelConfig.from_config(config.model, vocab_size=, max_len=)`),
  Transformer(cfg)(tokens_BL) -> float32 logits_BLV, Transformer.decode_step,
  DecodeState, init_decode_state, attention_maps, generate, flops_per_token.

Parameters carry logical axis names ("vocab", "embed", "mlp", "heads", "kv_heads", "head_dim",
"norm") through `nn.with_logical_partitioning`; key activations are constrained with
("batch", "length", ...) names. Both are no-ops unless logical-axis rules (and a mesh) are active.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from ea_jax import attention as attn

ATTENTIONS = attn.KINDS
EA_KERNELS = attn.KERNELS
ATTENTION_IMPLS = attn.IMPLEMENTATIONS
POS_ENCODINGS = ("rope", "learned", "none")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")
DTYPES = ("float32", "bfloat16")

NORM_EPS = 1e-6  # epsilon of LayerNorm / RMSNorm and of the parameter-free qk norm
ROPE_BASE = 10000.0  # rotary embedding base wavelength

# Logical axis names of activations.
X_AXES = ("batch", "length", "embed")
Q_AXES = ("batch", "length", "heads", "head_dim")
KV_AXES = ("batch", "length", "kv_heads", "head_dim")
MLP_AXES = ("batch", "length", "mlp")
LOGITS_AXES = ("batch", "length", "vocab")

# Collection into which attention layers sow their weights when it is mutable.
ATTENTION_WEIGHTS = "attention_weights"


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """All model hyper-parameters (see configs/default.py for what each field means)."""

  vocab_size: int
  max_len: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  embed_dim: int
  mlp_dim: int
  attention: str = "ea"
  ea_kernel: str = "rational"
  attention_impl: str | None = None
  attention_scale: float | None = None
  ea_eps: float = 1e-6
  qk_norm: bool = False
  pos_encoding: str = "rope"
  norm: str = "layernorm"
  mlp: str = "gelu"
  tie_embeddings: bool = False
  dtype: str = "float32"
  param_dtype: str = "float32"

  def __post_init__(self):
    _validate(self)

  @property
  def head_dim(self) -> int:
    return self.embed_dim // self.num_heads

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def params_dtype(self):
    return jnp.dtype(self.param_dtype)

  @property
  def uses_recurrent_decode(self) -> bool:
    """Square-kernel EA with the linear implementation decodes with O(1) recurrent state."""
    return self.attention == "ea" and self.ea_kernel == "square" and self.attention_impl == "linear"

  @classmethod
  def from_config(cls, model_cfg, *, vocab_size: int, max_len: int) -> "ModelConfig":
    """Builds and validates a ModelConfig from `config.model` (a ConfigDict or mapping)."""
    fields = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg)
    allowed = [f.name for f in dataclasses.fields(cls) if f.name not in ("vocab_size", "max_len")]
    unknown = sorted(set(fields) - set(allowed))
    if unknown:
      raise ValueError(f"config.model: unknown field(s) {unknown}; allowed fields: {allowed}")
    required = [
      f.name
      for f in dataclasses.fields(cls)
      if f.default is dataclasses.MISSING and f.name not in ("vocab_size", "max_len")
    ]
    missing = [name for name in required if name not in fields]
    if missing:
      raise ValueError(f"config.model: missing required field(s) {missing}")
    return cls(vocab_size=vocab_size, max_len=max_len, **fields)


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def _validate(c: ModelConfig) -> None:
  """Raises ValueError naming the first bad field and what is allowed."""
  for name in (
    "vocab_size",
    "max_len",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "embed_dim",
    "mlp_dim",
  ):
    value = getattr(c, name)
    if not _is_int(value) or value < 1:
      raise ValueError(f"model.{name}={value!r}: must be a positive integer")
  choices = (
    ("attention", ATTENTIONS),
    ("ea_kernel", EA_KERNELS),
    ("attention_impl", ATTENTION_IMPLS),
    ("pos_encoding", POS_ENCODINGS),
    ("norm", NORMS),
    ("mlp", MLPS),
    ("dtype", DTYPES),
    ("param_dtype", DTYPES),
  )
  for name, allowed in choices:
    value = getattr(c, name)
    if value not in allowed:
      raise ValueError(f"model.{name}={value!r} is not supported; allowed: {allowed}")
  for name in ("qk_norm", "tie_embeddings"):
    if not isinstance(getattr(c, name), bool):
      raise ValueError(f"model.{name}={getattr(c, name)!r}: must be True or False")
  if c.attention_scale is not None and (
    not _is_number(c.attention_scale) or not c.attention_scale > 0
  ):
    raise ValueError(
      f"model.attention_scale={c.attention_scale!r}: must be None "
      "(= 1/sqrt(head_dim)) or a positive number"
    )
  if not _is_number(c.ea_eps) or not c.ea_eps >= 0:
    raise ValueError(f"model.ea_eps={c.ea_eps!r}: must be a number >= 0")
  if c.embed_dim % c.num_heads:
    raise ValueError(
      f"model.embed_dim={c.embed_dim} must be divisible by model.num_heads="
      f"{c.num_heads} (head_dim = embed_dim // num_heads)"
    )
  if c.num_heads % c.num_kv_heads:
    raise ValueError(
      f"model.num_heads={c.num_heads} must be a multiple of model.num_kv_heads={c.num_kv_heads}"
    )
  if c.pos_encoding == "rope" and c.head_dim % 2:
    raise ValueError(
      f"model.pos_encoding='rope' needs an even head_dim, got head_dim="
      f"{c.head_dim} (embed_dim={c.embed_dim} / num_heads={c.num_heads})"
    )
  if c.attention_impl == "linear" and (c.attention != "ea" or c.ea_kernel != "square"):
    raise ValueError(
      "model.attention_impl='linear' needs model.attention='ea' and "
      f"model.ea_kernel='square' (got attention={c.attention!r}, "
      f"ea_kernel={c.ea_kernel!r}); use None, 'naive' or 'chunked' otherwise"
    )
  if c.attention_impl == "pallas" and c.attention != "ea":
    raise ValueError(
      "model.attention_impl='pallas' needs model.attention='ea' "
      f"(got {c.attention!r}); use None, 'naive' or 'chunked' for 'dpa'"
    )


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------


def _partitioned(init, names):
  return nn.with_logical_partitioning(init, names)


def _fan_in_init(in_axis, out_axis):
  """Truncated-normal init with variance 1/fan_in over the (possibly several) input axes."""
  return nn.initializers.variance_scaling(
    1.0, "fan_in", "truncated_normal", in_axis=in_axis, out_axis=out_axis
  )


def _norm(cfg: ModelConfig, name: str) -> nn.Module:
  ones = _partitioned(nn.initializers.ones, ("norm",))
  if cfg.norm == "rmsnorm":
    return nn.RMSNorm(
      epsilon=NORM_EPS,
      dtype=cfg.compute_dtype,
      param_dtype=cfg.params_dtype,
      scale_init=ones,
      name=name,
    )
  return nn.LayerNorm(
    epsilon=NORM_EPS,
    dtype=cfg.compute_dtype,
    param_dtype=cfg.params_dtype,
    scale_init=ones,
    bias_init=_partitioned(nn.initializers.zeros, ("norm",)),
    name=name,
  )


def rms_normalize(x_XH, eps=NORM_EPS):
  """Parameter-free RMS normalisation over the last axis (computed in float32)."""
  x32 = x_XH.astype(jnp.float32)
  inv = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (x32 * inv).astype(x_XH.dtype)


def apply_rope(x_BLNH, positions_BL):
  """Rotary position embedding (rotate-half form) at absolute `positions_BL`; H even."""
  H = x_BLNH.shape[-1]
  half = H // 2
  inv_freq_F = 1.0 / (ROPE_BASE ** (jnp.arange(half, dtype=jnp.float32) / half))
  angle_BLF = positions_BL.astype(jnp.float32)[:, :, None] * inv_freq_F[None, None, :]
  sin_BL1F = jnp.sin(angle_BLF)[:, :, None, :]
  cos_BL1F = jnp.cos(angle_BLF)[:, :, None, :]
  x32 = x_BLNH.astype(jnp.float32)
  x1, x2 = x32[..., :half], x32[..., half:]
  out = jnp.concatenate([x1 * cos_BL1F - x2 * sin_BL1F, x2 * cos_BL1F + x1 * sin_BL1F], axis=-1)
  return out.astype(x_BLNH.dtype)


class Attention(nn.Module):
  """Grouped-query causal self-attention: projections here, math in `ea_jax.attention`."""

  cfg: ModelConfig

  def _project(self, x_BLD, positions_BL):
    cfg = self.cfg
    D, N, K, H = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    dt = cfg.compute_dtype
    init = _fan_in_init(0, (1, 2))
    w_q = self.param(
      "query", _partitioned(init, ("embed", "heads", "head_dim")), (D, N, H), cfg.params_dtype
    )
    w_k = self.param(
      "key", _partitioned(init, ("embed", "kv_heads", "head_dim")), (D, K, H), cfg.params_dtype
    )
    w_v = self.param(
      "value", _partitioned(init, ("embed", "kv_heads", "head_dim")), (D, K, H), cfg.params_dtype
    )
    x = x_BLD.astype(dt)
    q_BLNH = jnp.einsum("bld,dnh->blnh", x, w_q.astype(dt))
    k_BLKH = jnp.einsum("bld,dkh->blkh", x, w_k.astype(dt))
    v_BLKH = jnp.einsum("bld,dkh->blkh", x, w_v.astype(dt))
    if cfg.qk_norm:
      q_BLNH, k_BLKH = rms_normalize(q_BLNH), rms_normalize(k_BLKH)
    if cfg.pos_encoding == "rope":
      q_BLNH = apply_rope(q_BLNH, positions_BL)
      k_BLKH = apply_rope(k_BLKH, positions_BL)
    q_BLNH = nn.with_logical_constraint(q_BLNH, Q_AXES)
    k_BLKH = nn.with_logical_constraint(k_BLKH, KV_AXES)
    v_BLKH = nn.with_logical_constraint(v_BLKH, KV_AXES)
    return q_BLNH, k_BLKH, v_BLKH

  def _output(self, o_BLNH):
    cfg = self.cfg
    w_o = self.param(
      "out",
      _partitioned(_fan_in_init((0, 1), 2), ("heads", "head_dim", "embed")),
      (cfg.num_heads, cfg.head_dim, cfg.embed_dim),
      cfg.params_dtype,
    )
    dt = cfg.compute_dtype
    out_BLD = jnp.einsum("blnh,nhd->bld", o_BLNH.astype(dt), w_o.astype(dt))
    return nn.with_logical_constraint(out_BLD, X_AXES)

  @nn.compact
  def __call__(self, x_BLD, positions_BL, decode_state=None):
    """Full causal attention; or, with `decode_state` (L == 1), one decode step.

    Returns out_BLD, or (out_B1D, new decode_state) in decode mode.
    """
    cfg = self.cfg
    q_BLNH, k_BLKH, v_BLKH = self._project(x_BLD, positions_BL)
    if decode_state is not None:
      if cfg.uses_recurrent_decode:
        o_BLNH, new_state = attn.recurrent_step(
          decode_state, q_BLNH, k_BLKH, v_BLKH, scale=cfg.attention_scale, eps=cfg.ea_eps
        )
      else:
        o_BLNH, new_state = attn.kv_cache_step(
          decode_state,
          q_BLNH,
          k_BLKH,
          v_BLKH,
          kind=cfg.attention,
          scale=cfg.attention_scale,
          eps=cfg.ea_eps,
          kernel=cfg.ea_kernel,
        )
      return self._output(o_BLNH), new_state

    if self.is_mutable_collection(ATTENTION_WEIGHTS) and not self.is_initializing():
      w_BNLL = attn.attention_weights(
        q_BLNH,
        k_BLKH,
        kind=cfg.attention,
        is_causal=True,
        scale=cfg.attention_scale,
        eps=cfg.ea_eps,
        kernel=cfg.ea_kernel,
      )
      self.sow(ATTENTION_WEIGHTS, "weights", w_BNLL.astype(jnp.float32))
    if cfg.attention == "ea":
      o_BLNH = attn.expressive_attention(
        q_BLNH,
        k_BLKH,
        v_BLKH,
        is_causal=True,
        scale=cfg.attention_scale,
        eps=cfg.ea_eps,
        kernel=cfg.ea_kernel,
        implementation=cfg.attention_impl,
      )
    else:
      o_BLNH = attn.dot_product_attention(
        q_BLNH,
        k_BLKH,
        v_BLKH,
        is_causal=True,
        scale=cfg.attention_scale,
        implementation=cfg.attention_impl,
      )
    return self._output(nn.with_logical_constraint(o_BLNH, Q_AXES))


class Mlp(nn.Module):
  """GELU MLP (D -> M -> D) or SwiGLU (silu(x W_gate) * (x W_up) -> D)."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BLD):
    cfg = self.cfg
    D, M, dt = cfg.embed_dim, cfg.mlp_dim, cfg.compute_dtype
    init = _fan_in_init(0, 1)
    x = x_BLD.astype(dt)

    def up(name):
      w = self.param(name, _partitioned(init, ("embed", "mlp")), (D, M), cfg.params_dtype)
      return nn.with_logical_constraint(jnp.einsum("bld,dm->blm", x, w.astype(dt)), MLP_AXES)

    if cfg.mlp == "swiglu":
      h_BLM = nn.silu(up("gate")) * up("up")
    else:
      h_BLM = nn.gelu(up("up"))
    w_out = self.param("down", _partitioned(init, ("mlp", "embed")), (M, D), cfg.params_dtype)
    out_BLD = jnp.einsum("blm,md->bld", h_BLM, w_out.astype(dt))
    return nn.with_logical_constraint(out_BLD, X_AXES)


class Block(nn.Module):
  """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BLD, positions_BL, decode_state=None):
    h = Attention(self.cfg, name="attention")(
      _norm(self.cfg, "attention_norm")(x_BLD), positions_BL, decode_state
    )
    if decode_state is not None:
      h, decode_state = h
    x_BLD = nn.with_logical_constraint(x_BLD + h, X_AXES)
    x_BLD = x_BLD + Mlp(self.cfg, name="mlp")(_norm(self.cfg, "mlp_norm")(x_BLD))
    x_BLD = nn.with_logical_constraint(x_BLD, X_AXES)
    return x_BLD if decode_state is None else (x_BLD, decode_state)


class DecodeState(NamedTuple):
  """Per-layer attention decode state plus the absolute position of the next token."""

  position: jax.Array  # int32 []
  layers: tuple  # num_layers x (attention.KVCache | attention.RecurrentState)


def init_decode_state(cfg: ModelConfig, batch_size: int, max_len: int) -> DecodeState:
  """Empty decode state for `batch_size` sequences of up to `max_len` tokens.

  KV caches hold keys/values in the compute dtype; the recurrent state (square-kernel EA with
  attention_impl="linear") is kept in float32 since it accumulates sums over all tokens.
  """
  if cfg.uses_recurrent_decode:
    make = lambda: attn.init_recurrent_state(
      batch_size, cfg.num_kv_heads, cfg.head_dim, jnp.float32
    )
  else:
    make = lambda: attn.init_kv_cache(
      batch_size, max_len, cfg.num_kv_heads, cfg.head_dim, cfg.compute_dtype
    )
  return DecodeState(jnp.zeros((), jnp.int32), tuple(make() for _ in range(cfg.num_layers)))


class Transformer(nn.Module):
  """Decoder-only transformer; `__call__(tokens_BL)` returns float32 logits [B, L, V]."""

  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    D = cfg.embed_dim
    self.embed = nn.Embed(
      cfg.vocab_size,
      D,
      dtype=cfg.compute_dtype,
      param_dtype=cfg.params_dtype,
      embedding_init=_partitioned(nn.initializers.normal(stddev=D**-0.5), ("vocab", "embed")),
    )
    if cfg.pos_encoding == "learned":
      self.pos_embed = self.param(
        "pos_embed",
        _partitioned(nn.initializers.normal(stddev=D**-0.5), (None, "embed")),
        (cfg.max_len, D),
        cfg.params_dtype,
      )
    self.blocks = [Block(cfg, name=f"block_{i}") for i in range(cfg.num_layers)]
    self.final_norm = _norm(cfg, "final_norm")
    if not cfg.tie_embeddings:
      self.output = self.param(
        "output",
        _partitioned(_fan_in_init(0, 1), ("embed", "vocab")),
        (D, cfg.vocab_size),
        cfg.params_dtype,
      )

  def _embed(self, tokens_BL, positions_BL):
    x_BLD = self.embed(tokens_BL)
    if self.cfg.pos_encoding == "learned":
      x_BLD = x_BLD + jnp.take(self.pos_embed, positions_BL, axis=0).astype(x_BLD.dtype)
    return nn.with_logical_constraint(x_BLD, X_AXES)

  def _logits(self, x_BLD):
    x_BLD = self.final_norm(x_BLD)
    if self.cfg.tie_embeddings:
      logits_BLV = self.embed.attend(x_BLD)
    else:
      dt = self.cfg.compute_dtype
      logits_BLV = jnp.einsum("bld,dv->blv", x_BLD.astype(dt), self.output.astype(dt))
    return nn.with_logical_constraint(logits_BLV.astype(jnp.float32), LOGITS_AXES)

  def _check_tokens(self, tokens_BL, what):
    if tokens_BL.ndim != 2:
      raise ValueError(f"{what} must be int tokens of shape [B, L], got shape {tokens_BL.shape}")
    if not jnp.issubdtype(tokens_BL.dtype, jnp.integer):
      raise ValueError(f"{what} must have an integer dtype, got {tokens_BL.dtype}")

  def __call__(self, tokens_BL):
    """tokens_BL int [B, L] -> logits_BLV float32; position l sees tokens 0..l only."""
    self._check_tokens(tokens_BL, "tokens_BL")
    B, L = tokens_BL.shape
    if self.cfg.pos_encoding == "learned" and L > self.cfg.max_len:
      raise ValueError(
        f"sequence length {L} exceeds model max_len={self.cfg.max_len} (learned positions)"
      )
    positions_BL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32)[None, :], (B, L))
    x_BLD = self._embed(tokens_BL, positions_BL)
    for block in self.blocks:
      x_BLD = block(x_BLD, positions_BL)
    return self._logits(x_BLD)

  def decode_step(self, tokens_B1, state: DecodeState):
    """One token per sequence at absolute position `state.position` -> (logits_B1V, new state)."""
    self._check_tokens(tokens_B1, "tokens_B1")
    B = tokens_B1.shape[0]
    positions_B1 = jnp.broadcast_to(state.position.astype(jnp.int32), (B, 1))
    x_B1D = self._embed(tokens_B1, positions_B1)
    layers = []
    for block, layer_state in zip(self.blocks, state.layers):
      x_B1D, layer_state = block(x_B1D, positions_B1, layer_state)
      layers.append(layer_state)
    return self._logits(x_B1D), DecodeState(state.position + 1, tuple(layers))


# ----------------------------------------------------------------------------------------------
# Functions on a (model, params) pair
# ----------------------------------------------------------------------------------------------


def attention_maps(model: Transformer, params, tokens_BL) -> list[jax.Array]:
  """Attention weights per layer, each float32 [B, N, L, L] (causal; row t covers keys <= t)."""
  _, state = model.apply({"params": params}, tokens_BL, mutable=[ATTENTION_WEIGHTS])
  sown = state[ATTENTION_WEIGHTS]
  return [sown[f"block_{i}"]["attention"]["weights"][0] for i in range(model.cfg.num_layers)]


def generate(model: Transformer, params, prompt_BP, num_new: int, *, return_logits: bool = False):
  """Greedy decoding with the attention module's one-step state.

  The prompt is fed one token at a time through `decode_step` (filling the KV cache, or the
  recurrent state for square-kernel EA with attention_impl="linear"), then `num_new` tokens are
  appended, each the argmax of the previous step's logits. One `lax.scan` over P + num_new - 1
  steps; jit-able with `model` and `num_new` static.

  Returns tokens_B(P+num_new) (int32), and with return_logits=True also logits [B, P+num_new-1, V]
  (float32), where logits[:, t] is the prediction for position t + 1 from tokens 0..t, i.e.
  model(tokens[:, :-1]) computed step by step.
  """
  cfg = model.cfg
  if not (isinstance(num_new, int) and num_new >= 1):
    raise ValueError(f"num_new={num_new!r}: must be a positive integer (static under jit)")
  if prompt_BP.ndim != 2 or prompt_BP.shape[1] < 1:
    raise ValueError(
      f"prompt_BP must be int tokens of shape [B, P] with P >= 1, got shape {prompt_BP.shape}"
    )
  B, P = prompt_BP.shape
  total = P + num_new
  if cfg.pos_encoding == "learned" and total > cfg.max_len:
    raise ValueError(
      f"prompt length {P} + num_new {num_new} = {total} exceeds model max_len="
      f"{cfg.max_len} (learned positions)"
    )
  prompt_BP = prompt_BP.astype(jnp.int32)
  tokens_BT = jnp.concatenate([prompt_BP, jnp.zeros((B, num_new), jnp.int32)], axis=1)
  state = init_decode_state(cfg, B, total)

  def step(carry, t):
    tokens_BT, state = carry
    token_B1 = jax.lax.dynamic_slice_in_dim(tokens_BT, t, 1, axis=1)
    logits_B1V, state = model.apply(
      {"params": params}, token_B1, state, method=Transformer.decode_step
    )
    predicted_B = jnp.argmax(logits_B1V[:, 0], axis=-1).astype(jnp.int32)
    existing_B = jax.lax.dynamic_index_in_dim(tokens_BT, t + 1, axis=1, keepdims=False)
    next_B = jnp.where(t + 1 < P, existing_B, predicted_B)
    tokens_BT = jax.lax.dynamic_update_index_in_dim(tokens_BT, next_B, t + 1, axis=1)
    return (tokens_BT, state), logits_B1V[:, 0]

  (tokens_BT, _), logits_TBV = jax.lax.scan(
    step, (tokens_BT, state), jnp.arange(total - 1, dtype=jnp.int32)
  )
  if return_logits:
    return tokens_BT, jnp.transpose(logits_TBV, (1, 0, 2))
  return tokens_BT


def matmul_params(cfg: ModelConfig) -> int:
  """Parameters used in matrix multiplies per token: attention, MLP and output projections.

  The output projection counts even when tied; embedding lookups and norms do not.
  """
  D, N, K, H, M = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
  attention = D * N * H + 2 * D * K * H + N * H * D
  mlp = (3 if cfg.mlp == "swiglu" else 2) * D * M
  return cfg.num_layers * (attention + mlp) + D * cfg.vocab_size


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Forward + backward model FLOPs per token (PaLM appendix-B convention), for MFU.

  6 * matmul_params(cfg)  (2 per multiply-add forward, 4 backward)
  + 12 * num_layers * num_heads * head_dim * seq_len  (q.k scores and weights.v, forward and
  backward, over the full seq_len without discounting the causal mask; the same count for
  EA and DPA and every implementation, so MFU compares like with like).
  """
  if not _is_int(seq_len) or seq_len < 1:
    raise ValueError(f"seq_len={seq_len!r}: must be a positive integer")
  attention = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len
  return float(6 * matmul_params(cfg) + attention)


def num_params(params: Any) -> int:
  """Total parameter count of a (boxed or unboxed) params tree."""
  return sum(int(x.size) for x in jax.tree.leaves(nn.meta.unbox(params)))
