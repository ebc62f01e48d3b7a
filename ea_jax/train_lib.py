"""Training: TrainState, optimizer, sharded init, jitted train/eval steps, train_and_evaluate.

Letters: B batch, L sequence length, V vocabulary.

`train_and_evaluate(config, workdir)`:
  mesh from config.mesh -> data source -> model -> state sharded at init -> resume the latest
  checkpoint -> loop: train step (state donated), read step N-1's metrics after dispatching
  step N (stops on NaN/Inf naming the step), log / evaluate / checkpoint periodically -> final
  eval on the validation split -> `workdir/train_summary.json`.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
import time
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from ea_jax import checkpointing
from ea_jax import data as data_lib
from ea_jax import metrics as metrics_lib
from ea_jax import sharding as sharding_lib

TRAIN_CONFIG_FILE = "train_config.json"
SUMMARY_FILE = "train_summary.json"
EVAL_HISTORY_FILE = "eval_history.jsonl"


@flax.struct.dataclass
class TrainState:
  step: jax.Array   # int32 [], number of updates applied
  params: Any
  opt_state: Any


# ------------------------------------------------------------------------------------------
# Model and optimizer
# ------------------------------------------------------------------------------------------


def build_model(model_config, *, vocab_size: int, max_len: int):
  """(Transformer module, ModelConfig) from `config.model` and the data's vocabulary/length."""
  from ea_jax import model as model_lib
  cfg = model_lib.ModelConfig.from_config(model_config, vocab_size=vocab_size, max_len=max_len)
  return model_lib.Transformer(cfg), cfg


def learning_rate_schedule(train_config) -> optax.Schedule:
  """Linear warmup from 0 to `learning_rate`, then cosine decay to `min_lr_ratio * lr`."""
  lr, warmup, total = train_config.learning_rate, train_config.warmup_steps, train_config.num_steps
  if total < 1:
    raise ValueError(f"config.train.num_steps={total}: must be >= 1")
  if not 0 <= warmup <= total:
    raise ValueError(f"config.train.warmup_steps={warmup}: must be in [0, num_steps={total}]")
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=lr, warmup_steps=warmup, decay_steps=max(total, warmup + 1),
      end_value=lr * train_config.min_lr_ratio)


def decay_mask(params) -> Any:
  """True for matrices that get weight decay; False for norms, biases (ndim < 2) and embeddings."""
  def decays(path, leaf):
    names = [str(getattr(k, "key", getattr(k, "name", k))).lower() for k in path]
    return leaf.ndim >= 2 and not any("embed" in n for n in names)
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(train_config) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW (decay masked by `decay_mask`) on the warmup-cosine schedule."""
  return optax.chain(
      optax.clip_by_global_norm(train_config.grad_clip),
      optax.adamw(learning_rate_schedule(train_config), b1=train_config.b1, b2=train_config.b2,
                  weight_decay=train_config.weight_decay, mask=decay_mask))


# ------------------------------------------------------------------------------------------
# Sharded state creation and steps
# ------------------------------------------------------------------------------------------


def make_init(model, tx, *, seq_len: int, mesh, rules) -> tuple[Callable, Any]:
  """(jit(rng) -> sharded TrainState, state shardings).

  eval_shape of the boxed init -> logical PartitionSpecs -> NamedShardings -> the init is jitted
  with those as out_shardings, so the state is created directly in its sharded layout.
  """
  batch_ways = math.prod(mesh.shape[a] for a in ("data", "fsdp"))
  dummy_BL = jnp.zeros((batch_ways, seq_len), jnp.int32)

  def boxed_init(rng):
    with nn.logical_axis_rules(rules):
      params = model.init(rng, dummy_BL)["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  def init(rng):
    return nn.meta.unbox(boxed_init(rng))

  abstract_boxed = jax.eval_shape(boxed_init, jax.random.key(0))
  logical_specs = nn.get_partition_spec(abstract_boxed)
  abstract = nn.meta.unbox(abstract_boxed)
  shardings = sharding_lib.logical_to_mesh_shardings(logical_specs, abstract, mesh, rules)
  return jax.jit(init, out_shardings=shardings), shardings


def make_train_step(model, tx, schedule, state_shardings, batch_sharding, rules) -> Callable:
  """jit(state, batch) -> (new state, TrainMetrics); state donated, shardings pinned."""
  def train_step(state: TrainState, batch: data_lib.Batch):
    def loss_fn(params):
      with nn.logical_axis_rules(rules):
        logits_BLV = model.apply({"params": params}, batch.inputs)
      return metrics_lib.mean_loss(logits_BLV, batch.targets, batch.weights), logits_BLV

    (_, logits_BLV), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    m = metrics_lib.TrainMetrics.make(logits_BLV, batch.targets, batch.weights,
                                      grad_norm=optax.tree.norm(grads),
                                      update_norm=optax.tree.norm(updates),
                                      learning_rate=schedule(state.step))
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), m

  batch_sh = data_lib.Batch(batch_sharding, batch_sharding, batch_sharding)
  replicated = sharding_lib.replicated(batch_sharding.mesh)
  return jax.jit(train_step, in_shardings=(state_shardings, batch_sh),
                 out_shardings=(state_shardings, replicated), donate_argnums=0)


def make_eval_step(model, params_shardings, batch_sharding, rules) -> Callable:
  """jit(params, batch) -> EvalMetrics (loss, exact accuracies, per-position accuracy)."""
  def eval_step(params, batch: data_lib.Batch):
    with nn.logical_axis_rules(rules):
      logits_BLV = model.apply({"params": params}, batch.inputs)
    return metrics_lib.EvalMetrics.make(logits_BLV, batch.targets, batch.weights)

  batch_sh = data_lib.Batch(batch_sharding, batch_sharding, batch_sharding)
  return jax.jit(eval_step, in_shardings=(params_shardings, batch_sh),
                 out_shardings=sharding_lib.replicated(batch_sharding.mesh))


def run_eval(eval_step, params, batches) -> dict:
  """Merges EvalMetrics over batches; returns JSON-ready numbers."""
  merged = None
  for b in batches:
    m = eval_step(params, b)
    merged = m if merged is None else merged.merge(m)
  return metrics_lib.to_python(jax.device_get(merged).compute())


# ------------------------------------------------------------------------------------------
# Set-up shared with evaluate.py
# ------------------------------------------------------------------------------------------


class Setup:
  """Everything derived from a config that training and evaluation share, with the jitted
  init / train / eval functions built once (see `get_setup`, which reuses them across runs
  that differ only in seeds, logging or data)."""

  def __init__(self, config, *, vocab_size: int, max_len: int):
    self.mesh = sharding_lib.create_mesh(config.mesh)
    self.rules = sharding_lib.logical_rules(dict(config.logical_axis_rules))
    self.vocab_size, self.max_len = vocab_size, max_len
    self.model, self.model_cfg = build_model(config.model, vocab_size=vocab_size, max_len=max_len)
    self.schedule = learning_rate_schedule(config.train)
    self.tx = make_optimizer(config.train)
    self._init = None
    self._steps = {}

  def batch_sharding(self, batch_size: int):
    return sharding_lib.batch_sharding(self.mesh, self.rules, batch_size)

  @property
  def state_shardings(self):
    self._build_init()
    return self._init[1]

  def _build_init(self):
    if self._init is None:
      self._init = make_init(self.model, self.tx, seq_len=self.max_len, mesh=self.mesh,
                             rules=self.rules)

  def init_state(self, seed: int = 0) -> tuple[TrainState, Any]:
    """(fresh sharded train state, its shardings); parameters from the "init" stream of `seed`."""
    self._build_init()
    return self._init[0](data_lib.stream_key(seed, "init")), self._init[1]

  def train_step(self, batch_size: int) -> Callable:
    key = ("train", batch_size)
    if key not in self._steps:
      self._steps[key] = make_train_step(self.model, self.tx, self.schedule, self.state_shardings,
                                         self.batch_sharding(batch_size), self.rules)
    return self._steps[key]

  def eval_step(self, batch_size: int) -> Callable:
    key = ("eval", batch_size)
    if key not in self._steps:
      self._steps[key] = make_eval_step(self.model, self.state_shardings.params,
                                        self.batch_sharding(batch_size), self.rules)
    return self._steps[key]


_SETUPS: dict[str, Setup] = {}
_MAX_SETUPS = 4


def get_setup(config, *, vocab_size: int, max_len: int) -> Setup:
  """A Setup for `config`, reused when model, optimizer, mesh and rules are unchanged.

  The key holds every field the jitted functions depend on (all of config.model and
  config.train except `seed`, the mesh, rules, vocabulary, max_len and the devices), so runs
  that differ only in seed, task dials of the same shape, or logging reuse compiled code.
  """
  train = {k: v for k, v in config.train.to_dict().items() if k != "seed"}
  key = json.dumps({"model": config.model.to_dict(), "train": train,
                    "mesh": config.mesh.to_dict(), "rules": config.logical_axis_rules.to_dict(),
                    "vocab_size": vocab_size, "max_len": max_len,
                    "devices": [str(d) for d in jax.devices()]}, sort_keys=True, default=str)
  if key not in _SETUPS:
    if len(_SETUPS) >= _MAX_SETUPS:
      _SETUPS.pop(next(iter(_SETUPS)))
    _SETUPS[key] = Setup(config, vocab_size=vocab_size, max_len=max_len)
  return _SETUPS[key]


def write_train_config(workdir: str, config, *, vocab_size: int, max_len: int) -> None:
  """Stores the training config with the model's vocabulary and max length (read by eval)."""
  payload = {"vocab_size": vocab_size, "max_len": max_len,
             "config": json.loads(config.to_json_best_effort())}
  _write_json(os.path.join(workdir, TRAIN_CONFIG_FILE), payload)


def read_train_config(workdir: str) -> dict:
  path = os.path.join(workdir, TRAIN_CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: is {workdir!r} a training workdir (train.py "
                            f"writes it at start)?")
  with open(path) as f:
    return json.load(f)


def _write_json(path: str, payload) -> None:
  if jax.process_index() != 0:
    return
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(payload, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def _flat_hparams(config) -> dict:
  flat = flax.traverse_util.flatten_dict(config.to_dict(), sep=".")
  return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in flat.items()}


# ------------------------------------------------------------------------------------------
# The training loop
# ------------------------------------------------------------------------------------------


class _Preemption:
  """Sets a flag on SIGTERM (installed only from the main thread)."""

  def __init__(self):
    self.flag = False
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint and stopping")
    self.flag = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def requested(self, step: int, sync_every: int) -> bool:
    """Whether to stop now; across processes the flag is agreed on every `sync_every` steps."""
    if jax.process_count() == 1:
      return self.flag
    if step % sync_every:
      return False
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.asarray(self.flag))
    return bool(np.any(flags))


def _check_finite(step: int, m, last_good: int | None) -> None:
  """Raises FloatingPointError if step `step`'s loss, gradient or update is NaN/Inf."""
  values = jax.device_get((m.loss.total, m.grad_norm.total, m.update_norm.total))
  if not all(np.isfinite(v) for v in values):
    raise FloatingPointError(
        f"non-finite training loss, gradient or update at step {step} (loss sum {values[0]}, "
        f"grad norm {values[1]}, update norm {values[2]}); stopped without saving. Last good "
        f"checkpoint: "
        f"{'none' if last_good is None else f'step {last_good}'}")


def _validate(config) -> None:
  if config.data.source not in data_lib.SOURCES:
    raise ValueError(f"config.data.source={config.data.source!r}; allowed: {data_lib.SOURCES}")
  if config.eval.split not in data_lib.EVAL_SPLITS:
    raise ValueError(f"config.eval.split={config.eval.split!r}; allowed: {data_lib.EVAL_SPLITS}")
  for field in ("log_every", "eval_every", "checkpoint_every", "batch_size"):
    if config.train[field] < 1:
      raise ValueError(f"config.train.{field}={config.train[field]}: must be >= 1")
  if config.eval.num_examples < 1 or config.eval.batch_size < 1:
    raise ValueError("config.eval.num_examples and config.eval.batch_size must be >= 1")


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains `config` in `workdir` (resuming its latest checkpoint); returns the summary dict.

  Writes `workdir/checkpoints/<step>`, TensorBoard events, `train_config.json`,
  `eval_history.jsonl` and `train_summary.json` (see interfaces: step, loss, eval_loss,
  token_accuracy, sequence_accuracy, first_step_100, wall_seconds, num_params).
  """
  t_start = time.time()
  _validate(config)
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  tc = config.train
  source = data_lib.make_source(config, splits=("train", "validation"))
  setup = get_setup(config, vocab_size=source.vocab_size, max_len=source.seq_len)
  train_sh = setup.batch_sharding(tc.batch_size)
  eval_sh = setup.batch_sharding(config.eval.batch_size)
  from clu import metric_writers, parameter_overview, periodic_actions

  with contextlib.ExitStack() as stack:  # closes the writer, then waits for pending saves
    stack.enter_context(jax.set_mesh(setup.mesh))
    preemption = stack.enter_context(_Preemption())
    state, _ = setup.init_state(tc.seed)
    ckpts = checkpointing.Checkpoints(os.path.join(workdir, "checkpoints"), tc.keep_checkpoints)
    stack.callback(ckpts.close)
    latest = ckpts.latest_step()
    if latest is not None:
      state = ckpts.restore(latest, checkpointing.abstract_like(state))
      logging.info("resumed from checkpoint step %d", latest)
    start = int(jax.device_get(state.step))
    write_train_config(workdir, config, vocab_size=setup.vocab_size, max_len=setup.max_len)
    num_params = int(sum(np.prod(p.shape) for p in jax.tree.leaves(state.params)))

    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    stack.callback(writer.close)
    if start == 0:
      writer.write_hparams(_flat_hparams(config))
    logging.info("model: %d parameters, mesh %s\n%s", num_params, dict(setup.mesh.shape),
                 parameter_overview.get_parameter_overview(
                     state.params, include_stats=jax.process_count() == 1))

    train_step = setup.train_step(tc.batch_size)
    eval_step = setup.eval_step(config.eval.batch_size)
    next_batch = source.train_batches(tc.seed, tc.batch_size, train_sh)
    eval_batches = source.eval_batches("validation", config.eval.seed, config.eval.num_examples,
                                       config.eval.batch_size, eval_sh)
    from ea_jax import model as model_lib
    flops_per_step = (model_lib.flops_per_token(setup.model_cfg, setup.max_len)
                      * tc.batch_size * setup.max_len)
    peak = tc.peak_flops * jax.device_count()

    hooks = [periodic_actions.ReportProgress(num_train_steps=tc.num_steps, writer=writer,
                                             every_steps=tc.log_every, every_secs=None)]
    if tc.profile_steps > 0 and jax.process_index() == 0:
      hooks.append(periodic_actions.Profile(logdir=workdir, num_profile_steps=tc.profile_steps,
                                            profile_duration_ms=None, first_profile=start + 5,
                                            every_secs=None))

    history = _read_history(workdir, upto=start)
    first_100 = next((h["step"] for h in history if h["sequence_accuracy"] == 1.0), None)
    last_eval = history[-1] if history else None
    last_good = latest
    prev = None            # (step index, TrainMetrics) of the previous step, read one step late
    accum = None           # metrics merged since the last log line
    t_mark, steps_mark = time.time(), start
    last_loss = None
    stopped = None

    step = start
    while step < tc.num_steps:
      if preemption.requested(step, tc.log_every):
        stopped = "sigterm"
        break
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        state, m = train_step(state, next_batch(step))
      if prev is not None:
        _check_finite(prev[0], prev[1], last_good)
      accum = m if accum is None else accum.merge(m)
      prev = (step, m)
      step += 1
      for hook in hooks:
        hook(step)

      last_step = step == tc.num_steps
      if step % tc.log_every == 0 or last_step:
        _check_finite(prev[0], prev[1], last_good)
        computed = metrics_lib.to_python(jax.device_get(accum).compute())
        accum = None
        elapsed = time.time() - t_mark
        steps_done = step - steps_mark
        tokens_per_sec = steps_done * tc.batch_size * setup.max_len / max(elapsed, 1e-9)
        computed["tokens_per_sec"] = tokens_per_sec
        computed["mfu"] = flops_per_step * steps_done / max(elapsed, 1e-9) / peak
        last_loss = computed["loss"]
        writer.write_scalars(step, {f"train/{k}": v for k, v in computed.items()
                                    if v is not None})
        logging.info("step %d/%d  loss %.4f  token_acc %.4f  seq_acc %.4f  (%.0f tokens/s)",
                     step, tc.num_steps, computed["loss"], computed["token_accuracy"],
                     computed["sequence_accuracy"], tokens_per_sec)
        t_mark, steps_mark = time.time(), step

      early = False
      if step % tc.eval_every == 0 or last_step:
        t0 = time.time()
        ev = run_eval(eval_step, state.params, eval_batches)
        last_eval = {"step": step, **{k: ev[k] for k in
                                      ("loss", "token_accuracy", "sequence_accuracy")}}
        _append_history(workdir, last_eval)
        writer.write_scalars(step, {f"eval/{k}": v for k, v in last_eval.items()
                                    if k != "step" and v is not None})
        logging.info("eval step %d  loss %.4f  token_acc %.4f  seq_acc %.4f", step, ev["loss"],
                     ev["token_accuracy"], ev["sequence_accuracy"])
        if first_100 is None and ev["sequence_accuracy"] == 1.0:
          first_100 = step
        early = tc.early_stop and ev["sequence_accuracy"] == 1.0
        t_mark += time.time() - t0

      if step % tc.checkpoint_every == 0 or last_step or early:
        _check_finite(prev[0], prev[1], last_good)
        t0 = time.time()
        ckpts.save(step, state)
        last_good = step
        t_mark += time.time() - t0
      if early:
        stopped = "early_stop"
        logging.info("early stop at step %d: validation sequence accuracy 1.0", step)
        break

    if stopped == "sigterm":
      if prev is not None:
        _check_finite(prev[0], prev[1], last_good)
      ckpts.save(step, state)
    final_step = int(jax.device_get(state.step))
    if stopped != "sigterm" and (last_eval is None or last_eval["step"] != final_step):
      ev = run_eval(eval_step, state.params, eval_batches)
      last_eval = {"step": final_step, **{k: ev[k] for k in
                                          ("loss", "token_accuracy", "sequence_accuracy")}}
      if first_100 is None and ev["sequence_accuracy"] == 1.0:
        first_100 = final_step
    if stopped != "sigterm":
      ckpts.save(final_step, state)

  if last_loss is None and start == final_step:  # nothing trained now: keep the earlier summary's
    last_loss = _read_json(os.path.join(workdir, SUMMARY_FILE)).get("loss")
  summary = {
      "step": final_step,
      "loss": last_loss,
      "eval_loss": last_eval["loss"] if last_eval else None,
      "token_accuracy": last_eval["token_accuracy"] if last_eval else None,
      "sequence_accuracy": last_eval["sequence_accuracy"] if last_eval else None,
      "first_step_100": first_100,
      "wall_seconds": time.time() - t_start,
      "num_params": num_params,
      "stopped": stopped or "num_steps",
  }
  _write_json(os.path.join(workdir, SUMMARY_FILE), summary)
  if stopped == "sigterm":
    logging.warning("stopped by SIGTERM after saving step %d", final_step)
  return summary


def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    return json.load(f)


def _read_history(workdir: str, upto: int) -> list[dict]:
  """Earlier evals (from before a resume) up to step `upto`."""
  path = os.path.join(workdir, EVAL_HISTORY_FILE)
  if not os.path.isfile(path):
    return []
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return [r for r in rows if r["step"] <= upto]


def _append_history(workdir: str, row: dict) -> None:
  if jax.process_index() != 0:
    return
  with open(os.path.join(workdir, EVAL_HISTORY_FILE), "a") as f:
    f.write(json.dumps(row) + "\n")
