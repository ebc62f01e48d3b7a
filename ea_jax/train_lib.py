"""Training: TrainState, optimizer, sharded init, jitted train/eval steps, train_and_evaluate.

Letters: B batch, L sequence length, V vocabulary.

`train_and_evaluate(config, workdir)`:
  mesh from config.mesh -> data source -> model -> state sharded at init, or the latest
  checkpoint restored -> loop: train step (state donated), read step N-1's metrics after
  dispatching step N (stops on NaN/Inf naming the step), log / validate / stop
  (`ea_jax.stopping`) / checkpoint periodically -> the test split at the checkpoint selected on
  validation -> `workdir/train_summary.json`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import signal
import threading
import time
from typing import Any, Callable, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from ea_jax import checkpointing, files, provenance, stopping, workdir_lock
from ea_jax import data as data_lib
from ea_jax import metrics as metrics_lib
from ea_jax import sharding as sharding_lib

TRAIN_CONFIG_FILE = "train_config.json"
SUMMARY_FILE = "train_summary.json"
EVAL_HISTORY_FILE = "eval_history.jsonl"


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 [], number of updates applied
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


class Hyper(NamedTuple):
  """The optimizer's hyperparameters: arguments of the compiled train step, not constants in
  it, so that runs differing only in them (an lr sweep, another budget) share one compile."""

  learning_rate: Any  # peak AdamW learning rate
  warmup_steps: Any  # linear warmup from 0 (clamped to num_steps)
  num_steps: Any  # cosine decay ends here, at min_lr_ratio * learning_rate
  min_lr_ratio: Any
  b1: Any
  b2: Any
  weight_decay: Any
  grad_clip: Any


def hyperparameters(train_config) -> Hyper:
  """The validated `Hyper` of config.train (Python numbers)."""
  tc = train_config
  if not tc.learning_rate > 0:
    raise ValueError(f"config.train.learning_rate={tc.learning_rate}: must be > 0")
  if tc.num_steps < 1:
    raise ValueError(f"config.train.num_steps={tc.num_steps}: must be >= 1")
  if tc.warmup_steps < 0:
    raise ValueError(f"config.train.warmup_steps={tc.warmup_steps}: must be >= 0")
  return Hyper(
    learning_rate=float(tc.learning_rate),
    warmup_steps=min(int(tc.warmup_steps), int(tc.num_steps)),  # `_validate` warns
    num_steps=int(tc.num_steps),
    min_lr_ratio=float(tc.min_lr_ratio),
    b1=float(tc.b1),
    b2=float(tc.b2),
    weight_decay=float(tc.weight_decay),
    grad_clip=float(tc.grad_clip),
  )


def schedule_from(hp: Hyper) -> optax.Schedule:
  """Linear warmup from 0 to the peak over `warmup_steps`, then cosine decay to
  `min_lr_ratio * peak` at `num_steps`; constant after. The same curve as
  `optax.warmup_cosine_decay_schedule` (tested against it), written in jnp because that one
  needs its step counts as Python numbers and these may be traced."""

  def schedule(count):
    t = jnp.asarray(count, jnp.float32)
    lr, warmup, total = (jnp.asarray(x, jnp.float32) for x in hp[:3])
    ratio = jnp.asarray(hp.min_lr_ratio, jnp.float32)
    warm = lr * t / jnp.maximum(warmup, 1.0)
    decay = jnp.maximum(total, warmup + 1.0) - warmup
    frac = jnp.clip((t - warmup) / decay, 0.0, 1.0)
    cosine = lr * (ratio + (1.0 - ratio) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac)))
    return jnp.where(t < warmup, warm, cosine)

  return schedule


def learning_rate_schedule(train_config) -> optax.Schedule:
  """The run's learning rate as a function of the step (`schedule_from` its `Hyper`)."""
  return schedule_from(hyperparameters(train_config))


def decay_mask(params) -> Any:
  """True for matrices that get weight decay; False for norms, biases (ndim < 2) and embeddings."""

  def decays(path, leaf):
    names = [str(getattr(k, "key", getattr(k, "name", k))).lower() for k in path]
    return leaf.ndim >= 2 and not any("embed" in n for n in names)

  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(hp: Hyper) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW (decay masked by `decay_mask`) on `schedule_from(hp)`.

  The train step builds it from traced `hp`; its state's structure does not depend on the
  values, so `init` builds it from any (`_STRUCTURE`). (`optax.inject_hyperparams` would also
  make the values runtime, but it keeps them in the optimizer state, which would change every
  checkpoint's structure.)
  """
  return optax.chain(
    optax.clip_by_global_norm(hp.grad_clip),
    optax.adamw(
      schedule_from(hp),
      b1=hp.b1,
      b2=hp.b2,
      weight_decay=hp.weight_decay,
      mask=decay_mask,
    ),
  )


_STRUCTURE = Hyper(1e-3, 0, 1, 0.1, 0.9, 0.999, 0.0, 1.0)  # any values: init's state structure


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


def make_train_step(model, state_shardings, batch_sharding, rules) -> Callable:
  """jit(state, batch, hp) -> (new state, TrainMetrics); state donated, shardings pinned. `hp`
  (a `Hyper` of float32 scalars) is an argument: one compile serves every hyperparameter."""

  def train_step(state: TrainState, batch: data_lib.Batch, hp: Hyper):
    def loss_fn(params):
      with nn.logical_axis_rules(rules):
        logits_BLV = model.apply({"params": params}, batch.inputs)
      return metrics_lib.mean_loss(logits_BLV, batch.targets, batch.weights), logits_BLV

    (_, logits_BLV), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = make_optimizer(hp).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    m = metrics_lib.TrainMetrics.make(
      logits_BLV,
      batch.targets,
      batch.weights,
      grad_norm=optax.tree.norm(grads),
      update_norm=optax.tree.norm(updates),
      learning_rate=schedule_from(hp)(state.step),
    )
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), m

  batch_sh = data_lib.Batch(batch_sharding, batch_sharding, batch_sharding)
  replicated = sharding_lib.replicated(batch_sharding.mesh)
  return jax.jit(
    train_step,
    in_shardings=(state_shardings, batch_sh, replicated),
    out_shardings=(state_shardings, replicated),
    donate_argnums=0,
  )


def make_eval_step(model, params_shardings, batch_sharding, rules) -> Callable:
  """jit(params, batch) -> EvalMetrics (loss, exact accuracies, per-position accuracy)."""

  def eval_step(params, batch: data_lib.Batch):
    with nn.logical_axis_rules(rules):
      logits_BLV = model.apply({"params": params}, batch.inputs)
    return metrics_lib.EvalMetrics.make(logits_BLV, batch.targets, batch.weights)

  batch_sh = data_lib.Batch(batch_sharding, batch_sharding, batch_sharding)
  return jax.jit(
    eval_step,
    in_shardings=(params_shardings, batch_sh),
    out_shardings=sharding_lib.replicated(batch_sharding.mesh),
  )


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
    self.tx = make_optimizer(_STRUCTURE)  # the optimizer state's structure (for init)
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
      self._init = make_init(
        self.model, self.tx, seq_len=self.max_len, mesh=self.mesh, rules=self.rules
      )

  def abstract_state(self) -> Any:
    """The train state as ShapeDtypeStructs carrying their shardings (a restore target; no
    parameters are created)."""
    self._build_init()
    init, shardings = self._init
    shapes = jax.eval_shape(init, data_lib.stream_key(0, "init"))
    return jax.tree.map(
      lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), shapes, shardings
    )

  def init_state(self, seed: int = 0) -> tuple[TrainState, Any]:
    """(fresh sharded train state, its shardings); parameters from the "init" stream of `seed`."""
    self._build_init()
    return self._init[0](data_lib.stream_key(seed, "init")), self._init[1]

  def train_step(self, batch_size: int, train_config) -> Callable:
    """(state, batch) -> (new state, TrainMetrics) with `train_config`'s optimizer
    hyperparameters; one compiled step per batch size, whatever their values."""
    key = ("train", batch_size)
    if key not in self._steps:
      self._steps[key] = make_train_step(
        self.model, self.state_shardings, self.batch_sharding(batch_size), self.rules
      )
    step = self._steps[key]
    hp = jax.device_put(
      Hyper(*np.asarray(hyperparameters(train_config), np.float32)),
      sharding_lib.replicated(self.mesh),
    )
    return lambda state, batch: step(state, batch, hp)

  def eval_step(self, batch_size: int) -> Callable:
    key = ("eval", batch_size)
    if key not in self._steps:
      self._steps[key] = make_eval_step(
        self.model, self.state_shardings.params, self.batch_sharding(batch_size), self.rules
      )
    return self._steps[key]


def _setup_key(config, vocab_size: int, max_len: int) -> str:
  """Every field the jitted functions depend on, as a canonical JSON string (hashable). Not
  config.train: its optimizer fields are arguments of the step (`Hyper`), the rest host-side."""
  return json.dumps(
    {
      "model": config.model.to_dict(),
      "mesh": config.mesh.to_dict(),
      "rules": config.logical_axis_rules.to_dict(),
      "vocab_size": vocab_size,
      "max_len": max_len,
      "devices": [str(d) for d in jax.devices()],
    },
    sort_keys=True,
    default=str,
  )


@functools.lru_cache(maxsize=4)
def _cached_setup(key: str) -> Setup:
  fields = json.loads(key)
  config = ml_collections.ConfigDict(
    {
      "model": fields["model"],
      "mesh": fields["mesh"],
      "logical_axis_rules": fields["rules"],
    }
  )
  return Setup(config, vocab_size=fields["vocab_size"], max_len=fields["max_len"])


def get_setup(config, *, vocab_size: int, max_len: int) -> Setup:
  """A Setup for `config`, reused when model, optimizer, mesh and rules are unchanged.

  The cache key holds every field the jitted functions depend on (all of config.model, the
  mesh, rules, vocabulary, max_len and the devices), so runs that differ only in seed,
  optimizer hyperparameters or budget, task dials of the same shape, logging, evaluation or
  stopping reuse compiled code.
  """
  return _cached_setup(_setup_key(config, vocab_size, max_len))


def restore(workdir: str, step: int | None = None, config=None) -> tuple[Setup, int, TrainState]:
  """(Setup, step, train state) of a run's checkpoint (default: the latest), restored straight
  into the shardings `make_init` builds (`Setup.abstract_state`): no parameters are
  initialised first. The model comes from `workdir/train_config.json` unless `config` is
  given (e.g. one with another mesh)."""
  info = read_train_config(workdir)
  config = ml_collections.ConfigDict(info["config"]) if config is None else config
  setup = get_setup(config, vocab_size=int(info["vocab_size"]), max_len=int(info["max_len"]))
  with jax.set_mesh(setup.mesh):
    ckpts = checkpointing.Checkpoints(os.path.join(workdir, "checkpoints"), keep=1000)
    try:
      step = ckpts.latest_step() if step is None else step
      if step is None:
        raise checkpointing.CheckpointError(f"no checkpoint in {ckpts.directory}: train first")
      state = ckpts.restore(step, setup.abstract_state())
    finally:
      ckpts.close()
  return setup, int(step), state


def write_train_config(workdir: str, config, *, vocab_size: int, max_len: int) -> None:
  """Stores the training config with the model's vocabulary and max length (read by eval)."""
  payload = {
    "vocab_size": vocab_size,
    "max_len": max_len,
    "config": json.loads(config.to_json_best_effort()),
  }
  files.write_json(os.path.join(workdir, TRAIN_CONFIG_FILE), payload)


def read_train_config(workdir: str) -> dict:
  path = os.path.join(workdir, TRAIN_CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"{path} not found: is {workdir!r} a training workdir (train.py writes it at start)?"
    )
  with open(path) as f:
    return json.load(f)


def describe(config, num_params: int | None = None) -> str:
  """A short line naming a run's task, attention and size (for the mains' closing lines)."""
  task, m = config.task, config.model
  name = task.get("name", "?")
  label = task.get("label")
  length = task.get("seq_len")
  what = f"{name} {label}" if label else name
  if length is not None:
    what += f" (length {length})"
  if config.data.source != "generator":
    what += f" [{config.data.source} data]"
  attn = f"ea ({m.ea_kernel})" if m.attention == "ea" else m.attention
  size = f"{m.num_layers} layers x {m.embed_dim} wide"
  if num_params is not None:
    size += f", {num_params:,} parameters"
  return f"{what}, {attn} attention, {size}"


def _flat_hparams(config) -> dict:
  flat = flax.traverse_util.flatten_dict(config.to_dict(), sep=".")
  return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in flat.items()}


# ------------------------------------------------------------------------------------------
# The training loop
# ------------------------------------------------------------------------------------------


class _Preemption:
  """Sets a flag on SIGTERM (installed only from the main thread).

  orbax's `CheckpointManager.reached_preemption` / `multihost_utils.
  reached_preemption_sync_point` rely on the preemption sync manager that only
  `jax.distributed.initialize` starts: in a single process (checked with jax 0.10.2 on CPU) it
  is None, the call returns False and SIGTERM still kills the process. So this small handler
  stays; across processes the flag is agreed on with an allgather.
  """

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
      f"{'none' if last_good is None else f'step {last_good}'}"
    )


def _validate(config) -> None:
  """Checks the fields no other constructor checks; each error names its field."""
  tc = config.train
  hyperparameters(tc)  # learning rate, num_steps, warmup
  if tc.warmup_steps > tc.num_steps:
    logging.warning(
      "config.train.warmup_steps=%d > num_steps=%d: warming up over all %d steps "
      "(set --config.train.warmup_steps to choose)",
      tc.warmup_steps,
      tc.num_steps,
      tc.num_steps,
    )
  if config.data.source not in data_lib.SOURCES:
    raise ValueError(f"config.data.source={config.data.source!r}; allowed: {data_lib.SOURCES}")
  if config.eval.split not in data_lib.EVAL_SPLITS:
    raise ValueError(f"config.eval.split={config.eval.split!r}; allowed: {data_lib.EVAL_SPLITS}")
  for field in ("log_every", "eval_every", "checkpoint_every", "batch_size", "patience"):
    if config.train[field] < 1:
      raise ValueError(f"config.train.{field}={config.train[field]}: must be >= 1")
  if not 0.0 <= config.train.plateau_rel < 1.0:
    raise ValueError(f"config.train.plateau_rel={config.train.plateau_rel}: must be in [0, 1)")
  if config.train.min_steps < 0:
    raise ValueError(f"config.train.min_steps={config.train.min_steps}: must be >= 0")
  if config.eval.num_examples < 1 or config.eval.batch_size < 1:
    raise ValueError("config.eval.num_examples and config.eval.batch_size must be >= 1")


_EVAL_KEYS = ("loss", "token_accuracy", "sequence_accuracy")


class _Run:
  """One call of `train_and_evaluate`: the pieces its stages share.

  Stages, in order: `__init__` (set up: validate, data, model, no files yet), `open` (init or
  restore, history), `loop` (the train steps; `open_writer` makes the metric writer and hooks,
  `log_train` writes every `log_every` steps, `validate` + `decision` every `eval_every`, and
  checkpoints), `finish` (test split at the selected checkpoint, summary).
  """

  def __init__(self, config, workdir: str):
    self.t_start = time.time()
    _validate(config)
    self.config, self.tc = config, config.train
    self.workdir = os.path.abspath(workdir)
    self.source = data_lib.make_source(config, splits=("train",) + data_lib.EVAL_SPLITS)
    self.setup = get_setup(config, vocab_size=self.source.vocab_size, max_len=self.source.seq_len)
    self.train_sh = self.setup.batch_sharding(self.tc.batch_size)
    self.eval_sh = self.setup.batch_sharding(config.eval.batch_size)
    self.history: list[dict] = []

  # -- init or restore ---------------------------------------------------------------------

  def open(self, stack: contextlib.ExitStack) -> None:
    """Restores the latest checkpoint (or initialises) and the eval history."""
    self.ckpts = checkpointing.Checkpoints(
      os.path.join(self.workdir, "checkpoints"),
      self.tc.keep_checkpoints,
      keep_steps=lambda: stopping.steps_to_keep(list(self.history)),
    )
    stack.callback(self.ckpts.close)
    self.latest = self.ckpts.latest_step()
    if self.latest is None:
      self.state, _ = self.setup.init_state(self.tc.seed)
    else:
      self.state = self.ckpts.restore(self.latest, self.setup.abstract_state())
      logging.info("resumed from checkpoint step %d", self.latest)
    self.start = int(jax.device_get(self.state.step))
    self.history = _truncate_history(self.workdir, upto=self.start)
    self.num_params = int(sum(np.prod(p.shape) for p in jax.tree.leaves(self.state.params)))

  def decision(self) -> str | None:
    """What the eval history says now: "solved", "plateau" or None (early_stop off: None)."""
    if not self.tc.early_stop:
      return None
    return stopping.decide(self.history, self.tc.patience, self.tc.plateau_rel, self.tc.min_steps)

  def finished_summary(self) -> dict | None:
    """The stored summary if this workdir's run is complete for the current config, else None."""
    summary = files.read_json(os.path.join(self.workdir, SUMMARY_FILE))
    if not summary or summary.get("ended_by") not in (
      stopping.SOLVED,
      stopping.PLATEAU,
      stopping.MAX_STEPS,
    ):
      return None
    if summary.get("step") != self.start:
      return None
    if self.decision() is None and self.start < self.tc.num_steps:
      return None  # e.g. num_steps was raised: there is more to train
    return summary

  # -- the loop ----------------------------------------------------------------------------

  def open_writer(self, stack: contextlib.ExitStack) -> list:
    """The metric writer (hparams on a fresh run, the parameter overview in the log) and the
    periodic hooks (progress, an optional profile); returns the hooks."""
    from clu import metric_writers, parameter_overview, periodic_actions

    tc = self.tc
    self.writer = metric_writers.create_default_writer(
      self.workdir, just_logging=jax.process_index() > 0
    )
    stack.callback(self.writer.close)
    if self.start == 0:
      self.writer.write_hparams(_flat_hparams(self.config))
    logging.info(
      "model: %d parameters, mesh %s\n%s",
      self.num_params,
      dict(self.setup.mesh.shape),
      parameter_overview.get_parameter_overview(
        self.state.params, include_stats=jax.process_count() == 1
      ),
    )
    hooks = [
      periodic_actions.ReportProgress(
        num_train_steps=tc.num_steps, writer=self.writer, every_steps=tc.log_every, every_secs=None
      )
    ]
    if tc.profile_steps > 0 and jax.process_index() == 0:
      hooks.append(
        periodic_actions.Profile(
          logdir=self.workdir,
          num_profile_steps=tc.profile_steps,
          profile_duration_ms=None,
          first_profile=self.start + 5,
          every_secs=None,
        )
      )
    return hooks

  def log_train(self, step: int, accum, steps_done: int, elapsed: float) -> None:
    """Writes the training metrics merged over the last `steps_done` steps (`accum`), with
    throughput and MFU over their `elapsed` seconds (evaluation and checkpointing excluded)."""
    from ea_jax import model as model_lib

    tc, setup = self.tc, self.setup
    computed = metrics_lib.to_python(jax.device_get(accum).compute())
    tokens_per_sec = steps_done * tc.batch_size * setup.max_len / max(elapsed, 1e-9)
    flops_per_step = (
      model_lib.flops_per_token(setup.model_cfg, setup.max_len) * tc.batch_size * setup.max_len
    )
    computed["tokens_per_sec"] = tokens_per_sec
    computed["mfu"] = (
      flops_per_step * steps_done / max(elapsed, 1e-9) / (tc.peak_flops * jax.device_count())
    )
    self.last_loss = computed["loss"]
    self.writer.write_scalars(step, {f"train/{k}": v for k, v in computed.items() if v is not None})
    logging.info(
      "step %d/%d  loss %.4f  token_acc %.4f  seq_acc %.4f  (%.0f tokens/s)",
      step,
      tc.num_steps,
      computed["loss"],
      computed["token_accuracy"],
      computed["sequence_accuracy"],
      tokens_per_sec,
    )

  def loop(self, stack: contextlib.ExitStack) -> str:
    """Trains from `self.start`; returns how it ended ("solved", "plateau", "max_steps",
    "sigterm"). Saves a checkpoint at every validation eval (the candidates for selection),
    every `checkpoint_every` steps and where it stops."""
    tc, state = self.tc, self.state
    preemption = stack.enter_context(_Preemption())
    hooks = self.open_writer(stack)
    train_step = self.setup.train_step(tc.batch_size, tc)
    self.eval_step = self.setup.eval_step(self.config.eval.batch_size)
    next_batch = self.source.train_batches(tc.seed, tc.batch_size, self.train_sh)

    last_good = self.latest
    prev = None  # (step index, TrainMetrics) of the previous step, read one step late
    accum = None  # metrics merged since the last log line
    t_mark, steps_mark = time.time(), self.start
    self.last_loss = None
    ended = self.decision()
    step = self.start
    while ended is None and step < tc.num_steps:
      if preemption.requested(step, tc.log_every):
        ended = stopping.SIGTERM
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
        self.log_train(step, accum, step - steps_mark, time.time() - t_mark)
        accum = None
        t_mark, steps_mark = time.time(), step

      evaluated = step % tc.eval_every == 0 or last_step
      t0 = time.time()
      if evaluated:
        self.validate(step, state.params)
        ended = self.decision()
        if ended is not None:
          logging.info("stopping at step %d: %s (validation)", step, ended)
      if evaluated or step % tc.checkpoint_every == 0:
        _check_finite(prev[0], prev[1], last_good)
        self.ckpts.save(step, state)
        last_good = step
      t_mark += time.time() - t0  # evaluation and checkpointing are not training time

    if ended == stopping.SIGTERM:
      if prev is not None:
        _check_finite(prev[0], prev[1], last_good)
      self.ckpts.save(step, state)
    self.state = state
    self.final_step = int(jax.device_get(state.step))
    if ended != stopping.SIGTERM and (
      not self.history or self.history[-1]["step"] != self.final_step
    ):
      # Restored at a step that was never evaluated (num_steps lowered, or a checkpoint written
      # at a non-eval step): evaluate it so that every checkpoint the run ends on is scored.
      self.validate(self.final_step, state.params)
      self.ckpts.save(self.final_step, state)
      ended = self.decision()
    return ended or stopping.MAX_STEPS

  def validate(self, step: int, params) -> dict:
    """Evaluates the validation split; appends to the history (memory, file, TensorBoard)."""
    cfg = self.config.eval
    batches = self.source.eval_batches(
      "validation", cfg.seed, cfg.num_examples, cfg.batch_size, self.eval_sh
    )
    if not hasattr(self, "eval_step"):
      self.eval_step = self.setup.eval_step(cfg.batch_size)
    ev = run_eval(self.eval_step, params, batches)
    row = {"step": step, **{k: ev[k] for k in _EVAL_KEYS}}
    self.history.append(row)
    files.append_jsonl(os.path.join(self.workdir, EVAL_HISTORY_FILE), [row])
    if hasattr(self, "writer"):
      self.writer.write_scalars(
        step, {f"eval/{k}": v for k, v in row.items() if k != "step" and v is not None}
      )
    logging.info(
      "eval step %d  loss %.4f  token_acc %.4f  seq_acc %.4f",
      step,
      ev["loss"],
      ev["token_accuracy"],
      ev["sequence_accuracy"],
    )
    return row

  # -- finish ------------------------------------------------------------------------------

  def test_at(self, step: int) -> dict:
    """Test-split metrics of the checkpoint at `step` (the in-memory state if it is that step)."""
    if step == self.final_step:
      params = self.state.params
    else:
      self.ckpts.wait()
      params = self.ckpts.restore(step, self.setup.abstract_state()).params
    cfg = self.config.eval
    batches = self.source.eval_batches(
      "test", cfg.seed, cfg.num_examples, cfg.batch_size, self.eval_sh
    )
    if not hasattr(self, "eval_step"):
      self.eval_step = self.setup.eval_step(cfg.batch_size)
    return run_eval(self.eval_step, params, batches)

  def summary(self, ended_by: str) -> dict:
    """The summary dict; test metrics at the selected step unless the run was interrupted."""
    selected = stopping.select(self.history)
    val = next((r for r in self.history if r["step"] == selected), None)
    test = None
    if ended_by != stopping.SIGTERM and selected is not None:
      test = self.test_at(selected)
      logging.info(
        "test split at the selected step %d: loss %.4f  token_acc %.4f  seq_acc %.4f",
        selected,
        test["loss"],
        test["token_accuracy"],
        test["sequence_accuracy"],
      )
    last_loss = self.last_loss
    if last_loss is None and self.start == self.final_step:  # nothing trained in this call
      last_loss = files.read_json(os.path.join(self.workdir, SUMMARY_FILE), {}).get("loss")
    pick = lambda d, k: None if d is None else d[k]
    return {
      "step": self.final_step,
      "loss": last_loss,
      "ended_by": ended_by,
      "stopped": ended_by,
      "selected_step": selected,
      "steps_to_100": stopping.steps_to_100(self.history),
      "first_step_100": next(
        (r["step"] for r in self.history if r["sequence_accuracy"] == 1.0), None
      ),
      **{f"validation_{k}": pick(val, k) for k in _EVAL_KEYS},
      **{f"test_{k}": pick(test, k) for k in _EVAL_KEYS},
      "eval_loss": pick(test, "loss"),
      "token_accuracy": pick(test, "token_accuracy"),
      "sequence_accuracy": pick(test, "sequence_accuracy"),
      "wall_seconds": time.time() - self.t_start,
      "num_params": self.num_params,
    }


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains `config` in `workdir` (resuming its latest checkpoint); returns the summary dict.

  Periodic evals use the validation split; with `config.train.early_stop` the run ends when
  `ea_jax.stopping.decide` says "solved" or "plateau", else at `num_steps`. The reported
  checkpoint is `ea_jax.stopping.select(history)` (validation only), measured once on the test
  split. A finished run (its summary present and nothing left to train) is left unchanged and
  its summary returned.

  Writes `workdir/checkpoints/<step>`, TensorBoard events, `train_config.json`,
  `eval_history.jsonl` (one validation row per eval step) and `train_summary.json` with:
    step, loss (last logged training loss), ended_by ("solved" | "plateau" | "max_steps" |
    "sigterm"; `stopped` is the same value), selected_step, steps_to_100 (first eval at 1.0
    confirmed by the next), first_step_100 (first eval at 1.0), validation_{loss,
    token_accuracy, sequence_accuracy} and test_{...} at the selected step, wall_seconds,
    num_params. The keys `eval_loss`, `token_accuracy` and `sequence_accuracy` hold the *test*
    numbers at the selected step. After SIGTERM the test numbers are None.
  """
  run = _Run(config, workdir)  # validates everything before anything is written
  with contextlib.ExitStack() as stack:  # closes the writer, waits for saves, then unlocks
    os.makedirs(run.workdir, exist_ok=True)
    if jax.process_index() == 0:
      stack.enter_context(workdir_lock.WorkdirLock(run.workdir))
    stored = _stored_config(run.workdir)
    if stored is not None:
      provenance.check_resume(stored, config, run.workdir)
    stack.enter_context(jax.set_mesh(run.setup.mesh))
    run.open(stack)
    done = run.finished_summary()
    if done is not None:
      logging.info(
        "already done: %s holds a finished run (step %d, ended by %s); nothing to do",
        run.workdir,
        done["step"],
        done["ended_by"],
      )
      return done
    if stored is None or provenance.differences(stored, config):
      write_train_config(
        run.workdir, config, vocab_size=run.setup.vocab_size, max_len=run.setup.max_len
      )
    ended_by = run.loop(stack)
    summary = run.summary(ended_by)
  files.write_json(os.path.join(run.workdir, SUMMARY_FILE), summary)
  if ended_by == stopping.SIGTERM:
    logging.warning("stopped by SIGTERM after saving step %d", run.final_step)
  return summary


def _stored_config(workdir: str) -> dict | None:
  info = files.read_json(os.path.join(workdir, TRAIN_CONFIG_FILE))
  return None if info is None else info["config"]


def _truncate_history(workdir: str, upto: int) -> list[dict]:
  """The eval history up to step `upto` (the restored step); later rows, left by a run killed
  after an eval but before its checkpoint, are removed from the file so it keeps one row per
  step."""
  path = os.path.join(workdir, EVAL_HISTORY_FILE)
  rows = files.read_jsonl(path)
  kept, seen = [], set()
  for r in rows:
    if r["step"] <= upto and r["step"] not in seen:
      kept.append(r)
      seen.add(r["step"])
  if len(kept) != len(rows) and jax.process_index() == 0:
    tmp = f"{path}.tmp{os.getpid()}"
    if os.path.exists(tmp):
      os.remove(tmp)
    files.append_jsonl(tmp, kept)
    os.replace(tmp, path)
  return kept
