"""The character-level Shakespeare comparison: DPA vs EA (rational, square) at equal size and steps.

  python -m ea_jax.lm_study --config=configs/lm.py --workdir=workdirs/lm --out=docs/lm \
    --workers=2  (make lm)

Every run is `train_lib.train_and_evaluate(config, run_dir)` of the plan's `base` (the nanoGPT
anchor, configs/lm.py) with the variant's attention, a learning rate and a seed. Stages:
  1. tune     every variant x `lr_grid` with `tune_seed`; the lr with the lowest validation loss
              (at the run's best eval) is selected per variant; a choice on the grid's edge
              grows the grid x3 past it (at most `max_lr_extensions` times, `ea_jax.lr_grid`),
              so the selection brackets the optimum (`tuning.csv`: `interior`).
  2. seeds    the selected lr with every seed of `seeds` (the tuning run is reused for
              `tune_seed`): test loss at the checkpoint selected on validation (`results.csv`).
  3. long     `long_runs` ("context:variant:implementation"), batch =
              `long_tokens_per_step` / context, `long_steps` steps at the variant's selected lr:
              validation loss at equal training wall time, tokens/s and the XLA-planned memory
              of one forward+backward pass (`results.csv` rows of stage "long",
              `long_equal_time.json`).
  4. samples  text from each variant's tuning-seed model (`samples.md`), with tokens/s of the KV
              cache and, for square EA, of the recurrent state.
  5. report   `summary.md` (tables, command, machine, commit) and `lm_curves.png` (validation
              loss vs steps and vs training wall time).
A run whose `train_summary.json` reached its step budget is read, not retrained, so the same
command resumes an interrupted comparison. With `--workers=N` the runs of each tuning round, and
then the seed and long-context runs together, train in N worker processes
(`ea_jax.study.runner.Executor`: one compute thread each when N >= cores, a shared compilation
cache in `workdir/jax_cache`); this only changes wall time, since every number is read back from
the run directories and throughput comes from the `throughput` stage.

Throughput and training wall time come from the `throughput` stage: every run shape (variant x
context x implementation) is compiled, then timed side by side in interleaved rounds
(`timing_rounds` x `timing_steps` steps; `timing.json`), so a machine shared with other work
slows every shape alike. tokens/s = tokens per step / median step time; training wall time =
steps x step time (compilation, evaluation and checkpointing excluded). The training loop's own
throughput stays in `results.csv` as `logged_tokens_per_sec`. (Without the stage, both come
from the loop's logged throughput.) Peak memory is XLA's plan for one
forward+backward pass of the run's model and batch (temporaries + arguments + outputs), from
`jax.jit(...).lower(...).compile().memory_analysis()`; it is the same on every machine. Test numbers come from `train_summary.json` (`test_loss`,
`selected_step`) when training reports them; otherwise the final checkpoint is evaluated on the
test split and is the selected one (`selection` column says which).
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import platform
import statistics
import subprocess
import time
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from ea_jax import files, runtime
from ea_jax import lr_grid as lr_grid_lib
from ea_jax import metrics as metrics_lib
from ea_jax import model as model_lib

NATS_PER_BIT = math.log(2.0)

config_flags.DEFINE_config_file(
  "config", None, "The comparison plan (configs/lm.py).", lock_config=True
)
flags.DEFINE_string("workdir", None, "Directory of the runs (one subdirectory per run).")
flags.DEFINE_string("out", None, "Where tables, figure and summary go (default: --workdir).")
flags.DEFINE_integer(
  "estimate",
  0,
  "If > 0: time this many steps of every distinct run shape "
  "and print the plan's projected duration instead of running it (runs one after another, "
  "as with --workers=0).",
)
flags.DEFINE_integer(
  "workers",
  0,
  "Training runs in parallel worker processes (0 = in this process). On a CPU, workers = cores "
  "gives each run one core, which trains these small models faster in total than one run on "
  "all cores.",
)
STAGES = ("seeds", "long", "throughput", "samples", "report")
flags.DEFINE_list(
  "stages",
  list(STAGES),
  "Stages after tuning (tuning always runs: the others use its selection).",
)


# ------------------------------------------------------------------------------------------------
# Run configs
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunSpec:
  variant: str
  lr: float
  seed: int
  stage: str  # "tune", "seed" or "long"
  seq_len: int | None = None
  impl: str | None = None

  @property
  def name(self) -> str:
    parts = [self.variant, f"lr{self.lr:g}", f"s{self.seed}"]
    if self.stage == "long":
      parts += [f"T{self.seq_len}", self.impl or "auto"]
    return "_".join(parts)


def run_config(plan, spec: RunSpec) -> ml_collections.ConfigDict:
  """The training config of one run: `plan.base` with the spec's variant, lr, seed (and context)."""
  c = ml_collections.ConfigDict(plan.base.to_dict())
  if spec.variant not in plan.variant_models:
    raise ValueError(f"variant {spec.variant!r}; allowed: {sorted(plan.variant_models)}")
  for key, value in plan.variant_models[spec.variant].items():
    c.model[key] = value
  c.train.learning_rate = spec.lr
  c.train.seed = spec.seed
  if spec.stage == "long":
    c.task.seq_len = spec.seq_len
    c.model.attention_impl = spec.impl
    c.train.batch_size = max(1, plan.long_tokens_per_step // spec.seq_len)
    c.train.num_steps = plan.long_steps
    c.train.warmup_steps = min(c.train.warmup_steps, max(1, plan.long_steps // 10))
    c.train.log_every = c.train.eval_every = c.train.checkpoint_every = plan.long_eval_every
    c.eval.num_examples = plan.long_eval_examples
    c.eval.batch_size = min(c.eval.batch_size, plan.long_eval_examples)
  c.lock()
  return c


def long_specs(plan, selected_lr: dict) -> list[RunSpec]:
  """The long-context runs of `plan.long_runs` ("context:variant:implementation" entries)."""
  specs = []
  for entry in plan.long_runs:
    parts = entry.split(":")
    if len(parts) != 3 or not parts[0].isdigit() or parts[1] not in selected_lr:
      raise ValueError(
        f"long_runs entry {entry!r}; allowed: 'context:variant:implementation' "
        f"with a variant of {tuple(selected_lr)}, e.g. '1024:ea_square:linear'"
      )
    context, variant, impl = int(parts[0]), parts[1], parts[2]
    specs.append(
      RunSpec(
        variant,
        selected_lr[variant],
        plan.tune_seed,
        "long",
        context,
        None if impl == "auto" else impl,
      )
    )
  return specs


# ------------------------------------------------------------------------------------------------
# Reading a run
# ------------------------------------------------------------------------------------------------


def _scalars(run_dir: str, tag: str) -> list[tuple[int, float]]:
  """(step, value) of one scalar from the run's TensorBoard events, in step order."""
  from tensorboard.backend.event_processing import event_accumulator
  from tensorboard.util import tensor_util

  acc = event_accumulator.EventAccumulator(run_dir, size_guidance={event_accumulator.TENSORS: 0})
  acc.Reload()
  if tag not in acc.Tags()["tensors"]:
    return []
  rows = {e.step: float(tensor_util.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)}
  return sorted(rows.items())


def train_seconds_curve(
  tokens_per_sec: list[tuple[int, float]], tokens_per_step: int
) -> tuple[np.ndarray, np.ndarray]:
  """(steps, cumulative training seconds) from per-log-interval throughput; starts at (0, 0).

  The first interval holds the train step's compilation; it is costed at the median
  throughput of the other intervals (when there are any), so curves compare steady-state speed.
  """
  rates = [tps for _, tps in tokens_per_sec]
  if len(rates) > 1:
    rates[0] = statistics.median(rates[1:])
  steps, seconds, prev = [0], [0.0], 0
  for (step, _), tps in zip(tokens_per_sec, rates):
    seconds.append(seconds[-1] + (step - prev) * tokens_per_step / tps)
    steps.append(step)
    prev = step
  return np.asarray(steps, float), np.asarray(seconds)


def best_eval(history: list[dict]) -> dict:
  """The eval with the lowest validation loss (the earliest on ties)."""
  if not history:
    raise ValueError("no evaluation in the run's eval_history.jsonl")
  return min(history, key=lambda h: (h["loss"], h["step"]))


def _test_eval(config, run_dir: str, step: int) -> dict:
  """Test-split metrics of the run's final checkpoint (evaluate.py's eval.json, reused if there)."""
  from ea_jax import evaluate  # pylint: disable=import-outside-toplevel

  done = files.read_json(
    os.path.join(run_dir, getattr(evaluate, "EVAL_FILE", "eval.json")), default={}
  )
  if (
    done.get("split") == "test"
    and done.get("step") == step
    and (done.get("num_examples") == config.eval.num_examples)
  ):
    return done
  c = ml_collections.ConfigDict(config.to_dict())
  c.eval.split = "test"
  return evaluate.evaluate(c, run_dir)


def collect(config, run_dir: str, spec: RunSpec) -> tuple[dict, list[dict]]:
  """(one results row, the run's validation curve rows) from a finished run directory."""
  summary = files.read_json(os.path.join(run_dir, "train_summary.json"))
  history = files.read_jsonl(os.path.join(run_dir, "eval_history.jsonl"))
  tokens_per_step = config.train.batch_size * config.task.seq_len
  tps = _scalars(run_dir, "train/tokens_per_sec")
  curve_steps, curve_seconds = train_seconds_curve(tps, tokens_per_step)
  best = best_eval(history)
  if summary.get("test_loss") is not None:
    selected, test_loss = int(summary["selected_step"]), float(summary["test_loss"])
    selection = "validation"
    validation_loss = float(summary.get("validation_loss", best["loss"]))
  else:
    test = _test_eval(config, run_dir, int(summary["step"]))
    selected, test_loss, selection = int(test["step"]), float(test["loss"]), "final"
    validation_loss = next(float(h["loss"]) for h in history if h["step"] == selected)
  steady = [v for _, v in tps[1:]] or [v for _, v in tps]  # first interval includes compilation
  row = {
    "run": spec.name,
    "stage": spec.stage,
    "variant": spec.variant,
    "lr": spec.lr,
    "seed": spec.seed,
    "seq_len": config.task.seq_len,
    "batch_size": config.train.batch_size,
    "attention_impl": config.model.attention_impl or "auto",
    "steps": int(summary["step"]),
    "selected_step": selected,
    "selection": selection,
    "best_validation_loss": float(best["loss"]),
    "validation_loss": validation_loss,
    "test_loss": test_loss,
    "test_bits_per_char": test_loss / NATS_PER_BIT,
    "tokens_per_sec": statistics.median(steady) if steady else float("nan"),
    "train_seconds": float(curve_seconds[-1]),
    "num_params": int(summary["num_params"]),
  }
  curve = [
    {
      "run": spec.name,
      "variant": spec.variant,
      "stage": spec.stage,
      "seed": spec.seed,
      "seq_len": config.task.seq_len,
      "attention_impl": row["attention_impl"],
      "step": int(h["step"]),
      "validation_loss": float(h["loss"]),
      "train_seconds": float(np.interp(h["step"], curve_steps, curve_seconds)),
    }
    for h in history
  ]
  return row, curve


def _run_dir(workdir: str, spec: RunSpec) -> str:
  return os.path.join(workdir, "runs", spec.name)


def _finished(config, run_dir: str) -> bool:
  summary = files.read_json(os.path.join(run_dir, "train_summary.json"), default={})
  return summary.get("step") == config.train.num_steps


def train_runs(
  plan, specs, workdir: str, executor, trained_log: list | None = None
) -> list[tuple[dict, list[dict]]]:
  """Trains the runs of `specs` that have not reached their budget (in parallel when the
  executor has workers: `ea_jax.study.runner.Executor`), then reads every run back.

  Returns (results row, validation curve rows) per spec, in the order of `specs`; the names of
  the runs trained now are appended to `trained_log`. A run that failed raises, naming the run
  and its error (a rerun resumes it from its checkpoint).
  """
  configs = {spec: run_config(plan, spec) for spec in specs}
  jobs = [
    (_run_dir(workdir, spec), configs[spec].to_dict(), {"run_id": spec.name})
    for spec in dict.fromkeys(specs)
    if not _finished(configs[spec], _run_dir(workdir, spec))
  ]
  if trained_log is not None:
    trained_log.extend(j[2]["run_id"] for j in jobs)
  if jobs:
    logging.info(
      "training %d run(s) with %d worker(s): %s",
      len(jobs),
      executor.workers,
      ", ".join(j[2]["run_id"] for j in jobs),
    )
  failed = []
  for result in executor.map(jobs):
    if result["status"] != "ok":
      failed.append(f"{result['run_id']}: {result.get('error', result['status'])}")
    else:
      logging.info("run %s: done in %.0f s", result["run_id"], result["wall_seconds"])
  if failed:
    raise RuntimeError(
      f"{len(failed)} run(s) did not finish ({'; '.join(failed)}); rerun the same command to "
      "resume them"
    )
  return [collect(configs[spec], _run_dir(workdir, spec), spec) for spec in specs]


# ------------------------------------------------------------------------------------------------
# Selection, memory, samples
# ------------------------------------------------------------------------------------------------


def check_eval_splits(config) -> None:
  """Refuses to run unless the data source draws validation/test windows from those splits.

  The text task keeps its works apart only if the generator source passes the split to
  `task.sample`; an older source would evaluate on training text and the table would be wrong.
  """
  from ea_jax import data as data_lib  # pylint: disable=import-outside-toplevel
  from ea_jax import sharding as sharding_lib  # pylint: disable=import-outside-toplevel
  from ea_jax import tasks  # pylint: disable=import-outside-toplevel

  task = tasks.make_task(config.task)
  mesh = sharding_lib.create_mesh(config.mesh)
  rules = sharding_lib.logical_rules(dict(config.logical_axis_rules))
  rows = 4
  sharding = sharding_lib.batch_sharding(mesh, rules, rows)
  source = data_lib.make_source(config, splits=("validation", "test"))
  for split in ("validation", "test"):
    batch = source.eval_batches(split, config.eval.seed, rows, rows, sharding)[0]
    text = task.tokens(split)
    inputs = np.asarray(jax.device_get(batch.inputs)).astype(text.dtype)
    found = sum(row.tobytes() in text.tobytes() for row in inputs)
    if found < rows:
      raise RuntimeError(
        f"the data source's {split} batches are not windows of the {split} split ({found} of "
        f"{rows} found in its text): ea_jax/data.py must pass the split to task.sample "
        "(task.sample(rng, batch_size, split)) before this comparison can run"
      )


def tune(variants, lr_grid, max_extensions: int, train_many) -> tuple[dict, list[dict], list[dict]]:
  """Per variant, the lr with the lowest best validation loss on a grid that brackets it.

  `train_many([(variant, lr), ...])` -> one results row (with `best_validation_loss`) per pair,
  in order; it is called once per round with every run the round needs across variants, so
  the runs of a round can train in parallel. Starting from `lr_grid`, a best value on an edge
  grows that variant's grid by x3 past the edge (`ea_jax.lr_grid.bracket`, at most
  `max_extensions` times), so the choice is interior unless the limit was reached.
  Returns ({variant: lr}, the rows of every run, tuning table rows with `chosen` / `interior`).
  """
  start = sorted(lr_grid_lib.lr_key(x) for x in lr_grid)
  grids = {v: list(start) for v in variants}
  extensions = {v: 0 for v in variants}
  done = {v: {} for v in variants}
  selected, interior = {}, {}
  while len(selected) < len(variants):
    todo = [(v, lr) for v in variants if v not in selected for lr in grids[v] if lr not in done[v]]
    for (v, lr), row in zip(todo, train_many(todo) if todo else []):
      done[v][lr] = row
    for v in variants:
      if v in selected:
        continue
      best = min(grids[v], key=lambda lr, v=v: (done[v][lr]["best_validation_loss"], lr))
      grown, inside = lr_grid_lib.bracket(grids[v], best, extensions[v], max_extensions)
      if grown is None:
        selected[v], interior[v] = best, inside
      else:
        grids[v], extensions[v] = grown, extensions[v] + 1
  rows, table = [], []
  for v in variants:
    rows += [done[v][lr] for lr in grids[v]]
    table += [
      {
        "variant": v,
        "lr": lr,
        "seed": done[v][lr]["seed"],
        "best_validation_loss": done[v][lr]["best_validation_loss"],
        "chosen": lr == selected[v],
        "interior": interior[v] if lr == selected[v] else "",
        "extensions": extensions[v] if lr == selected[v] else "",
      }
      for lr in grids[v]
    ]
  return {v: selected[v] for v in variants}, rows, table


def step_memory_bytes(config, vocab_size: int) -> int:
  """XLA's planned temporary + argument + output bytes of one loss forward+backward pass."""
  cfg = model_lib.ModelConfig.from_config(
    config.model, vocab_size=vocab_size, max_len=config.task.seq_len
  )
  model = model_lib.Transformer(cfg)
  shape = (config.train.batch_size, config.task.seq_len)
  tokens = jax.ShapeDtypeStruct(shape, jnp.int32)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape, jnp.int32)))
  weights = jax.ShapeDtypeStruct(shape, jnp.float32)

  def loss(p, inputs, targets, w):
    return metrics_lib.mean_loss(model.apply(p, inputs), targets, w)

  compiled = jax.jit(jax.grad(loss)).lower(params, tokens, tokens, weights).compile()
  m = compiled.memory_analysis()
  return int(m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes)


def equal_time_losses(curves: list[dict]) -> dict:
  """Validation loss of every run at the training time the fastest run needed for its steps.

  Linear interpolation between a run's evals (in training seconds); NaN before its first eval.
  Returns {"budget_seconds": t, "losses": {run: loss}}.
  """
  by_run = {}
  for c in curves:
    by_run.setdefault(c["run"], []).append(c)
  budget = min(max(c["train_seconds"] for c in rows) for rows in by_run.values())
  out = {}
  for run, rows in by_run.items():
    rows = sorted(rows, key=lambda c: c["train_seconds"])
    seconds = [c["train_seconds"] for c in rows]
    losses = [c["validation_loss"] for c in rows]
    out[run] = (
      float(np.interp(budget, seconds, losses))
      if seconds[0] <= budget * (1 + 1e-9)
      else float("nan")
    )
  return {"budget_seconds": budget, "losses": out}


def samples(plan, selected_lr: dict, workdir: str) -> list[dict]:
  """Generated text and decoding speed of each variant's tuning-seed model."""
  from ea_jax import generate  # pylint: disable=import-outside-toplevel

  out = []
  for variant, lr in selected_lr.items():
    spec = RunSpec(variant, lr, plan.tune_seed, "tune")
    loaded = generate.load(os.path.join(workdir, "runs", spec.name))
    decodes = ["auto"] + (
      ["kv_cache"] if loaded.cfg.attention == "ea" and loaded.cfg.ea_kernel == "square" else []
    )
    for decode in decodes:
      g = generate.generate(
        loaded,
        plan.sample_prompt,
        plan.sample_tokens,
        rng=jax.random.key(0),
        decode=decode,
        temperature=0.8,
      )
      out.append(
        {
          "variant": variant,
          "run": spec.name,
          "decode": g.decode,
          "tokens_per_sec": g.tokens_per_sec,
          "text": g.text[0],
        }
      )
  return out


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


def _mean_std(values):
  values = [v for v in values if v == v]
  if not values:
    return float("nan"), float("nan")
  return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def plot_curves(curves: list[dict], selected_lr: dict, path: str) -> None:
  """Validation loss vs steps and vs training wall time, per variant at its selected lr."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for variant, lr in selected_lr.items():
    mine = [
      c
      for c in curves
      if c["variant"] == variant
      and c["stage"] in ("tune", "seed")
      and c["run"].startswith(f"{variant}_lr{lr:g}_")
    ]
    for i, seed in enumerate(sorted({c["seed"] for c in mine})):
      rows = sorted((c for c in mine if c["seed"] == seed), key=lambda c: c["step"])
      label = f"{variant} (lr {lr:g})" if i == 0 else None
      color = f"C{list(selected_lr).index(variant)}"
      for ax, x in zip(axes, ("step", "train_seconds")):
        ax.plot(
          [c[x] for c in rows],
          [c["validation_loss"] for c in rows],
          color=color,
          alpha=0.8,
          label=label,
          marker=".",
        )
  for ax, xlabel in zip(axes, ("training step", "training wall time (s)")):
    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation loss (nats/char)")
    ax.grid(alpha=0.3)
  axes[0].legend()
  fig.suptitle("Character-level Shakespeare: validation loss (every seed at the selected lr)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _git_commit() -> str:
  try:
    return subprocess.run(
      ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def summary_markdown(
  plan, results, tuning, long_rows, long_eq, sample_rows, command, invocation=None
) -> str:
  """The report; `invocation` (minutes, trained, runs, workers, commit) describes the command's
  run."""
  tried = sorted({r["lr"] for r in tuning})
  lines = [f"Command: `{command}`  "]
  if invocation:
    lines.append(
      f"This invocation: {invocation['minutes']:.1f} min wall with {invocation['workers']} "
      f"worker(s); it trained {invocation['trained']} of the {invocation['runs']} runs (the "
      "others were read from the workdir).  "
    )
  lines += [
    f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; code "
    f"commit {(invocation or {}).get('commit') or _git_commit()}; machine: {platform.processor() or platform.machine()}, "
    f"{os.cpu_count()} CPU cores, jax {jax.__version__} ({jax.default_backend()}).",
    "",
  ]
  b = plan.base
  lines += [
    f"Model: {b.model.num_layers} layers, {b.model.num_heads} heads, width "
    f"{b.model.embed_dim}, context {b.task.seq_len}, batch {b.train.batch_size}, "
    f"{b.train.num_steps} steps; {results[0]['num_params']:,} parameters."
    if results
    else "",
    "",
  ]
  lines += [
    "| variant | lr | seeds | test loss (nats/char) | test bits/char | validation loss "
    "| tokens/s |",
    "|---|---|---|---|---|---|---|",
  ]
  for variant in plan.variants:
    mine = [r for r in results if r["variant"] == variant and r["stage"] in ("tune", "seed")]
    if not mine:
      continue
    t, ts = _mean_std([r["test_loss"] for r in mine])
    v, vs = _mean_std([r["validation_loss"] for r in mine])
    tps, _ = _mean_std([r["tokens_per_sec"] for r in mine])
    lines.append(
      f"| {variant} | {mine[0]['lr']:g} | {len(mine)} | {t:.3f} ± {ts:.3f} | "
      f"{t / NATS_PER_BIT:.3f} ± {ts / NATS_PER_BIT:.3f} | {v:.3f} ± {vs:.3f} | "
      f"{tps:,.0f} |"
    )
  lines += [
    "",
    "Mean ± standard deviation over seeds; test loss at the checkpoint selected on "
    "validation (`selection` in results.csv).",
    "",
    "Learning-rate tuning (seed %d, best validation loss; initial grid %s, grown x3 past an "
    "edge choice at most %d times):"
    % (plan.tune_seed, ", ".join(f"{x:g}" for x in plan.lr_grid), plan.max_lr_extensions),
    "",
    "| variant | " + " | ".join(f"lr {lr:g}" for lr in tried) + " | chosen | interior |",
    "|---|" + "---|" * (len(tried) + 2),
  ]
  for variant in plan.variants:
    mine = {r["lr"]: r for r in tuning if r["variant"] == variant}
    if not mine:
      continue
    chosen = next(r for r in mine.values() if r["chosen"])
    cells = [f"{mine[lr]['best_validation_loss']:.3f}" if lr in mine else "" for lr in tried]
    lines.append(
      f"| {variant} | " + " | ".join(cells) + f" | {chosen['lr']:g} | {chosen['interior']} |"
    )
  if long_rows:
    lines += [
      "",
      "Long context (%d tokens per step, %d steps; equal time = the fastest run's "
      "training time at that context):" % (plan.long_tokens_per_step, plan.long_steps),
      "",
      "| context | run | batch | tokens/s | fwd+bwd memory (MiB) | train s | best "
      "validation loss | at equal time |",
      "|---|---|---|---|---|---|---|---|",
    ]
    for r in long_rows:
      eq = long_eq[r["seq_len"]]
      lines.append(
        f"| {r['seq_len']} | {r['variant']}:{r['attention_impl']} | "
        f"{r['batch_size']} | {r['tokens_per_sec']:,.0f} | "
        f"{r['memory_bytes'] / 2**20:,.1f} | {r['train_seconds']:.1f} | "
        f"{r['best_validation_loss']:.3f} | {eq['losses'][r['run']]:.3f} "
        f"({eq['budget_seconds']:.0f} s) |"
      )
  if sample_rows:
    lines += [
      "",
      "Decoding speed (batch 1, %d characters, temperature 0.8):" % plan.sample_tokens,
      "",
      "| variant | decoding state | tokens/s |",
      "|---|---|---|",
    ]
    lines += [
      f"| {s['variant']} | {s['decode']} | {s['tokens_per_sec']:,.0f} |" for s in sample_rows
    ]
  return "\n".join(lines) + "\n"


def samples_markdown(plan, sample_rows) -> str:
  out = [
    f"Prompt {plan.sample_prompt!r}, {plan.sample_tokens} characters, temperature 0.8, seed 0.",
    "",
  ]
  for s in sample_rows:
    out += [
      f"### {s['variant']} ({s['decode']}, {s['tokens_per_sec']:,.0f} tokens/s)",
      "",
      "```",
      s["text"],
      "```",
      "",
    ]
  return "\n".join(out)


def _write(path: str, write, payload) -> None:
  if os.path.exists(path):
    logging.info("replacing %s", path)
  write(path, payload)


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def run(plan, workdir: str, out: str, stages, command: str, workers: int = 0) -> None:
  workdir, out = os.path.abspath(workdir), os.path.abspath(out)
  os.makedirs(workdir, exist_ok=True)
  os.makedirs(out, exist_ok=True)
  unknown = sorted(set(stages) - set(STAGES))
  if unknown:
    raise ValueError(f"--stages: unknown {unknown}; allowed: {', '.join(STAGES)}")
  check_eval_splits(
    run_config(plan, RunSpec(plan.variants[0], plan.lr_grid[0], plan.tune_seed, "tune"))
  )
  from ea_jax.study import runner  # pylint: disable=import-outside-toplevel

  t_start, commit, trained_now, curves = time.time(), _git_commit(), [], []
  executor = runner.Executor(workers, os.path.join(workdir, "jax_cache"), log=logging.info)
  try:

    def train_tuning(pairs):
      specs = [RunSpec(variant, lr, plan.tune_seed, "tune") for variant, lr in pairs]
      trained = train_runs(plan, specs, workdir, executor, trained_now)
      curves.extend(c for _, curve in trained for c in curve)
      return [row for row, _ in trained]

    selected_lr, results, tuning = tune(
      plan.variants, plan.lr_grid, plan.max_lr_extensions, train_tuning
    )
    logging.info("selected learning rates: %s", selected_lr)
    results = [r for r in results if r["lr"] == selected_lr[r["variant"]]] + [
      r for r in results if r["lr"] != selected_lr[r["variant"]]
    ]
    # The long-context and seed runs need only the selection: one parallel batch (the long,
    # slower runs first, so that the shorter ones fill the workers at the end).
    seed_specs = [
      RunSpec(variant, lr, seed, "seed")
      for variant, lr in selected_lr.items()
      for seed in plan.seeds
      if seed != plan.tune_seed and "seeds" in stages
    ]
    specs_long = long_specs(plan, selected_lr) if "long" in stages else []
    trained = train_runs(plan, specs_long + seed_specs, workdir, executor, trained_now)
  finally:
    executor.close()
  for row, curve in trained[len(specs_long) :]:
    results.append(row)
    curves += curve
  vocab = int(
    files.read_json(
      os.path.join(
        _run_dir(
          workdir,
          RunSpec(plan.variants[0], selected_lr[plan.variants[0]], plan.tune_seed, "tune"),
        ),
        "train_config.json",
      )
    )["vocab_size"]
  )
  long_rows, long_eq = [], {}
  for spec, (row, curve) in zip(specs_long, trained[: len(specs_long)]):
    row["memory_bytes"] = step_memory_bytes(run_config(plan, spec), vocab)
    long_rows.append(row)
    curves += curve
  if "throughput" in stages:
    specs = [RunSpec(v, lr, plan.tune_seed, "tune") for v, lr in selected_lr.items()]
    specs += long_specs(plan, selected_lr) if "long" in stages else []
    logging.info("timing %d run shapes side by side", len(specs))
    timing = time_shapes(plan, specs, vocab, plan.timing_rounds, plan.timing_steps)
    apply_timing(results + long_rows, curves, timing)
    files.write_json(os.path.join(out, "timing.json"), timing)
  for context in sorted({r["seq_len"] for r in long_rows}):
    long_eq[context] = equal_time_losses(
      [c for c in curves if c["stage"] == "long" and c["seq_len"] == context]
    )
  sample_rows = samples(plan, selected_lr, workdir) if "samples" in stages else []
  # Only runs at the selected lr are in the main table; the rest stay in tuning.csv.
  main = [r for r in results if r["lr"] == selected_lr[r["variant"]]]
  files.write_csv(
    os.path.join(out, "results.csv"),
    main + long_rows,
    float_format="{:.6g}",
    columns=list(main[0]) + ["memory_bytes"],
  )
  files.write_csv(os.path.join(out, "tuning.csv"), tuning, float_format="{:.6g}")
  files.write_csv(os.path.join(out, "curves.csv"), curves, float_format="{:.6g}")
  if long_rows:
    files.write_json(os.path.join(out, "long_equal_time.json"), long_eq)
  if "report" in stages:
    plot_curves(curves, selected_lr, os.path.join(out, "lm_curves.png"))
    _write(
      os.path.join(out, "summary.md"),
      _write_text,
      summary_markdown(
        plan,
        main,
        tuning,
        long_rows,
        long_eq,
        sample_rows,
        command,
        invocation=dict(
          minutes=(time.time() - t_start) / 60,
          trained=len(trained_now),
          runs=len(results) + len(long_rows),
          workers=workers,
          commit=commit,  # the code when the command started
        ),
      ),
    )
    if sample_rows:
      _write(os.path.join(out, "samples.md"), _write_text, samples_markdown(plan, sample_rows))
  logging.info(
    "wrote results to %s (%.1f min; %d run(s) trained now)",
    out,
    (time.time() - t_start) / 60,
    len(trained_now),
  )


def _step_fn(config, vocab_size: int) -> tuple[Callable, Callable]:
  """(one compiled training step (AdamW, fwd+bwd) of the run shape, one eval forward batch),
  each a no-argument callable returning arrays to block on."""
  import optax  # pylint: disable=import-outside-toplevel

  cfg = model_lib.ModelConfig.from_config(
    config.model, vocab_size=vocab_size, max_len=config.task.seq_len
  )
  model = model_lib.Transformer(cfg)
  B, L = config.train.batch_size, config.task.seq_len
  tokens = jnp.zeros((B, L), jnp.int32)
  params = model.init(jax.random.key(0), tokens)
  tx = optax.adamw(1e-3)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, tokens):
    loss = lambda p: metrics_lib.mean_loss(
      model.apply(p, tokens), tokens, jnp.ones_like(tokens, jnp.float32)
    )
    grads = jax.grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  eval_tokens = jnp.zeros((config.eval.batch_size, L), jnp.int32)
  forward = jax.jit(lambda p, t: model.apply(p, t))
  train = lambda: step(params, opt_state, tokens)
  evaluate = lambda: forward(params, eval_tokens)
  jax.block_until_ready(train())  # compile outside every timing
  jax.block_until_ready(evaluate())
  return train, evaluate


def _timed(fn, n: int) -> tuple[float, float]:
  """Median (wall, CPU) seconds of one call of `fn` over `n` calls."""
  wall, cpu = [], []
  for _ in range(n):
    w0, c0 = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn())
    wall.append(time.perf_counter() - w0)
    cpu.append(time.process_time() - c0)
  return statistics.median(wall), statistics.median(cpu)


def _time_steps(config, vocab_size: int, num_steps: int) -> dict:
  """Median wall and CPU seconds of one training step (AdamW, fwd+bwd) and one eval batch."""
  train, evaluate = _step_fn(config, vocab_size)
  t = _timed(train, num_steps)
  e = _timed(evaluate, max(2, num_steps // 4))
  return {"train_wall": t[0], "train_cpu": t[1], "eval_wall": e[0], "eval_cpu": e[1]}


def shape_key(variant: str, seq_len: int, impl: str | None) -> str:
  """A run shape (what its step time depends on): variant, context (which fixes the batch in
  this plan) and attention implementation."""
  return f"{variant}:T{seq_len}:{impl or 'auto'}"


def time_shapes(plan, specs, vocab_size: int, rounds: int, steps: int) -> dict[str, dict]:
  """Seconds per training step of every distinct run shape among `specs`, measured side by side.

  Every shape is compiled first; then `rounds` rounds each time `steps` steps of every shape
  in turn, so slow drifts in the machine's load fall on all shapes alike. Returns {shape_key:
  {"step_seconds": median over rounds of the mean step time, "rounds": [...],
  "tokens_per_step": ...}}.
  """
  fns, tokens = {}, {}
  for spec in specs:
    key = shape_key(spec.variant, spec.seq_len or plan.base.task.seq_len, spec.impl)
    if key not in fns:
      c = run_config(plan, spec)
      fns[key] = _step_fn(c, vocab_size)[0]
      tokens[key] = c.train.batch_size * c.task.seq_len
  times = {key: [] for key in fns}
  for _ in range(rounds):
    for key, fn in fns.items():
      t0 = time.perf_counter()
      for _ in range(steps):
        out = fn()
      jax.block_until_ready(out)
      times[key].append((time.perf_counter() - t0) / steps)
  return {
    key: {
      "step_seconds": statistics.median(v),
      "rounds": v,
      "tokens_per_step": tokens[key],
    }
    for key, v in times.items()
  }


def apply_timing(rows: list[dict], curves: list[dict], timing: dict[str, dict]) -> None:
  """Rewrites throughput and training time of `rows` and `curves` (in place) from `timing`.

  The training loop's own throughput (kept as `logged_tokens_per_sec`) is measured while
  whatever else runs on the machine runs, which differs from run to run; the side-by-side step
  time does not. `tokens_per_sec` = tokens per step / step time; `train_seconds` = steps x step
  time (compilation, evaluation and checkpointing excluded).
  """
  step_s = {}
  for r in rows:
    key = shape_key(
      r["variant"], r["seq_len"], None if r["attention_impl"] == "auto" else r["attention_impl"]
    )
    t = timing[key]
    step_s[r["run"]] = t["step_seconds"]
    r["logged_tokens_per_sec"] = r["tokens_per_sec"]
    r["step_seconds"] = t["step_seconds"]
    r["tokens_per_sec"] = t["tokens_per_step"] / t["step_seconds"]
    r["train_seconds"] = r["steps"] * t["step_seconds"]
  for c in curves:
    if c["run"] in step_s:
      c["train_seconds"] = c["step"] * step_s[c["run"]]


def estimate(plan, num_steps: int) -> str:
  """Prints (row by row) and returns a table of measured step times and the plan's projected
  duration (training + evaluations)."""
  specs = [RunSpec(v, plan.lr_grid[0], plan.tune_seed, "tune") for v in plan.variants]
  runs_per_variant = len(plan.lr_grid) + len([s for s in plan.seeds if s != plan.tune_seed])
  specs += long_specs(plan, {v: plan.lr_grid[0] for v in plan.variants})
  from ea_jax import tasks  # pylint: disable=import-outside-toplevel

  vocab = tasks.make_task(plan.base.task).vocab_size
  lines = [
    "| run shape | runs | step wall s | step CPU s | projected wall min | CPU min |",
    "|---|---|---|---|---|---|",
  ]
  total_wall = total_cpu = 0.0
  for spec in specs:
    c = run_config(plan, spec)
    t = _time_steps(c, vocab, num_steps)
    n_runs = runs_per_variant if spec.stage == "tune" else 1
    evals = c.train.num_steps // c.train.eval_every + 1  # periodic + the test evaluation
    eval_batches = math.ceil(c.eval.num_examples / c.eval.batch_size)
    wall = n_runs * (c.train.num_steps * t["train_wall"] + evals * eval_batches * t["eval_wall"])
    cpu = n_runs * (c.train.num_steps * t["train_cpu"] + evals * eval_batches * t["eval_cpu"])
    total_wall, total_cpu = total_wall + wall, total_cpu + cpu
    shape = f"{spec.variant} T={c.task.seq_len} B={c.train.batch_size} " + (
      f"{spec.impl or 'auto'}" if spec.stage == "long" else ""
    )
    lines.append(
      f"| {shape} | {n_runs} | {t['train_wall']:.4f} | {t['train_cpu']:.4f} | "
      f"{wall / 60:.1f} | {cpu / 60:.1f} |"
    )
    print(lines[-1] if len(lines) > 3 else "\n".join(lines), flush=True)
  lines.append(
    f"| total (excluding compilation and start-up) | | | | {total_wall / 60:.1f} | "
    f"{total_cpu / 60:.1f} |"
  )
  print(lines[-1], flush=True)
  return "\n".join(lines)


def _write_text(path: str, content: str) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(content)
  os.replace(tmp, path)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS.workdir and not flags.FLAGS.estimate:
    raise app.UsageError("--workdir is required")
  if flags.FLAGS.estimate > 0:
    estimate(flags.FLAGS.config, flags.FLAGS.estimate)  # prints each row as it is measured
    return
  import sys  # pylint: disable=import-outside-toplevel

  runtime.keep_freed_memory()  # before the in-process stages allocate (timing, samples)
  command = "python -m ea_jax.lm_study " + " ".join(sys.argv[1:])
  run(
    flags.FLAGS.config,
    flags.FLAGS.workdir,
    flags.FLAGS.out or flags.FLAGS.workdir,
    flags.FLAGS.stages,
    command,
    workers=flags.FLAGS.workers,
  )


if __name__ == "__main__":
  app.run(main)
