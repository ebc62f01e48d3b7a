"""Climb the complexity ladders: every (ladder level x width x attention variant x seed) is an
ordinary training run (`train_lib.train_and_evaluate`); this module only plans, runs and
collects them.

  python -m ea_jax.sweep --config=configs/sweep.py --workdir=DIR [--workers=2]
  python -m ea_jax.sweep ... --stage=tune --shard_index=I --num_shards=N   (array job, step 1)
  python -m ea_jax.sweep ... --stage=main --shard_index=I --num_shards=N   (array job, step 2)
  python -m ea_jax.sweep ... --collect                                     (merge the shards)

Stages. `tune` trains every (variant, width) at every learning rate of `lr_grid` on the tuning
level (`tune.ladder/level`, training seed `tune.seed`, validation examples from
`tune.eval_seed`); `main` trains every study run with the learning rate chosen for its
(variant, width). `all` (the default) does both. A one-point `lr_grid` needs no tuning.

Learning-rate rule: per (variant, width) the lr whose tuning run has the highest validation
sequence accuracy; ties broken by token accuracy, then fewer steps to 100%, then lower
validation loss, then the smaller lr.

Layout of DIR:
  runs/<run id>/         each run's workdir (checkpoints, TensorBoard, train_summary.json) and
                         result.json (written last: a run with a result.json is finished and
                         skipped on restart; a run without one resumes from its checkpoint).
  results.csv            one row per study run and ladder level (RESULT_COLUMNS).
  tuning.csv             one row per tuning run.
  shards/                per-shard results-/tuning- CSVs; --collect merges them.
  ladder.png frontier.png geometry.png summary.md   (ea_jax.report)

Worker processes are started with the spawn method, JAX_PLATFORMS=cpu (unless set), one
compute thread each when workers >= cores, and a shared persistent compilation cache, so runs
that differ only in seed reuse compiled programs.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import os
import re
import sys
import time
import traceback
from typing import Any, Iterable, Sequence

RESULT_FILE = "result.json"
RESULTS_CSV = "results.csv"
TUNING_CSV = "tuning.csv"
SHARD_DIR = "shards"
RUNS_DIR = "runs"
TIMING_FILE = "sweep_timing.json"
STAGES = ("all", "tune", "main")

# The DESIGN contract columns first, then what the sweep adds.
CONTRACT_COLUMNS = ("task", "level", "complexity", "attention", "seed", "token_accuracy",
                    "sequence_accuracy", "final_loss", "steps", "wall_seconds")
RESULT_COLUMNS = CONTRACT_COLUMNS + (
    "kernel", "variant", "width", "num_params", "learning_rate", "steps_to_100", "label",
    "eval_loss", "status", "run_id")

# Variant base names -> model fields. Modifiers: "+scale=X" (attention_scale), "+eps=X"
# (ea_eps), "+qknorm" (qk_norm=True), "+pos=NAME" (pos_encoding: rope, learned or none).
BASE_VARIANTS = {
    "dpa": {"attention": "dpa"},
    "ea-rational": {"attention": "ea", "ea_kernel": "rational"},
    "ea-square": {"attention": "ea", "ea_kernel": "square"},
}
MODIFIERS = {"scale": "attention_scale", "eps": "ea_eps", "qknorm": "qk_norm",
             "pos": "pos_encoding"}
POS_ENCODINGS = ("rope", "learned", "none")


# ------------------------------------------------------------------------------------------
# Variants and run specs
# ------------------------------------------------------------------------------------------


def parse_variant(spec: str) -> dict:
  """Model-field overrides of a variant name, e.g. "ea-square+scale=1+qknorm"."""
  parts = spec.split("+")
  if parts[0] not in BASE_VARIANTS:
    raise ValueError(f"variant {spec!r}: base name {parts[0]!r} unknown; allowed: "
                     f"{sorted(BASE_VARIANTS)} with modifiers +scale=X, +eps=X, +qknorm, "
                     f"+pos={'|'.join(POS_ENCODINGS)}")
  fields = dict(BASE_VARIANTS[parts[0]])
  for part in parts[1:]:
    name, _, value = part.partition("=")
    if name not in MODIFIERS:
      raise ValueError(f"variant {spec!r}: modifier {name!r} unknown; allowed: "
                       f"{sorted(MODIFIERS)}")
    if name == "qknorm":
      if value:
        raise ValueError(f"variant {spec!r}: +qknorm takes no value")
      fields["qk_norm"] = True
      continue
    if name == "pos":
      if value not in POS_ENCODINGS:
        raise ValueError(f"variant {spec!r}: +pos= must be one of {POS_ENCODINGS}, got {value!r}")
      fields["pos_encoding"] = value
      continue
    try:
      fields[MODIFIERS[name]] = float(value)
    except ValueError:
      raise ValueError(f"variant {spec!r}: +{name}= needs a number, got {value!r}") from None
  return fields


def kernel_name(variant: str) -> str:
  """The attention kernel of a variant: "softmax" (DPA), "rational" or "square" (EA)."""
  fields = parse_variant(variant)
  return "softmax" if fields["attention"] == "dpa" else fields["ea_kernel"]


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run. `levels` lists every (ladder, level index) that this task config is."""
  stage: str                 # "tune" or "main"
  task: tuple                # sorted (field, value) pairs of the task config
  label: str
  complexity: float
  levels: tuple              # ((ladder, level), ...)
  variant: str
  width: int
  seed: int
  learning_rate: float | None  # None: chosen by the tuning stage

  def key(self, lr: float | None = None) -> str:
    """Directory name: readable, and unique for (stage, task, variant, width, seed, lr)."""
    lr = self.learning_rate if lr is None else lr
    digest = hashlib.sha1(repr(self.task).encode()).hexdigest()[:6]
    label = re.sub(r"[^A-Za-z0-9]+", "", self.label.replace(" ", "_").replace("=", "")) or "task"
    variant = re.sub(r"[^A-Za-z0-9.-]+", "_", self.variant)
    return (f"{self.stage}-{label}-{digest}-{variant}-w{self.width}-lr{lr:g}-s{self.seed}")


def _task_items(task_cfg) -> tuple:
  d = task_cfg.to_dict() if hasattr(task_cfg, "to_dict") else dict(task_cfg)
  return tuple(sorted((k, v) for k, v in d.items() if k not in ("complexity", "label")))


def _levels_of(config) -> list[tuple[str, int, Any]]:
  """(ladder, level index, task config) for every requested level, in config order."""
  from ea_jax import tasks
  out = []
  for name in config.ladders:
    levels = tasks.ladder(name)
    wanted = config.levels.get(name) if name in config.levels else None
    indices = range(len(levels)) if wanted is None else wanted
    for i in indices:
      if not 0 <= i < len(levels):
        raise ValueError(f"config.levels.{name}: level {i} out of range; the ladder has "
                         f"{len(levels)} levels (0..{len(levels) - 1})")
      out.append((name, int(i), levels[i]))
  return out


def _validate(config) -> None:
  for field in ("variants", "widths", "seeds", "lr_grid", "ladders"):
    if len(config[field]) == 0:
      raise ValueError(f"config.{field} is empty: give at least one value")
  for v in config.variants:
    parse_variant(v)
  heads = config.base.model.num_heads
  for w in config.widths:
    if w % heads or (w // heads) % 2:
      raise ValueError(f"config.widths: width {w} must be a multiple of 2 * num_heads "
                       f"(= {2 * heads}) so that head_dim is even (rope)")
  for lr in config.lr_grid:
    if not lr > 0:
      raise ValueError(f"config.lr_grid: learning rate {lr} must be > 0")
  if len(set(config.variants)) != len(config.variants):
    raise ValueError(f"config.variants has duplicates: {config.variants}")


def plan(config) -> tuple[list[Run], list[Run]]:
  """(tuning runs, study runs). Study runs have learning_rate None when `lr_grid` has more
  than one value (it is filled in from the tuning stage)."""
  _validate(config)
  from ea_jax import tasks
  single_lr = config.lr_grid[0] if len(config.lr_grid) == 1 else None
  by_task: dict[tuple, list] = {}
  for ladder, level, cfg in _levels_of(config):
    entry = by_task.setdefault(_task_items(cfg), [cfg, []])
    entry[1].append((ladder, level))
  main = []
  for items, (cfg, levels) in by_task.items():
    for variant in config.variants:
      for width in config.widths:
        for seed in config.seeds:
          main.append(Run("main", items, cfg.label, float(cfg.complexity), tuple(levels),
                          variant, int(width), int(seed), single_lr))
  tune = []
  if single_lr is None:
    tl = tasks.ladder(config.tune.ladder)
    if not 0 <= config.tune.level < len(tl):
      raise ValueError(f"config.tune.level={config.tune.level} out of range for ladder "
                       f"{config.tune.ladder!r} ({len(tl)} levels)")
    cfg = tl[config.tune.level]
    for variant in config.variants:
      for width in config.widths:
        for lr in config.lr_grid:
          tune.append(Run("tune", _task_items(cfg), cfg.label, float(cfg.complexity),
                          ((config.tune.ladder, int(config.tune.level)),), variant, int(width),
                          int(config.tune.seed), float(lr)))
  return tune, main


def shard(runs: Sequence[Run], shard_index: int, num_shards: int) -> list[Run]:
  """Round-robin share of `runs` for shard `shard_index` of `num_shards`."""
  if num_shards < 1 or not 0 <= shard_index < num_shards:
    raise ValueError(f"--shard_index={shard_index} --num_shards={num_shards}: need "
                     "num_shards >= 1 and 0 <= shard_index < num_shards")
  return [r for i, r in enumerate(runs) if i % num_shards == shard_index]


def run_config(config, run: Run, lr: float):
  """The training config of one run: `config.base` with task, width, variant, seed and lr."""
  import ml_collections
  c = ml_collections.ConfigDict(config.base.to_dict())
  c.task = ml_collections.ConfigDict(dict(run.task))
  for name, value in parse_variant(run.variant).items():
    c.model[name] = value
  c.model.embed_dim = run.width
  c.model.mlp_dim = config.mlp_ratio * run.width
  c.train.seed = run.seed
  c.train.learning_rate = float(lr)
  if run.stage == "tune":
    c.eval.seed = int(config.tune.eval_seed)
  return c


# ------------------------------------------------------------------------------------------
# Executing runs (in this process or in spawned workers)
# ------------------------------------------------------------------------------------------


def read_result(run_dir: str) -> dict | None:
  path = os.path.join(run_dir, RESULT_FILE)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def _write_json(path: str, payload) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(payload, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def execute(job: tuple) -> dict:
  """Trains one run (job = (run dir, config dict, run description)); writes result.json.

  A diverged run (non-finite loss) is a finished run with status "diverged"; any other error
  is reported with status "error" and no result.json, so a restart tries it again.
  """
  run_dir, config_dict, info = job
  import ml_collections
  from ea_jax import train_lib
  config = ml_collections.ConfigDict(config_dict)
  t0 = time.time()
  try:
    summary = train_lib.train_and_evaluate(config, run_dir)
    status = "ok"
  except FloatingPointError as e:
    summary, status = {"error": str(e)}, "diverged"
  except Exception as e:  # pylint: disable=broad-except
    return {**info, "status": "error", "error": f"{type(e).__name__}: {e}",
            "traceback": traceback.format_exc(), "wall_seconds": time.time() - t0}
  if summary.get("stopped") == "sigterm":   # interrupted: resumes from its checkpoint later
    return {**info, "status": "error", "error": "interrupted by SIGTERM", "traceback": "",
            "wall_seconds": time.time() - t0}
  result = {**info, "status": status, "summary": summary, "wall_seconds": time.time() - t0}
  _write_json(os.path.join(run_dir, RESULT_FILE), result)
  return result


def _init_worker(cache_dir: str | None) -> None:
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  import jax
  if cache_dir:
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def worker_environment(workers: int, cpu_count: int | None = None) -> dict:
  """Environment variables for worker processes: CPU JAX unless a platform is set, and
  single-threaded XLA/OpenMP when there are at least as many workers as cores."""
  cpu_count = cpu_count or os.cpu_count() or 1
  threads = max(1, cpu_count // max(1, workers))
  env = {"JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS") or "cpu",
         "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),
         "OMP_NUM_THREADS": str(threads)}
  flags = os.environ.get("XLA_FLAGS", "")
  if threads == 1 and "xla_cpu_multi_thread_eigen" not in flags:
    flags = (flags + " --xla_cpu_multi_thread_eigen=false").strip()
  if flags:
    env["XLA_FLAGS"] = flags
  return env


class Executor:
  """Runs jobs in this process (workers == 0) or in spawned worker processes."""

  def __init__(self, workers: int, cache_dir: str | None):
    if workers < 0:
      raise ValueError(f"--workers={workers}: must be >= 0 (0 = run in this process)")
    self.workers, self.cache_dir, self.pool = workers, cache_dir, None
    if workers == 0:
      _init_worker(cache_dir)
      return
    import concurrent.futures
    import multiprocessing
    env = worker_environment(workers)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)   # inherited by the workers, which start with the executor
    try:
      self.pool = concurrent.futures.ProcessPoolExecutor(
          workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
          initargs=(cache_dir,), max_tasks_per_child=40)
      for f in [self.pool.submit(os.getpid) for _ in range(workers)]:
        f.result()
    finally:
      for k, v in saved.items():
        if v is None:
          os.environ.pop(k, None)
        else:
          os.environ[k] = v

  def map(self, jobs: list) -> Iterable[dict]:
    """Results in completion order. A worker that dies (e.g. killed for memory) fails its job
    and the remaining ones with status "error" instead of hanging."""
    if self.pool is None:
      yield from (execute(j) for j in jobs)
      return
    import concurrent.futures
    futures = {self.pool.submit(execute, j): j for j in jobs}
    for f in concurrent.futures.as_completed(futures):
      try:
        yield f.result()
      except Exception as e:  # pylint: disable=broad-except
        yield {**futures[f][2], "status": "error", "error": f"worker failed: {e!r}",
               "traceback": "", "wall_seconds": 0.0}

  def close(self):
    if self.pool is not None:
      self.pool.shutdown(wait=True)

  def terminate(self):
    if self.pool is not None:
      # SIGKILL: a worker inside train_and_evaluate treats SIGTERM as "checkpoint and go on".
      for process in list((getattr(self.pool, "_processes", None) or {}).values()):
        process.kill()
      self.pool.shutdown(wait=False, cancel_futures=True)


def _describe(run: Run, lr: float) -> dict:
  return {"stage": run.stage, "task": dict(run.task), "label": run.label,
          "complexity": run.complexity, "levels": [list(x) for x in run.levels],
          "variant": run.variant, "width": run.width, "seed": run.seed, "learning_rate": lr,
          "run_id": run.key(lr)}


def execute_runs(config, workdir: str, runs: Sequence[tuple[Run, float]], executor: Executor,
                 log=print, on_result=None) -> tuple[dict, list[dict]]:
  """Runs the (run, lr) pairs that have no result yet; returns ({run id: result}, errors).
  `on_result()` is called after each run that this call executed."""
  results, todo = {}, []
  for run, lr in runs:
    run_dir = os.path.join(workdir, RUNS_DIR, run.key(lr))
    done = read_result(run_dir)
    if done is not None:
      results[run.key(lr)] = done
      continue
    os.makedirs(run_dir, exist_ok=True)
    todo.append((run_dir, run_config(config, run, lr).to_dict(), _describe(run, lr)))
  if len(runs):
    log(f"{len(runs) - len(todo)} of {len(runs)} runs already finished; running {len(todo)}")
  # Seed by seed (a sweep cut short still has whole seeds), and within a seed longest first:
  # harder levels and wider models rarely stop early.
  todo.sort(key=lambda j: (j[2]["seed"], -j[2]["complexity"], -j[2]["width"]))
  errors = []
  t0 = time.time()
  for i, result in enumerate(executor.map(todo), 1):
    name = result["run_id"]
    if on_result is not None:
      on_result()
    if result["status"] == "error":
      errors.append(result)
      log(f"[{i}/{len(todo)}] {name}: ERROR {result['error']}")
      continue
    results[name] = result
    s = result["summary"]
    acc = ("diverged" if result["status"] == "diverged" else
           f"tok {s['token_accuracy']:.3f} seq {s['sequence_accuracy']:.3f} step {s['step']}")
    log(f"[{i}/{len(todo)}] {name}: {acc} ({result['wall_seconds']:.0f}s, "
        f"{time.time() - t0:.0f}s elapsed)")
  return results, errors


# ------------------------------------------------------------------------------------------
# Learning-rate choice and result rows
# ------------------------------------------------------------------------------------------


def _num(x, default=math.nan) -> float:
  return default if x is None or x == "" else float(x)


def tuning_rank(row: dict) -> tuple:
  """Sort key (smaller = better) of a tuning row: see the module docstring."""
  steps = _num(row["steps_to_100"], math.inf)
  return (-_num(row["sequence_accuracy"], 0.0), -_num(row["token_accuracy"], 0.0), steps,
          _num(row["eval_loss"], math.inf), float(row["learning_rate"]))


def choose_learning_rates(tuning_rows: Sequence[dict]) -> dict[tuple[str, int], float]:
  """{(variant, width): best learning rate} from tuning rows (see `tuning_rank`)."""
  best: dict[tuple[str, int], dict] = {}
  for row in tuning_rows:
    k = (row["variant"], int(row["width"]))
    if k not in best or tuning_rank(row) < tuning_rank(best[k]):
      best[k] = row
  return {k: float(r["learning_rate"]) for k, r in best.items()}


def _fmt(x) -> str:
  if x is None:
    return ""
  if isinstance(x, bool):
    return str(x)
  if isinstance(x, float):
    return "" if math.isnan(x) else repr(x)
  return str(x)


def result_rows(result: dict) -> list[dict]:
  """CSV rows (strings) of one finished run: one per (ladder, level) that its task is."""
  s = result.get("summary") or {}
  ok = result["status"] == "ok"
  fields = parse_variant(result["variant"])
  common = {
      "complexity": float(result["complexity"]), "attention": fields["attention"],
      "seed": int(result["seed"]),
      "token_accuracy": s.get("token_accuracy") if ok else None,
      "sequence_accuracy": s.get("sequence_accuracy") if ok else None,
      "final_loss": s.get("loss") if ok else None,
      "steps": s.get("step") if ok else None,
      "wall_seconds": round(float(result["wall_seconds"]), 1),
      "kernel": kernel_name(result["variant"]), "variant": result["variant"],
      "width": int(result["width"]), "num_params": s.get("num_params") if ok else None,
      "learning_rate": float(result["learning_rate"]),
      "steps_to_100": s.get("first_step_100") if ok else None,
      "label": result["label"], "eval_loss": s.get("eval_loss") if ok else None,
      "status": result["status"], "run_id": result["run_id"],
  }
  rows = []
  for ladder, level in result["levels"]:
    row = {**common, "task": ladder, "level": int(level)}
    rows.append({c: _fmt(row[c]) for c in RESULT_COLUMNS})
  return rows


def row_order(variants: Sequence[str]):
  """Sort key of CSV rows: task, level, variant (config order), width, seed, learning rate."""
  rank = {v: i for i, v in enumerate(variants)}
  return lambda r: (r["task"], int(r["level"]), rank.get(r["variant"], len(rank)), r["variant"],
                    int(r["width"]), int(r["seed"]), float(r["learning_rate"]))


def write_csv(path: str, rows: Sequence[dict]) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=RESULT_COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
  os.replace(tmp, path)


def read_csv(path: str) -> list[dict]:
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    if tuple(reader.fieldnames or ()) != RESULT_COLUMNS:
      raise ValueError(f"{path}: columns {reader.fieldnames} are not the sweep's "
                       f"{list(RESULT_COLUMNS)}")
    return list(reader)


def _rows(results: Iterable[dict], variants) -> list[dict]:
  rows = [row for r in results for row in result_rows(r)]
  return sorted(rows, key=row_order(variants))


# ------------------------------------------------------------------------------------------
# The sweep
# ------------------------------------------------------------------------------------------


class InvocationLog:
  """Wall time of every invocation of the sweep on a workdir, in TIMING_FILE.

  Updated after each executed run, so an invocation that is killed keeps the time up to its
  last finished run; a resumed sweep adds an invocation. `total_seconds` sums them.
  """

  def __init__(self, workdir: str, workers: int):
    self.path = os.path.join(workdir, TIMING_FILE)
    self.invocations = read_invocations(workdir)
    self.start = time.time()
    self.entry = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "seconds": 0.0,
                  "runs_executed": 0, "workers": workers, "finished": False}
    self.invocations.append(self.entry)
    self._write()

  def _write(self):
    _write_json(self.path, {"invocations": self.invocations})

  def run_done(self):
    self.entry["runs_executed"] += 1
    self.entry["seconds"] = time.time() - self.start
    self._write()

  def finish(self):
    self.entry["seconds"] = time.time() - self.start
    self.entry["finished"] = True
    self._write()


def read_invocations(workdir: str) -> list[dict]:
  path = os.path.join(workdir, TIMING_FILE)
  if not os.path.isfile(path):
    return []
  with open(path) as f:
    return list(json.load(f).get("invocations", []))



def cache_dir(config, workdir: str) -> str | None:
  if config.compilation_cache == "none":
    return None
  return config.compilation_cache or os.path.join(workdir, "jax_cache")


def run_sweep(config, workdir: str, *, workers: int = 2, stage: str = "all",
              shard_index: int = 0, num_shards: int = 1, log=print) -> dict:
  """Runs this shard's share of `stage`; unsharded, also writes the CSVs and the report.

  Returns {"tuning": rows, "results": rows, "errors": [...], "learning_rates": {...}}.
  """
  if stage not in STAGES:
    raise ValueError(f"--stage={stage!r}; allowed: {STAGES}")
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  tune, main = plan(config)
  sharded = num_shards > 1
  if sharded and stage == "all" and tune:
    raise ValueError("a sharded sweep with a learning-rate grid runs in two steps: "
                     "--stage=tune on every shard, then --stage=main on every shard "
                     "(then --collect)")
  _write_json(os.path.join(workdir, "sweep_config.json"), json.loads(config.to_json()))
  timing = InvocationLog(workdir, workers) if not sharded else None
  on_result = timing.run_done if timing else None
  executor = Executor(workers, cache_dir(config, workdir))
  errors, tuning_rows, result_rows_ = [], [], []
  lrs = {}
  try:
    if stage in ("all", "tune") and tune:
      mine = shard(tune, shard_index, num_shards)
      log(f"tuning stage: {len(mine)} runs (lr grid {tuple(config.lr_grid)})")
      done, errs = execute_runs(config, workdir, [(r, r.learning_rate) for r in mine],
                                executor, log, on_result)
      errors += errs
      tuning_rows = _rows(done.values(), config.variants)
    if stage in ("all", "main"):
      if tune:
        all_tune, missing = [], []
        for r in tune:
          res = read_result(os.path.join(workdir, RUNS_DIR, r.key()))
          (all_tune.append(res) if res is not None else missing.append(r.key()))
        if missing:
          raise RuntimeError(f"the main stage needs every tuning run; missing {len(missing)}: "
                             f"{missing[:5]}... Run --stage=tune (on every shard) first.")
        tuning_rows = _rows(all_tune, config.variants) if not sharded else tuning_rows
        lrs = choose_learning_rates(_rows(all_tune, config.variants))
      mine = shard(main, shard_index, num_shards)
      pairs = [(r, r.learning_rate if r.learning_rate is not None else
                lrs[(r.variant, r.width)]) for r in mine]
      log(f"main stage: {len(pairs)} runs; learning rates "
          f"{ {f'{v} w{w}': lr for (v, w), lr in sorted(lrs.items())} or config.lr_grid[0]}")
      done, errs = execute_runs(config, workdir, pairs, executor, log, on_result)
      errors += errs
      result_rows_ = _rows(done.values(), config.variants)
    executor.close()
  except BaseException:
    executor.terminate()
    raise

  if sharded:
    os.makedirs(os.path.join(workdir, SHARD_DIR), exist_ok=True)
    suffix = f"{shard_index:05d}-of-{num_shards:05d}.csv"
    if stage in ("all", "tune") and tune:
      write_csv(os.path.join(workdir, SHARD_DIR, "tuning-" + suffix), tuning_rows)
    if stage in ("all", "main"):
      write_csv(os.path.join(workdir, SHARD_DIR, "results-" + suffix), result_rows_)
  else:
    write_csv(os.path.join(workdir, TUNING_CSV), tuning_rows)
    if stage in ("all", "main"):
      write_csv(os.path.join(workdir, RESULTS_CSV), result_rows_)
      timing.finish()
      _report(config, workdir, log)
  for e in errors:
    log(f"ERROR in {e['run_id']}: {e['error']}\n{e['traceback']}")
  return {"tuning": tuning_rows, "results": result_rows_, "errors": errors,
          "learning_rates": lrs}


def collect(config, workdir: str, log=print) -> dict:
  """Merges DIR/shards/*.csv into results.csv and tuning.csv, then writes the report."""
  import glob
  workdir = os.path.abspath(workdir)
  merged = {}
  for kind, out in (("results", RESULTS_CSV), ("tuning", TUNING_CSV)):
    paths = sorted(glob.glob(os.path.join(workdir, SHARD_DIR, f"{kind}-*.csv")))
    rows = {}
    for p in paths:
      for row in read_csv(p):
        rows[(row["run_id"], row["task"], row["level"])] = row
    merged[kind] = sorted(rows.values(), key=row_order(config.variants))
    if kind == "results" and not paths:
      raise FileNotFoundError(f"no {SHARD_DIR}/results-*.csv under {workdir}: run the shards "
                              "(--stage=main --shard_index=I --num_shards=N) first")
    write_csv(os.path.join(workdir, out), merged[kind])
    log(f"collected {len(merged[kind])} {kind} rows from {len(paths)} shard files")
  tune, main = plan(config)
  expected = sum(len(r.levels) for r in main)
  if len(merged["results"]) != expected:
    log(f"WARNING: {len(merged['results'])} result rows, the plan has {expected}: some shards "
        "are missing or unfinished")
  _report(config, workdir, log)
  return {"tuning": merged["tuning"], "results": merged["results"]}


def _report(config, workdir: str, log) -> None:
  from ea_jax import report
  paths = report.write_report(config, workdir)
  log("wrote " + ", ".join(os.path.relpath(p, workdir) for p in paths))


def main(argv=None) -> int:
  from absl import app, flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "Sweep config (configs/sweep.py[:preset]).",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Sweep directory (runs/, results.csv, plots).")
  flags.DEFINE_integer("workers", 2, "Worker processes (0 = run in this process).")
  flags.DEFINE_enum("stage", "all", list(STAGES), "tune, main, or all (both).")
  flags.DEFINE_integer("shard_index", 0, "This shard's index.")
  flags.DEFINE_integer("num_shards", 1, "Number of shards (array-job size).")
  flags.DEFINE_bool("collect", False, "Merge shards/*.csv into results.csv and the report.")
  flags.mark_flags_as_required(["config", "workdir"])
  FLAGS = flags.FLAGS

  def _main(args):
    if len(args) > 1:
      raise app.UsageError(f"unexpected arguments: {args[1:]}")
    if FLAGS.collect:
      collect(FLAGS.config, FLAGS.workdir)
      return 0
    out = run_sweep(FLAGS.config, FLAGS.workdir, workers=FLAGS.workers, stage=FLAGS.stage,
                    shard_index=FLAGS.shard_index, num_shards=FLAGS.num_shards)
    return 1 if out["errors"] else 0

  app.run(_main, argv=argv)
  return 0


if __name__ == "__main__":
  sys.exit(main())
