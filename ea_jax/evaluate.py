"""evaluate(config, workdir): restore the latest checkpoint and measure it on held-out sequences.

Letters: B batch, L sequence length, V vocabulary, N heads.

Model, task and data are the run's own, from `workdir/train_config.json` (with its vocabulary
and max_len); what an evaluation may change is `provenance.EVAL_MAY_CHANGE` (split, number of
examples, sequence length for length generalisation, execution layout). Writes
`workdir/eval_<split>_L<seq_len>.json` (one file per split and length, so one evaluation never
replaces another):
  step, split, num_examples, seq_len, loss, token_accuracy, sequence_accuracy,
  per_position_accuracy (list over positions, null where nothing is scored) and, for generator
  tasks, rollout_token_accuracy / rollout_sequence_accuracy: the model's own greedy predictions
  are fed back at every scored position (positions whose target is not determined keep the true
  token), so one early mistake propagates.
"""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from ea_jax import checkpointing, files, provenance, train_lib
from ea_jax import data as data_lib


def _set(config: ml_collections.ConfigDict, name: str, value) -> None:
  *parents, leaf = name.split(".")
  node = config
  for p in parents:
    node = node[p]
  with node.unlocked():
    node[leaf] = value


def training_config(
  config,
  workdir: str,
  *,
  split: str | None = None,
  num_examples: int | None = None,
  seq_len: int | None = None,
) -> tuple[ml_collections.ConfigDict, int, int]:
  """(config to evaluate with, vocab_size, max_len): the run's own config from `workdir`.

  Model, task, data and the eval set come from `workdir/train_config.json`. `config` (optional:
  e.g. the training command's own) may change only `provenance.EVAL_MAY_CHANGE` (split, number
  of examples, sequence length, execution layout); any other differing model / task / data /
  eval field raises `provenance.ProvenanceError` naming it; `config.train` is ignored. The
  keyword arguments override the split, the number of examples and the sequence length.
  """
  info = train_lib.read_train_config(workdir)
  merged = ml_collections.ConfigDict(info["config"])
  if config is not None:
    provenance.check_eval(info["config"], config, workdir)
    given = provenance.flatten(config)
    stored = provenance.flatten(info["config"])
    for name, value in given.items():
      if provenance.matches(name, provenance.EVAL_MAY_CHANGE) and stored.get(name) != value:
        _set(merged, name, value)
  for name, value in (
    ("eval.split", split),
    ("eval.num_examples", num_examples),
    ("task.seq_len", seq_len),
  ):
    if value is not None:
      _set(merged, name, value)
  if merged.eval.split not in data_lib.EVAL_SPLITS:
    raise ValueError(f"config.eval.split={merged.eval.split!r}; allowed: {data_lib.EVAL_SPLITS}")
  if merged.eval.num_examples < 1:
    raise ValueError(f"config.eval.num_examples={merged.eval.num_examples}: must be >= 1")
  return merged, int(info["vocab_size"]), int(info["max_len"])


def eval_file_name(split: str, seq_len: int, step: int | None = None) -> str:
  """`eval_<split>_L<seq_len>.json` (latest checkpoint) or `..._step<N>.json` (a chosen one)."""
  return f"eval_{split}_L{seq_len}" + ("" if step is None else f"_step{step}") + ".json"


def rollout_predictions(apply_fn, params, batch: data_lib.Batch) -> jax.Array:
  """Greedy predictions [B, L] when the model's own outputs are fed back at scored positions.

  Position t's prediction becomes input t+1 if target t is scored; otherwise input t+1 keeps the
  true token (the task does not determine it). Loops from the earliest scored position with one
  full causal forward per position.
  """
  inputs_BL, scored_BL = batch.inputs, batch.weights > 0
  L = inputs_BL.shape[1]
  has_BL = jnp.any(scored_BL, axis=0)
  start = jnp.where(jnp.any(has_BL), jnp.argmax(has_BL), L - 1)

  def body(t, tokens_BL):
    pred_B = jnp.argmax(apply_fn(params, tokens_BL)[:, t], axis=-1).astype(tokens_BL.dtype)
    nxt_B = jnp.where(scored_BL[:, t], pred_B, inputs_BL[:, t + 1])
    return jax.lax.dynamic_update_slice_in_dim(tokens_BL, nxt_B[:, None], t + 1, axis=1)

  tokens_BL = jax.lax.fori_loop(start, L - 1, body, inputs_BL)
  return jnp.argmax(apply_fn(params, tokens_BL), axis=-1).astype(inputs_BL.dtype)


def _rollout_counts(apply_fn, params, batch):
  pred_BL = rollout_predictions(apply_fn, params, batch)
  scored_BL = batch.weights > 0
  right_BL = (pred_BL == batch.targets) & scored_BL
  seq_scored_B = jnp.any(scored_BL, axis=1)
  seq_right_B = seq_scored_B & jnp.all(right_BL | ~scored_BL, axis=1)
  return jnp.stack(
    [jnp.sum(right_BL), jnp.sum(scored_BL), jnp.sum(seq_right_B), jnp.sum(seq_scored_B)]
  ).astype(jnp.int32)


def _is_next_token_layout(batch: data_lib.Batch) -> bool:
  inputs, targets = (
    np.asarray(jax.device_get(batch.inputs)),
    np.asarray(jax.device_get(batch.targets)),
  )
  return bool(np.all(inputs[:, 1:] == targets[:, :-1]))


def evaluate(
  config,
  workdir: str,
  *,
  plot_attention: int = 0,
  split: str | None = None,
  num_examples: int | None = None,
  seq_len: int | None = None,
  step: int | None = None,
) -> dict:
  """Evaluates a checkpoint of `workdir` with the run's own model, task and data.

  Writes and returns `workdir/eval_<split>_L<seq_len>.json` (see `eval_file_name`).

  Args:
    config: None (the run's config as stored), or a config checked against the run: only
      `provenance.EVAL_MAY_CHANGE` may differ (see `training_config`).
    workdir: a training workdir (holds train_config.json and checkpoints/).
    plot_attention: if > 0, save attention maps of this many eval examples as PNGs under
      `workdir/attention/`.
    split, num_examples, seq_len: override the split ("validation" / "test"), the number of
      examples and the sequence length (length generalisation).
    step: the checkpoint to evaluate (default: the latest).
  """
  workdir = os.path.abspath(workdir)
  model_config, vocab_size, max_len = training_config(
    config, workdir, split=split, num_examples=num_examples, seq_len=seq_len
  )
  split, ev = model_config.eval.split, model_config.eval
  setup = train_lib.get_setup(model_config, vocab_size=vocab_size, max_len=max_len)
  source = data_lib.make_source(model_config, splits=(split,), vocab_size=vocab_size)
  if source.seq_len != max_len:
    logging.info(
      "evaluating at length %d; the model was trained at length %d", source.seq_len, max_len
    )
  eval_sh = setup.batch_sharding(ev.batch_size)

  if step is not None:
    steps = checkpointing.Checkpoints(os.path.join(workdir, "checkpoints"), keep=1000)
    have = steps.all_steps()
    steps.close()
    if step not in have:
      raise checkpointing.CheckpointError(
        f"--step={step}: no such checkpoint in {workdir}/checkpoints; have {have}"
      )
  _, chosen, state = train_lib.restore(workdir, step, config=model_config)
  params = state.params

  with jax.set_mesh(setup.mesh):
    batches = source.eval_batches(split, ev.seed, ev.num_examples, ev.batch_size, eval_sh)
    eval_step = setup.eval_step(ev.batch_size)
    result = {
      "step": int(chosen),
      "split": split,
      "num_examples": source.eval_size(split, ev.num_examples),
      "seq_len": source.seq_len,
      **train_lib.run_eval(eval_step, params, batches),
    }

    def apply_fn(p, tokens_BL):
      with nn.logical_axis_rules(setup.rules):
        return setup.model.apply({"params": p}, tokens_BL)

    if model_config.data.source == "generator" and _is_next_token_layout(batches[0]):
      counts_fn = jax.jit(lambda p, b: _rollout_counts(apply_fn, p, b))
      c = sum(np.asarray(jax.device_get(counts_fn(params, b)), np.int64) for b in batches)
      result["rollout_token_accuracy"] = float(c[0] / max(c[1], 1))
      result["rollout_sequence_accuracy"] = float(c[2] / max(c[3], 1))
    if plot_attention > 0:
      result["attention_plots"] = _plot_attention(setup, params, batches, plot_attention, workdir)

  logging.info(
    "eval step %d (%s, %d examples, length %d): loss %.4f  token_acc %.4f  seq_acc %.4f%s",
    chosen,
    split,
    result["num_examples"],
    source.seq_len,
    result["loss"],
    result["token_accuracy"],
    result["sequence_accuracy"],
    f"  rollout_seq_acc {result['rollout_sequence_accuracy']:.4f}"
    if "rollout_sequence_accuracy" in result
    else "",
  )
  path = os.path.join(workdir, eval_file_name(split, source.seq_len, step))
  earlier = files.read_json(path)
  if earlier is not None and earlier.get("step") != result["step"]:
    logging.warning(
      "%s held step %s; replacing it with step %d", path, earlier.get("step"), result["step"]
    )
  files.write_json(path, result)
  return result


def _plot_attention(setup, params, batches, num_examples: int, workdir: str) -> list[str]:
  """Saves per-example attention maps (one panel per layer x head); returns the PNG paths."""
  from ea_jax import model as model_lib
  from ea_jax import plots

  first = jax.tree.map(lambda a: np.asarray(jax.device_get(a)), batches[0])
  n = min(num_examples, first.inputs.shape[0])
  tokens_BL = jnp.asarray(first.inputs[:n])
  with nn.logical_axis_rules(setup.rules):
    maps = model_lib.attention_maps(setup.model, params, tokens_BL)
  maps = [np.asarray(jax.device_get(m), np.float32) for m in maps]  # per layer [B, N, L, L]
  out_dir = os.path.join(workdir, "attention")
  paths = []
  if jax.process_index() == 0:
    os.makedirs(out_dir, exist_ok=True)
    kind = setup.model_cfg.attention if hasattr(setup.model_cfg, "attention") else ""
    for i in range(n):
      path = os.path.join(out_dir, f"example_{i}.png")
      plots.plot_attention_maps(
        [m[i] for m in maps],
        path,
        tokens=first.inputs[i],
        scored=first.weights[i] > 0,
        title=f"{kind} example {i}",
      )
      paths.append(path)
  return paths
