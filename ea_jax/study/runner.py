"""Running the study: worker processes, resume, shards, collect.

Layout of the study directory:
  runs/<run id>/    each run's workdir (checkpoints, TensorBoard, train_summary.json) and
                    result.json (written last: a run with a result.json is finished and skipped
                    on restart; a run without one resumes from its checkpoint).
  results.csv       one row per study run and ladder level (results.RESULT_COLUMNS).
  tuning.csv        one row per tuning run, the chosen settings marked.
  shards/           per-shard results-/tuning- CSVs; --collect merges them.
  study_config.json, study_timing.json, summary.md and the figures (ea_jax.study.report).

Workers. Runs execute in spawned worker processes (JAX_PLATFORMS=cpu unless set, one compute
thread each, pinned to a core of its own, when workers >= cores; a shared persistent
compilation cache). A pool serves at most
`tasks_per_pool` runs and is then replaced by a fresh one, which bounds memory growth without
`max_tasks_per_child` (on Python 3.11 a pool using it deadlocks once retired workers are not
replaced). A watchdog checks the pool every few seconds: when a worker has died, or no worker is
alive while runs are pending, the pool is torn down; the runs it was holding are retried once on
a fresh pool and fail with a clear message after a second loss (a rerun resumes them from their
checkpoints). Workers die with the parent (Linux parent-death signal, plus a thread watching the
parent's pid), so `kill -9` of the study leaves no worker behind. SIGTERM to the study stops it:
running workers are sent SIGTERM (they checkpoint and return), nothing new starts, and a rerun
resumes.
"""

from __future__ import annotations

import concurrent.futures
import glob
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from typing import Callable, Iterable, Sequence

from ea_jax import files
from ea_jax.study import plan as plan_lib
from ea_jax.study import results as results_lib

RESULT_FILE = "result.json"
SHARD_DIR = "shards"
RUNS_DIR = "runs"
TIMING_FILE = results_lib.TIMING_FILE
CONFIG_FILE = "study_config.json"
LOG_FILE = "study_log.txt"
WATCHDOG_SECONDS = 2.0


# ------------------------------------------------------------------------------------------
# One run (executed in a worker process, or in this one with workers=0)
# ------------------------------------------------------------------------------------------


def read_result(run_dir: str) -> dict | None:
  return files.read_json(os.path.join(run_dir, RESULT_FILE))


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
    return {
      **info,
      "status": "error",
      "error": f"{type(e).__name__}: {e}",
      "traceback": traceback.format_exc(),
      "wall_seconds": time.time() - t0,
    }
  if summary.get("ended_by") == "sigterm" or summary.get("stopped") == "sigterm":
    if _IN_WORKER:  # SIGTERM sent to this worker: report, then leave the pool
      threading.Timer(1.0, os._exit, (0,)).start()
    return {
      **info,
      "status": "error",
      "error": "interrupted by SIGTERM",
      "traceback": "",
      "wall_seconds": time.time() - t0,
      "stopped": True,
    }
  result = {
    **info,
    "status": status,
    "summary": summary,
    "wall_seconds": time.time() - t0,
    "worker_pid": os.getpid(),
  }
  files.write_json(os.path.join(run_dir, RESULT_FILE), result, only_process_0=False)
  return result


_IN_WORKER = False


def _die_with_parent(parent_pid: int) -> None:
  """Ends this worker when its parent dies: PR_SET_PDEATHSIG where Linux offers it, and a
  thread that polls the parent's pid everywhere (covers the race before prctl took effect)."""
  try:
    import ctypes

    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
  except (OSError, AttributeError):
    pass

  def watch():
    while True:
      if os.getppid() != parent_pid:
        os._exit(1)
      time.sleep(0.5)

  threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def _pin_to_a_core(slots, cores: list[int]) -> None:
  """Binds this worker to the next free core of `cores` (`slots` counts the pool's workers).

  One compute thread per worker is fastest when each stays on its own core: two single-threaded
  training processes that the scheduler moves between 2 cores ran at ~3,900 tokens/s each,
  pinned at ~4,900 (the LM anchor; `make lm`).
  """
  with slots.get_lock():
    slot = slots.value
    slots.value += 1
  if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {cores[slot % len(cores)]})


def _init_worker(parent_pid: int, slots=None, cores=None) -> None:
  """A fresh worker's set-up. It does not import JAX: a job that needs it imports it and finds
  its settings (the compilation cache included) in the inherited environment."""
  global _IN_WORKER
  _IN_WORKER = True
  from ea_jax import runtime

  # Before any thread allocates; one arena for this single-threaded worker (see there).
  runtime.keep_freed_memory(one_arena=True)
  _die_with_parent(parent_pid)
  if slots is not None:
    _pin_to_a_core(slots, cores)
  from absl import logging

  logging.set_verbosity(logging.WARNING)  # a run's INFO lines would interleave across workers


def usable_cores() -> list[int]:
  """The cores this process may run on (its affinity mask where the OS has one)."""
  if hasattr(os, "sched_getaffinity"):
    return sorted(os.sched_getaffinity(0))
  return list(range(os.cpu_count() or 1))


def worker_environment(
  workers: int, cpu_count: int | None = None, cache_dir: str | None = None
) -> dict:
  """Environment variables for worker processes: CPU JAX unless a platform is set,
  single-threaded XLA/OpenMP when there are at least as many workers as cores, and JAX's
  persistent compilation cache in `cache_dir` (every program cached) when one is given."""
  cpu_count = cpu_count or len(usable_cores())
  threads = max(1, cpu_count // max(1, workers))
  env = {
    "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS") or "cpu",
    "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),
    "OMP_NUM_THREADS": str(threads),
  }
  # JAX reads each config option's default from the environment variable of its name.
  env.update({name.upper(): str(value) for name, value in _cache_settings(cache_dir).items()})
  flags = os.environ.get("XLA_FLAGS", "")
  if threads == 1 and "xla_cpu_multi_thread_eigen" not in flags:
    flags = (flags + " --xla_cpu_multi_thread_eigen=false").strip()
  if flags:
    env["XLA_FLAGS"] = flags
  return env


# ------------------------------------------------------------------------------------------
# The executor
# ------------------------------------------------------------------------------------------


def _run_tracked(target: Callable[[tuple], dict], track_dir: str, job: tuple) -> dict:
  """Runs `target(job)` in a worker, leaving `track_dir/<pid>` = the run id while it runs, so
  that the parent can tell which run a dead worker was holding."""
  path = os.path.join(track_dir, str(os.getpid()))
  with open(path, "w") as f:
    f.write(job[2]["run_id"])
  try:
    return target(job)
  finally:
    os.remove(path)


def _failure(job: tuple, message: str, *, stopped: bool = False) -> dict:
  return {
    **job[2],
    "status": "error",
    "error": message,
    "traceback": "",
    "wall_seconds": 0.0,
    "stopped": stopped,
  }


class Executor:
  """Runs jobs in this process (workers == 0) or in pools of spawned worker processes.

  `target` is the function each job runs (`execute`; tests pass others). See the module
  docstring for pool replacement, the watchdog, retries and signals.
  """

  def __init__(
    self,
    workers: int,
    cache_dir: str | None,
    *,
    tasks_per_pool: int = 40,
    target: Callable[[tuple], dict] = execute,
    retries: int = 1,
    watchdog_seconds: float = WATCHDOG_SECONDS,
    log=print,
  ):
    if workers < 0:
      raise ValueError(f"--workers={workers}: must be >= 0 (0 = run in this process)")
    if tasks_per_pool < 1:
      raise ValueError(f"tasks_per_pool={tasks_per_pool}: must be >= 1")
    self.workers, self.cache_dir, self.tasks_per_pool = workers, cache_dir, tasks_per_pool
    self.target, self.retries, self.watchdog_seconds, self.log = (
      target,
      retries,
      watchdog_seconds,
      log,
    )
    self.pool = None
    self.pool_processes = []
    self.stopping = False
    import tempfile

    self.track_dir = tempfile.mkdtemp(prefix="ea_jax_study_workers_")
    if workers == 0:
      _init_worker_in_process(cache_dir)

  # -- pools --------------------------------------------------------------------------------
  def _new_pool(self):
    env = worker_environment(self.workers, cache_dir=self.cache_dir)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # inherited by the workers, which start with the pool
    context = multiprocessing.get_context("spawn")
    cores = usable_cores()
    # One thread per worker on a CPU (workers >= cores): each worker gets a core of its own.
    pin = env["JAX_PLATFORMS"] == "cpu" and self.workers >= len(cores)
    try:
      pool = concurrent.futures.ProcessPoolExecutor(
        self.workers,
        mp_context=context,
        initializer=_init_worker,
        initargs=(os.getpid(),) + ((context.Value("i", 0), cores) if pin else ()),
      )
      for f in [pool.submit(os.getpid) for _ in range(self.workers)]:
        f.result()
      self.pool_processes = list(pool._processes.values())  # pylint: disable=protected-access
    finally:
      for k, v in saved.items():
        if v is None:
          os.environ.pop(k, None)
        else:
          os.environ[k] = v
    return pool

  def _processes(self):
    return list((getattr(self.pool, "_processes", None) or {}).values())

  def _close_pool(self):
    if self.pool is not None:
      self.pool.shutdown(wait=True)
      self.pool = None

  def _kill_pool(self):
    if self.pool is None:
      return
    for p in self._processes():
      if p.is_alive():
        p.kill()
    self.pool.shutdown(wait=False, cancel_futures=True)
    self.pool = None

  # -- running ------------------------------------------------------------------------------
  def map(self, jobs: Sequence[tuple]) -> Iterable[dict]:
    """Results in completion order; every job yields exactly one result."""
    if self.workers == 0:
      for j in jobs:
        if self.stopping:
          yield _failure(j, "not started: the study was stopped", stopped=True)
          continue
        yield self.target(j)
      return
    queue = [(j, 0) for j in jobs]  # (job, losses so far)
    while queue:
      batch, queue = queue[: self.tasks_per_pool], queue[self.tasks_per_pool :]
      if self.stopping:
        for j, _ in batch:
          yield _failure(j, "not started: the study was stopped", stopped=True)
        continue
      retry = []
      yield from self._run_batch(batch, retry)
      queue = retry + queue
      self._close_pool()  # a fresh pool (fresh worker memory) for the next batch

  def _run_batch(self, batch, retry: list) -> Iterable[dict]:
    import functools

    self.pool = self._new_pool()
    task = functools.partial(_run_tracked, self.target, self.track_dir)
    futures = {self.pool.submit(task, j): (j, losses) for j, losses in batch}
    pending = set(futures)
    while pending:
      done, pending = concurrent.futures.wait(
        pending, timeout=self.watchdog_seconds, return_when=concurrent.futures.FIRST_COMPLETED
      )
      lost = []
      for f in done:
        job, losses = futures[f]
        try:
          yield f.result()
        except concurrent.futures.process.BrokenProcessPool:
          lost.append((job, losses))
        except Exception as e:  # pylint: disable=broad-except
          yield _failure(job, f"worker failed: {e!r}")
      procs = self._processes()
      dead = [p for p in procs if not p.is_alive()]
      if pending and (dead or not procs) and not self.stopping:
        # A worker died (killed, out of memory) or the pool lost its workers: nothing pending
        # would ever finish. Tear the pool down and hand its unfinished runs back.
        lost += [futures[f] for f in pending]
        pending = set()
      if lost and pending:  # the pool is broken: everything it still holds is lost too
        lost += [futures[f] for f in pending]
        pending = set()
      culprits = self._culprits() if lost else set()
      if lost:
        self._kill_pool()
      if lost and not self.stopping:
        self.log(
          f"a worker process died (exit codes "
          f"{[p.exitcode for p in self.pool_processes]}) while running "
          f"{sorted(culprits) or 'an unknown run'}; a fresh pool takes over its "
          f"{len(lost)} unfinished run(s)"
        )
      for job, losses in lost:
        if self.stopping:
          yield _failure(job, "stopped before it finished", stopped=True)
        elif culprits and job[2]["run_id"] not in culprits:
          retry.append((job, losses))  # a bystander of another run's worker death: no charge
        elif losses < self.retries:
          retry.append((job, losses + 1))
        else:
          yield _failure(
            job,
            f"its worker process died {losses + 1} time(s) (killed or out of "
            "memory?); a rerun resumes it from its last checkpoint",
          )

  def _culprits(self) -> set[str]:
    """Run ids held by workers that died by themselves (not by the pool's own SIGTERM)."""
    out = set()
    for p in self.pool_processes:
      if p.exitcode not in (None, -signal.SIGTERM):
        path = os.path.join(self.track_dir, str(p.pid))
        if os.path.isfile(path):
          with open(path) as f:
            out.add(f.read().strip())
          os.remove(path)
    return out

  def stop(self):
    """SIGTERM to the running workers (they checkpoint and return); nothing new starts."""
    self.stopping = True
    for p in self._processes():
      if p.is_alive():
        os.kill(p.pid, signal.SIGTERM)

  def close(self):
    import shutil

    self._kill_pool()
    shutil.rmtree(self.track_dir, ignore_errors=True)


def _cache_settings(cache_dir: str | None) -> dict:
  """JAX config options for a persistent compilation cache in `cache_dir` that keeps every
  program ({} without a cache_dir)."""
  if not cache_dir:
    return {}
  return {
    "jax_compilation_cache_dir": cache_dir,
    "jax_persistent_cache_min_compile_time_secs": 0.0,
    "jax_persistent_cache_min_entry_size_bytes": 0,
  }


def _init_worker_in_process(cache_dir: str | None) -> None:
  import jax

  for name, value in _cache_settings(cache_dir).items():
    jax.config.update(name, value)


class _StopOnSigterm:
  """While active, SIGTERM to this process calls `executor.stop()` (main thread only)."""

  def __init__(self, executor: Executor, log):
    self.executor, self.log, self.previous = executor, log, None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self.previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.log("SIGTERM: stopping the running workers (they save a checkpoint); rerun to resume")
    self.executor.stop()

  def __exit__(self, *exc):
    if self.previous is not None:
      signal.signal(signal.SIGTERM, self.previous)


# ------------------------------------------------------------------------------------------
# Executing planned runs
# ------------------------------------------------------------------------------------------


def run_dir(workdir: str, run: plan_lib.Run) -> str:
  return os.path.join(workdir, RUNS_DIR, run.key)


def execute_runs(
  config, workdir: str, runs: Sequence[plan_lib.Run], executor: Executor, log=print, on_result=None
) -> tuple[dict, list[dict]]:
  """Runs those of `runs` that have no result yet; returns ({run id: result}, errors)."""
  results, todo = {}, []
  for run in runs:
    d = run_dir(workdir, run)
    done = read_result(d)
    if done is not None:
      results[run.key] = done
      continue
    os.makedirs(d, exist_ok=True)
    todo.append((d, plan_lib.run_config(config, run).to_dict(), run.describe()))
  if runs:
    log(f"{len(runs) - len(todo)} of {len(runs)} runs already finished; running {len(todo)}")
  # Seed by seed (a study cut short still has whole seeds), and within a seed the costliest
  # first (harder levels and wider models rarely stop early), so the pool drains evenly.
  todo.sort(key=lambda j: (j[2]["seed"], -j[2]["width"], -j[2]["complexity"]))
  errors, stopped, t0 = [], 0, time.time()
  for i, result in enumerate(executor.map(todo), 1):
    name = result["run_id"]
    if on_result is not None:
      on_result()
    if result.get("stopped"):
      stopped += 1
      continue
    if result["status"] == "error":
      errors.append(result)
      log(f"[{i}/{len(todo)}] {name}: ERROR {result['error']}")
      continue
    results[name] = result
    s = result["summary"]
    if result["status"] == "diverged":
      acc = "diverged"
    else:
      acc = (
        f"val seq {s.get('validation_sequence_accuracy', float('nan')):.3f} test seq "
        f"{s.get('test_sequence_accuracy', float('nan')):.3f} {s.get('ended_by', '?')} at "
        f"step {s.get('step')}"
      )
    log(
      f"[{i}/{len(todo)}] {name}: {acc} ({result['wall_seconds']:.0f}s, "
      f"{time.time() - t0:.0f}s elapsed)"
    )
  if stopped:
    log(
      f"stopped with {stopped} run(s) unfinished (each resumes from its checkpoint, if any, "
      "on a rerun)"
    )
  return results, errors


class InvocationLog:
  """Wall time of every invocation of the study on a workdir, in TIMING_FILE.

  Updated after each executed run, so an invocation that is killed keeps the time up to its
  last finished run; a resumed study adds an invocation.
  """

  def __init__(self, workdir: str, workers: int):
    self.path = os.path.join(workdir, TIMING_FILE)
    self.invocations = read_invocations(workdir)
    self.start = time.time()
    self.entry = {
      "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
      "seconds": 0.0,
      "runs_executed": 0,
      "workers": workers,
      "finished": False,
    }
    self.invocations.append(self.entry)
    self._write()

  def _write(self):
    files.write_json(self.path, {"invocations": self.invocations}, only_process_0=False)

  def run_done(self):
    self.entry["runs_executed"] += 1
    self.entry["seconds"] = time.time() - self.start
    self._write()

  def finish(self):
    self.entry["seconds"] = time.time() - self.start
    self.entry["finished"] = True
    self._write()


read_invocations = results_lib.read_invocations


def cache_dir(config, workdir: str) -> str | None:
  if config.compilation_cache == "none":
    return None
  return config.compilation_cache or os.path.join(workdir, "jax_cache")


def _check_workdir_config(config, workdir: str) -> None:
  """A study directory belongs to one study config: refuse another (naming the fields)."""
  import json

  path = os.path.join(workdir, CONFIG_FILE)
  current = json.loads(config.to_json())
  stored = files.read_json(path)
  if stored is None:
    files.write_json(path, current, only_process_0=False)
    return
  import flax

  a = flax.traverse_util.flatten_dict(stored, sep=".")
  b = flax.traverse_util.flatten_dict(current, sep=".")
  differ = sorted(k for k in set(a) | set(b) if k != "compilation_cache" and a.get(k) != b.get(k))
  if differ:
    raise ValueError(
      f"{workdir} holds a study with another config (fields differing: "
      f"{', '.join(differ[:8])}{' ...' if len(differ) > 8 else ''}); use a new "
      "--workdir, or rerun with the config it was started with"
    )


# ------------------------------------------------------------------------------------------
# The study
# ------------------------------------------------------------------------------------------


def _tuning_done(workdir: str, config) -> dict[tuple, dict]:
  """(variant, width, lr_key, pos) -> tuning row for every finished tuning run on disk."""
  out = {}
  for path in glob.glob(os.path.join(workdir, RUNS_DIR, "tune-*", RESULT_FILE)):
    result = files.read_json(path)
    if result["variant"] not in config.variants:
      continue
    row = results_lib.tuning_row(result)
    out[
      (
        row["variant"],
        int(row["width"]),
        results_lib.lr_key(float(row["learning_rate"])),
        row["pos_encoding"],
      )
    ] = row
  return out


def tune(
  config,
  workdir: str,
  executor: Executor,
  *,
  shard_index=0,
  num_shards=1,
  log=print,
  on_result=None,
) -> tuple[dict, list[dict], list[dict]]:
  """Runs the tuning procedure to its end (rounds until `tuning_plan` needs nothing).

  Returns (choices, tuning rows with the choices marked, errors). Sharded, each shard runs its
  share of each round; choices are complete only once every shard has finished (see `main`).
  """
  errors = []
  while True:
    done = _tuning_done(workdir, config)
    needed, choices = results_lib.tuning_plan(config, done)
    if not needed or executor.stopping:
      break
    runs = [plan_lib.tuning_run(config, v, w, lr, pos) for v, w, lr, pos in needed]
    mine = plan_lib.shard(runs, shard_index, num_shards)
    log(f"tuning round: {len(runs)} runs needed ({len(mine)} in this shard)")
    _, errs = execute_runs(config, workdir, mine, executor, log, on_result)
    errors += errs
    if errs or num_shards > 1:
      break  # errors: a rerun retries them; sharded: the other shards' runs are needed next
  rows = results_lib.mark_choices(
    sorted(
      done.values(),
      key=lambda r: (
        list(config.variants).index(r["variant"]),
        int(r["width"]),
        r["pos_encoding"],
        float(r["learning_rate"]),
      ),
    ),
    choices,
  )
  return choices, rows, errors


def study_runs_with_settings(config, choices: dict) -> list[plan_lib.Run]:
  runs = plan_lib.study_runs(config)
  if not plan_lib.needs_tuning(config):
    return runs
  missing = sorted({(r.variant, r.width) for r in runs} - set(choices))
  if missing:
    raise RuntimeError(
      f"the main stage needs the tuned settings of every (variant, width); "
      f"missing {missing[:4]}: run --stage=tune (on every shard) first"
    )
  return [
    r.with_settings(
      choices[(r.variant, r.width)]["learning_rate"], choices[(r.variant, r.width)]["pos_encoding"]
    )
    for r in runs
  ]


def run_study(
  config,
  workdir: str,
  *,
  workers: int = 2,
  stage: str = "all",
  shard_index: int = 0,
  num_shards: int = 1,
  log=print,
  target: Callable = execute,
  tasks_per_pool: int = 40,
) -> dict:
  """Runs this shard's share of `stage`; unsharded, also writes the CSVs and the report.

  Returns {"tuning": rows, "results": rows, "errors": [...], "choices": {...}}.
  """
  if stage not in plan_lib.STAGES:
    raise ValueError(f"--stage={stage!r}; allowed: {plan_lib.STAGES}")
  plan_lib.validate(config)
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  _check_workdir_config(config, workdir)
  log = _tee(
    log,
    os.path.join(
      workdir,
      LOG_FILE if num_shards == 1 else f"study_log-{shard_index:05d}-of-{num_shards:05d}.txt",
    ),
  )
  sharded = num_shards > 1
  if sharded and stage == "all" and plan_lib.needs_tuning(config):
    raise ValueError(
      "a sharded study with tuning runs in steps: --stage=tune on every shard "
      "until it reports no runs needed, then --stage=main on every shard, then "
      "--collect"
    )
  timing = InvocationLog(workdir, workers) if not sharded else None
  on_result = timing.run_done if timing else None
  executor = Executor(
    workers, cache_dir(config, workdir), target=target, tasks_per_pool=tasks_per_pool, log=log
  )
  errors, tuning_rows, rows, choices = [], [], [], {}
  try:
    with _StopOnSigterm(executor, log):
      if plan_lib.needs_tuning(config):
        if stage in ("all", "tune"):
          choices, tuning_rows, errs = tune(
            config,
            workdir,
            executor,
            shard_index=shard_index,
            num_shards=num_shards,
            log=log,
            on_result=on_result,
          )
          errors += errs
        else:
          choices, tuning_rows, _ = tune(config, workdir, _NoRuns(), log=lambda *_: None)
        if choices:
          log(
            "tuned settings: "
            + ", ".join(
              f"{v} w{w}: lr {c['learning_rate']:g} {c['pos_encoding']}"
              f"{'' if c['interior'] else ' (edge)'}"
              for (v, w), c in sorted(choices.items())
            )
          )
      if stage in ("all", "main") and not errors and not executor.stopping:
        runs = plan_lib.shard(study_runs_with_settings(config, choices), shard_index, num_shards)
        log(f"main stage: {len(runs)} runs")
        done, errs = execute_runs(config, workdir, runs, executor, log, on_result)
        errors += errs
        rows = results_lib.rows_of(done.values(), config.variants)
  finally:
    executor.close()

  if sharded:
    os.makedirs(os.path.join(workdir, SHARD_DIR), exist_ok=True)
    suffix = f"{shard_index:05d}-of-{num_shards:05d}.csv"
    if tuning_rows:
      results_lib.write_tuning(os.path.join(workdir, SHARD_DIR, "tuning-" + suffix), tuning_rows)
    if stage in ("all", "main"):
      results_lib.write_results(os.path.join(workdir, SHARD_DIR, "results-" + suffix), rows)
  else:
    if tuning_rows:
      results_lib.write_tuning(os.path.join(workdir, results_lib.TUNING_CSV), tuning_rows)
    if stage in ("all", "main") and not errors and not executor.stopping:
      results_lib.write_results(os.path.join(workdir, results_lib.RESULTS_CSV), rows)
      timing.finish()
      _report(config, workdir, log)
  for e in errors:
    log(f"ERROR in {e['run_id']}: {e['error']}" + (f"\n{e['traceback']}" if e["traceback"] else ""))
  if executor.stopping:
    log("stopped; rerun the same command to resume")
  return {
    "tuning": tuning_rows,
    "results": rows,
    "errors": errors,
    "choices": choices,
    "stopped": executor.stopping,
  }


def _tee(log, path: str):
  """`log`, also appending each line (time-stamped) to `path`."""

  def both(line: str) -> None:
    log(line)
    with open(path, "a") as f:
      f.write(f"{time.strftime('%H:%M:%S')} {line}\n")

  return both


class _NoRuns:
  """An executor stand-in for reading the tuning state without running anything."""

  stopping = True


def collect(config, workdir: str, log=print) -> dict:
  """Merges DIR/shards/*.csv into results.csv and tuning.csv, then writes the report."""
  workdir = os.path.abspath(workdir)
  choices, tuning_rows, _ = tune(config, workdir, _NoRuns(), log=lambda *_: None)
  results_lib.write_tuning(os.path.join(workdir, results_lib.TUNING_CSV), tuning_rows)
  paths = sorted(glob.glob(os.path.join(workdir, SHARD_DIR, "results-*.csv")))
  if not paths:
    raise FileNotFoundError(
      f"no {SHARD_DIR}/results-*.csv under {workdir}: run the shards "
      "(--stage=main --shard_index=I --num_shards=N) first"
    )
  merged = {}
  for p in paths:
    for row in results_lib.read_results(p):
      merged[(row["run_id"], row["task"], row["level"])] = row
  rows = sorted(merged.values(), key=results_lib.row_order(config.variants))
  results_lib.write_results(os.path.join(workdir, results_lib.RESULTS_CSV), rows)
  log(f"collected {len(rows)} result rows from {len(paths)} shard files")
  expected = sum(len(r.levels) for r in plan_lib.study_runs(config))
  if len(rows) != expected:
    log(
      f"WARNING: {len(rows)} result rows, the plan has {expected}: some shards are missing "
      "or unfinished"
    )
  _report(config, workdir, log)
  return {"tuning": tuning_rows, "results": rows, "choices": choices}


def _report(config, workdir: str, log) -> None:
  from ea_jax.study import report

  paths = report.write_report(config, workdir)
  log("wrote " + ", ".join(os.path.relpath(p, workdir) for p in paths))


if __name__ == "__main__":
  sys.exit("run the study with: python -m ea_jax.study --config=... --workdir=...")
