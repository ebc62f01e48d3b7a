"""evaluate(config, workdir): restore the latest checkpoint and measure it on held-out sequences.

Letters: B batch, L sequence length, V vocabulary, N heads.

The model is rebuilt from the *training* config stored in `workdir/train_config.json` (its
vocabulary and max_len), so `config.task.seq_len` may differ from training (length
generalisation). Data come from `config` (generator with a fixed eval seed per split, TFDS split,
or the npz eval file). Writes `workdir/eval.json`:
  step, split, num_examples, seq_len, loss, token_accuracy, sequence_accuracy,
  per_position_accuracy (list over positions, null where nothing is scored) and, for generator
  tasks, rollout_token_accuracy / rollout_sequence_accuracy: the model's own greedy predictions
  are fed back at every scored position (positions whose target is not determined keep the true
  token), so one early mistake propagates.
"""
from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from ea_jax import checkpointing
from ea_jax import data as data_lib
from ea_jax import files
from ea_jax import train_lib

EVAL_FILE = "eval.json"


def training_config(config, workdir: str) -> tuple[ml_collections.ConfigDict, int, int]:
  """(config to evaluate with, vocab_size, max_len), using the workdir's training config.

  Model and optimizer fields come from training (the checkpoint's shapes), and so does the task,
  except `task.seq_len`, which `config` may change (length generalisation); other task fields of
  `config` that differ from training are reported and ignored. Mesh, rules, data, eval and
  `model.attention_impl` (if set) come from `config`.
  """
  info = train_lib.read_train_config(workdir)
  stored = ml_collections.ConfigDict(info["config"])
  merged = ml_collections.ConfigDict(config.to_dict())
  merged.model = stored.model
  merged.train = stored.train
  if config.model.get("attention_impl") is not None:
    merged.model.attention_impl = config.model.attention_impl
  task = ml_collections.ConfigDict(stored.task.to_dict())
  ignored = {k: (config.task.get(k), v) for k, v in stored.task.items()
             if k not in ("seq_len", "complexity", "label") and config.task.get(k) != v}
  if ignored:
    logging.warning("config.task differs from the training task of %s in %s (given, trained); "
                    "evaluating the training task", workdir, ignored)
  if "seq_len" in task and "seq_len" in config.task:
    task.seq_len = config.task.seq_len
  merged.task = task
  return merged, int(info["vocab_size"]), int(info["max_len"])


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
  return jnp.stack([jnp.sum(right_BL), jnp.sum(scored_BL), jnp.sum(seq_right_B),
                    jnp.sum(seq_scored_B)]).astype(jnp.int32)


def _is_next_token_layout(batch: data_lib.Batch) -> bool:
  inputs, targets = np.asarray(jax.device_get(batch.inputs)), np.asarray(
      jax.device_get(batch.targets))
  return bool(np.all(inputs[:, 1:] == targets[:, :-1]))


def evaluate(config, workdir: str, *, plot_attention: int = 0) -> dict:
  """Evaluates the latest checkpoint in `workdir`; writes and returns `workdir/eval.json`.

  Args:
    config: experiment config; its task / data / eval / mesh fields choose what to evaluate.
    workdir: a training workdir (holds train_config.json and checkpoints/).
    plot_attention: if > 0, save attention maps of this many eval examples as PNGs under
      `workdir/attention/`.
  """
  workdir = os.path.abspath(workdir)
  split = config.eval.split
  if split not in data_lib.EVAL_SPLITS:
    raise ValueError(f"config.eval.split={split!r}; allowed: {data_lib.EVAL_SPLITS}")
  model_config, vocab_size, max_len = training_config(config, workdir)
  setup = train_lib.get_setup(model_config, vocab_size=vocab_size, max_len=max_len)
  source = data_lib.make_source(model_config, splits=(split,), vocab_size=vocab_size)
  if source.seq_len != max_len:
    logging.info("evaluating at length %d; the model was trained at length %d", source.seq_len,
                 max_len)
  eval_sh = setup.batch_sharding(config.eval.batch_size)

  with jax.set_mesh(setup.mesh):
    state, _ = setup.init_state()
    ckpts = checkpointing.Checkpoints(os.path.join(workdir, "checkpoints"), keep=1000)
    step = ckpts.latest_step()
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {ckpts.directory}: train first "
                              f"(python train.py --workdir={workdir})")
    state = ckpts.restore(step, checkpointing.abstract_like(state))
    ckpts.close()
    params = state.params
    batches = source.eval_batches(split, config.eval.seed, config.eval.num_examples,
                                  config.eval.batch_size, eval_sh)
    eval_step = setup.eval_step(config.eval.batch_size)
    result = {"step": int(step), "split": split,
              "num_examples": source.eval_size(split, config.eval.num_examples),
              "seq_len": source.seq_len,
              **train_lib.run_eval(eval_step, params, batches)}

    def apply_fn(p, tokens_BL):
      with nn.logical_axis_rules(setup.rules):
        return setup.model.apply({"params": p}, tokens_BL)

    if config.data.source == "generator" and _is_next_token_layout(batches[0]):
      counts_fn = jax.jit(lambda p, b: _rollout_counts(apply_fn, p, b))
      c = sum(np.asarray(jax.device_get(counts_fn(params, b)), np.int64) for b in batches)
      result["rollout_token_accuracy"] = float(c[0] / max(c[1], 1))
      result["rollout_sequence_accuracy"] = float(c[2] / max(c[3], 1))
    if plot_attention > 0:
      result["attention_plots"] = _plot_attention(setup, params, batches, plot_attention, workdir)

  logging.info("eval step %d (%s, %d examples, length %d): loss %.4f  token_acc %.4f  "
               "seq_acc %.4f%s", step, split, result["num_examples"], source.seq_len,
               result["loss"], result["token_accuracy"], result["sequence_accuracy"],
               f"  rollout_seq_acc {result['rollout_sequence_accuracy']:.4f}"
               if "rollout_sequence_accuracy" in result else "")
  files.write_json(os.path.join(workdir, EVAL_FILE), result)
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
      plots.plot_attention_maps([m[i] for m in maps], path, tokens=first.inputs[i],
                                scored=first.weights[i] > 0, title=f"{kind} example {i}")
      paths.append(path)
  return paths
