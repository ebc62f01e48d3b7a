"""Text generation from a trained workdir: KV cache (DPA, rational EA) or recurrent state (square EA).

  model = load(workdir)                       # LoadedModel: module config, params, task
  out = generate(model, "ROMEO:\\n", num_tokens=300, temperature=0.8, rng=jax.random.key(0))
  out.text, out.tokens_per_sec

Decoding runs the model's one-token step (`Transformer.decode_step`) inside `lax.scan`. With
`decode="kv_cache"` every layer keeps its keys and values (memory and per-token work grow with
the context); with `decode="recurrent"` (square-kernel EA only) every layer keeps the
constant-size state of the linear form (sums of k⊗k⊗v and k⊗k), so a token costs the same at any
position. `decode="auto"` picks the recurrent state where it applies.

Context window: the model was trained on `window` = max_len positions (learned absolute
positions cannot go further), so generation restarts when the window is full: the last
`window // 2` tokens are fed again from position 0 (a fresh cache or state) and generation goes
on, as a sliding window would, at two steps per generated token on average. Every prediction
therefore sees between window // 2 and window - 1 tokens. `window=0` turns restarts off (for
positions that extrapolate: rope or none).

Letters: B batch, C context fed before a segment, G tokens generated in a segment, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from ea_jax import model as model_lib
from ea_jax import tasks, train_lib

DECODES = ("auto", "kv_cache", "recurrent")


class LoadedModel(NamedTuple):
  cfg: model_lib.ModelConfig
  params: Any
  task: Any  # the training task (text tasks: encode / decode / vocabulary)
  step: int


class Generation(NamedTuple):
  tokens: np.ndarray  # int32 [B, P + num_tokens]: prompt then generated tokens
  text: list  # per row, the decoded text (prompt included) when the task has one
  decode: str  # "kv_cache" or "recurrent"
  seconds: float  # wall time of the generation (compiled functions, after warm-up)
  tokens_per_sec: float  # generated tokens per second over the batch


def load(workdir: str, step: int | None = None) -> LoadedModel:
  """The model config, parameters (checkpoint `step`, default latest) and task of a workdir."""
  workdir = os.path.abspath(workdir)
  info = train_lib.read_train_config(workdir)
  config = info["config"]
  cfg = model_lib.ModelConfig.from_config(
    config["model"], vocab_size=int(info["vocab_size"]), max_len=int(info["max_len"])
  )
  directory = os.path.join(workdir, "checkpoints")
  manager = ocp.CheckpointManager(directory, item_handlers=ocp.StandardCheckpointHandler())
  try:
    step = manager.latest_step() if step is None else step
    if step is None or step not in manager.all_steps():
      raise FileNotFoundError(
        f"no checkpoint {'' if step is None else step} in {directory}; "
        f"allowed steps: {sorted(manager.all_steps())}"
      )
    # Restored without a target: the stored tree as host arrays (only the params are used).
    state = manager.restore(step, args=ocp.args.StandardRestore())
  finally:
    manager.close()
  params = jax.tree.map(jnp.asarray, state["params"])
  return LoadedModel(cfg, params, tasks.make_task(config["task"]), int(step))


def decode_config(cfg: model_lib.ModelConfig, decode: str) -> tuple[model_lib.ModelConfig, str]:
  """(config whose decode_step uses the requested state, the state's name)."""
  if decode not in DECODES:
    raise ValueError(f"decode={decode!r}; allowed: {DECODES}")
  square = cfg.attention == "ea" and cfg.ea_kernel == "square"
  if decode == "recurrent" and not square:
    raise ValueError(
      f"decode='recurrent' needs model.attention='ea' with ea_kernel='square' "
      f"(this model: attention={cfg.attention!r}, ea_kernel={cfg.ea_kernel!r}); "
      "use 'kv_cache' or 'auto'"
    )
  if decode == "recurrent" or (decode == "auto" and square):
    return dataclasses.replace(cfg, attention_impl="linear"), "recurrent"
  # Any implementation but "linear" decodes with the KV cache; parameters are the same.
  impl = None if cfg.attention_impl == "linear" else cfg.attention_impl
  return dataclasses.replace(cfg, attention_impl=impl), "kv_cache"


def _pick(logits_BV, rng, temperature, top_k):
  if temperature == 0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = logits_BV / temperature
  if top_k:
    kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
  return jax.random.categorical(rng, logits_BV, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6))
def _segment(cfg, params, context_BC, rng, num_new, temperature, top_k):
  """Feeds `context_BC` from position 0, then samples `num_new` tokens -> int32 [B, num_new]."""
  model = model_lib.Transformer(cfg)
  B, C = context_BC.shape
  state = model_lib.init_decode_state(cfg, B, C + num_new)

  def step(state, token_B):
    logits_B1V, state = model.apply(
      {"params": params}, token_B[:, None], state, method=model_lib.Transformer.decode_step
    )
    return state, logits_B1V[:, 0]

  state, _ = jax.lax.scan(step, state, jnp.moveaxis(context_BC[:, :-1], 1, 0))
  state, logits_BV = step(state, context_BC[:, -1])

  def sample(carry, i):
    state, logits_BV = carry
    token_B = _pick(logits_BV, jax.random.fold_in(rng, i), temperature, top_k)
    state, logits_BV = step(state, token_B)
    return (state, logits_BV), token_B

  _, new_GB = jax.lax.scan(sample, (state, logits_BV), jnp.arange(num_new))
  return jnp.moveaxis(new_GB, 0, 1)


def generate_tokens(
  cfg: model_lib.ModelConfig,
  params,
  prompt_BP,
  num_tokens: int,
  *,
  rng: jax.Array,
  temperature: float = 0.0,
  top_k: int = 0,
  window: int | None = None,
) -> np.ndarray:
  """Prompt then `num_tokens` sampled tokens, int32 [B, P + num_tokens] (see module docstring).

  Args:
    cfg: the decoding config (from `decode_config`).
    params: model parameters.
    prompt_BP: int tokens [B, P], P >= 1.
    num_tokens: how many tokens to generate.
    rng: sampling key (unused when temperature is 0: greedy).
    temperature: 0 = greedy (argmax), else softmax temperature.
    top_k: sample among the k most likely tokens (0 = all).
    window: restart the context when it reaches this many tokens (default cfg.max_len, the
      training context; 0 = never).
  """
  prompt_BP = np.asarray(prompt_BP, np.int32)
  if prompt_BP.ndim != 2 or prompt_BP.shape[1] < 1:
    raise ValueError(f"prompt must be int tokens [B, P] with P >= 1, got shape {prompt_BP.shape}")
  if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
    raise ValueError(f"num_tokens={num_tokens!r}; allowed: a positive integer")
  if not temperature >= 0:
    raise ValueError(f"temperature={temperature!r}; allowed: a number >= 0 (0 = greedy)")
  if isinstance(top_k, bool) or not isinstance(top_k, int) or not 0 <= top_k <= cfg.vocab_size:
    raise ValueError(f"top_k={top_k!r}; allowed: an integer in [0, {cfg.vocab_size}]")
  window = cfg.max_len if window is None else window
  learned = cfg.pos_encoding == "learned"
  if window == 0 and learned:
    raise ValueError(
      "window=0 (no restarts) needs positions that extrapolate; this model uses "
      f"learned positions up to max_len={cfg.max_len}: use window <= max_len"
    )
  if window and not 2 <= window <= (cfg.max_len if learned else window):
    raise ValueError(
      f"window={window!r}; allowed: 0 (no restarts) or an integer in "
      f"[2, {cfg.max_len}] (the model's max_len)"
    )
  tokens_BT = prompt_BP
  if window and tokens_BT.shape[1] >= window:  # a long prompt: keep its last window // 2
    tokens_BT = tokens_BT[:, -(window // 2) :]
  out = [prompt_BP]
  context_BC = tokens_BT
  made, segment = 0, 0
  while made < num_tokens:
    room = num_tokens - made if not window else window - context_BC.shape[1]
    num_new = min(room, num_tokens - made)
    new_BG = np.asarray(
      _segment(
        cfg,
        params,
        jnp.asarray(context_BC),
        jax.random.fold_in(rng, segment),
        num_new,
        float(temperature),
        int(top_k),
      )
    )
    out.append(new_BG)
    made += num_new
    segment += 1
    context_BC = np.concatenate([context_BC, new_BG], axis=1)
    if window:
      context_BC = context_BC[:, -(window // 2) :]
  return np.concatenate(out, axis=1)


def generate(
  model: LoadedModel,
  prompt: str | np.ndarray,
  num_tokens: int,
  *,
  rng: jax.Array | None = None,
  decode: str = "auto",
  temperature: float = 0.0,
  top_k: int = 0,
  batch_size: int = 1,
  window: int | None = None,
) -> Generation:
  """Generates from a loaded model, timing a second (compiled) run; see `generate_tokens`."""
  cfg, kind = decode_config(model.cfg, decode)
  if isinstance(prompt, str):
    if not hasattr(model.task, "encode"):
      raise ValueError(
        f"a text prompt needs a text task; this model's task is "
        f"{type(model.task).__name__}: pass prompt tokens instead"
      )
    prompt = model.task.encode(prompt)
  prompt_BP = np.broadcast_to(
    np.asarray(prompt, np.int32).reshape(1, -1), (batch_size, np.asarray(prompt).size)
  )
  rng = jax.random.key(0) if rng is None else rng
  run = lambda: generate_tokens(
    cfg,
    model.params,
    prompt_BP,
    num_tokens,
    rng=rng,
    temperature=temperature,
    top_k=top_k,
    window=window,
  )
  run()  # compiles every segment shape
  t0 = time.perf_counter()
  tokens = run()
  seconds = time.perf_counter() - t0
  text = [model.task.decode(row) for row in tokens] if hasattr(model.task, "decode") else []
  return Generation(tokens, text, kind, seconds, batch_size * num_tokens / max(seconds, 1e-9))
