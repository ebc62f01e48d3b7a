"""The study (ea_jax.study, configs/sweep.py): planning, tuning with a bracketed lr grid,
paired statistics, the report, the executor's robustness, and a smoke study end to end."""

import itertools
import math
import os
import subprocess
import sys
import textwrap
import time

import pytest

from ea_jax.study import plan, report, results, runner, stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import study_jobs  # noqa: E402  (job functions importable by spawned workers)


def study_config(preset=""):
  from configs import sweep

  return sweep.get_config(preset)


# ------------------------------------------------------------------------------------------
# Planning
# ------------------------------------------------------------------------------------------


def test_variants_parse_to_model_fields():
  assert plan.parse_variant("dpa") == {"attention": "dpa"}
  assert plan.parse_variant("ea-square+scale=1+qknorm+pos=learned") == {
    "attention": "ea",
    "ea_kernel": "square",
    "attention_scale": 1.0,
    "qk_norm": True,
    "pos_encoding": "learned",
  }
  assert plan.kernel_name("ea-rational+eps=1e-3") == "rational"
  for bad, msg in (
    ("softmax", "base name"),
    ("dpa+foo", "modifier"),
    ("dpa+pos=alibi", "pos"),
    ("dpa+scale=x", "number"),
    ("dpa+qknorm=1", "no value"),
  ):
    with pytest.raises(ValueError, match=msg):
      plan.parse_variant(bad)


def test_cpu_study_counts_each_task_once_and_shards_partition_it():
  config = study_config()
  runs = plan.study_runs(config)
  tasks = {r.task for r in runs}
  # recurrence levels 1-2 and recurrence_rules 0-2 share N=5 R=1 and N=5 R=2.
  assert sorted(r.label for r in runs if r.variant == "dpa" and r.width == 4 and r.seed == 0) == [
    "N=5 R=1",
    "N=5 R=2",
    "N=5 R=3",
  ]
  assert len(runs) == len(tasks) * 3 * 3 * 3
  shared = [r for r in runs if len(r.levels) == 2]
  assert {r.label for r in shared} == {"N=5 R=1", "N=5 R=2"}
  assert all(r.learning_rate is None for r in runs)  # tuned
  parts = [plan.shard(runs, i, 4) for i in range(4)]
  assert sorted(itertools.chain(*parts), key=runs.index) == runs
  with pytest.raises(ValueError, match="num_shards"):
    plan.shard(runs, 4, 4)


def test_tuning_task_is_never_a_reported_one_and_bad_fields_are_named():
  config = study_config()
  tune_task = plan.tuning_task(config)
  assert tune_task.rule_seed == 1 and tune_task.label == "N=5 R=2"
  assert plan.task_items(tune_task) not in {r.task for r in plan.study_runs(config)}
  cases = (
    ("tune.rule_seed", 0, "rule seed of a reported level|also a reported level"),
    ("tune.seed", 0, "also a study seed"),
    ("tune.pos_width", 48, "pos_width"),
    ("tune.lr_grid", (1e-2, 3e-3), "increasing"),
    ("tune.pos_encodings", ("alibi",), "pos_encodings"),
    ("widths", (10,), "multiple of 2 \\* num_heads"),
    ("variants", ("dpa", "dpa"), "duplicates"),
  )
  for field, value, msg in cases:
    c = study_config()
    with c.unlocked():
      parent, _, name = field.rpartition(".")
      (c[parent] if parent else c)[name] = value
    with pytest.raises(ValueError, match=msg):
      plan.study_runs(c)


def test_presets_build():
  for preset in ("", "smoke", "paper", "ablation"):
    c = study_config(preset)
    assert plan.study_runs(c)
  with pytest.raises(ValueError, match="unknown preset"):
    study_config("nope")


# ------------------------------------------------------------------------------------------
# Tuning: bracketing the learning rate
# ------------------------------------------------------------------------------------------


def _tune_config(
  grid=(1e-3, 3e-3, 1e-2), pos=("rope", "learned"), widths=(16, 32), max_extensions=3
):
  c = study_config()
  with c.unlocked():
    c.variants = ("dpa",)
    c.widths = widths
    c.tune.lr_grid = grid
    c.tune.pos_encodings = pos
    c.tune.pos_width = widths[-1]
    c.tune.max_extensions = max_extensions
  return c


def _row(lr, pos, loss, status="ok"):
  return {
    "learning_rate": repr(lr),
    "pos_encoding": pos,
    "validation_loss": repr(loss),
    "status": status,
  }


def _fill(config, loss_fn, rounds=10):
  """Runs the tuning procedure against a synthetic validation loss loss_fn(width, lr, pos)."""
  done = {}
  for _ in range(rounds):
    needed, choices = results.tuning_plan(config, done)
    if not needed:
      return choices, done
    for v, w, lr, pos in needed:
      done[(v, w, lr, pos)] = _row(lr, pos, loss_fn(w, lr, pos))
  raise AssertionError("tuning did not finish")


def test_interior_optimum_needs_no_extension():
  config = _tune_config()
  # Minimum at 3e-3 for both widths; learned positions better.
  choices, done = _fill(config, lambda w, lr, pos: abs(math.log(lr / 3e-3)) + (pos == "rope"))
  for w in (16, 32):
    c = choices[("dpa", w)]
    assert (c["learning_rate"], c["pos_encoding"], c["interior"], c["extensions"]) == (
      3e-3,
      "learned",
      True,
      0,
    )
  # Position encodings are tried at pos_width only: 2 x 3 there, 3 at the other width.
  assert len(done) == 6 + 3


def test_edge_choice_extends_the_grid_until_bracketed():
  config = _tune_config(grid=(1e-3, 3e-3, 1e-2), pos=("rope",), widths=(32,))
  # The true optimum is 9e-2: two extensions upwards (3e-2, 9e-2) and a third (0.27) bracket it.
  choices, done = _fill(config, lambda w, lr, pos: abs(math.log(lr / 9e-2)))
  c = choices[("dpa", 32)]
  assert c["learning_rate"] == pytest.approx(9e-2) and c["interior"]
  assert c["grid"] == pytest.approx((1e-3, 3e-3, 1e-2, 3e-2, 9e-2, 0.27))
  assert c["extensions"] == 3
  # Downwards: the optimum one step below the grid needs a second step to be bracketed.
  choices, _ = _fill(config, lambda w, lr, pos: abs(math.log(lr / (1e-3 / 3))))
  c = choices[("dpa", 32)]
  assert c["learning_rate"] == pytest.approx(1e-3 / 3, rel=1e-5) and c["interior"]
  assert c["grid"][:2] == pytest.approx((1e-3 / 9, 1e-3 / 3), rel=1e-5)
  assert c["extensions"] == 2


def test_extensions_stop_at_the_limit_and_the_choice_is_marked_edge():
  config = _tune_config(grid=(1e-3, 3e-3, 1e-2), pos=("rope",), widths=(32,), max_extensions=2)
  choices, done = _fill(config, lambda w, lr, pos: -lr)  # ever better upwards
  c = choices[("dpa", 32)]
  assert c["learning_rate"] == pytest.approx(9e-2) and not c["interior"]
  assert c["extensions"] == 2 and len(done) == 5
  marked = results.mark_choices(
    [
      results.tuning_row(
        {
          "variant": "dpa",
          "width": 32,
          "pos_encoding": "rope",
          "learning_rate": lr,
          "wall_seconds": 1.0,
          "status": "ok",
          "run_id": f"r{lr}",
          "summary": {"validation_loss": -lr},
        }
      )
      for (_, _, lr, _) in done
    ],
    choices,
  )
  assert [(r["chosen"], r["interior"]) for r in marked if r["chosen"] == "True"] == [
    ("True", "False")
  ]


def test_diverged_tuning_runs_lose():
  config = _tune_config(grid=(1e-3, 3e-3, 1e-2), pos=("rope",), widths=(32,), max_extensions=0)
  done = {
    ("dpa", 32, 1e-3, "rope"): _row(1e-3, "rope", 0.5),
    ("dpa", 32, 3e-3, "rope"): _row(3e-3, "rope", 0.4),
    ("dpa", 32, 1e-2, "rope"): _row(1e-2, "rope", float("nan"), status="diverged"),
  }
  _, choices = results.tuning_plan(config, done)
  assert choices[("dpa", 32)]["learning_rate"] == 3e-3 and choices[("dpa", 32)]["interior"]


# ------------------------------------------------------------------------------------------
# Statistics
# ------------------------------------------------------------------------------------------


def _binomial_quantile(n, p, q):
  """Smallest k with P(Bin(n, p) <= k) >= q (written independently of ea_jax.study.stats)."""
  acc = 0.0
  for k in range(n + 1):
    acc += math.comb(n, k) * p**k * (1 - p) ** (n - k)
    if acc >= q - 1e-12:
      return k
  return n


@pytest.mark.parametrize("n,ones", [(3, 1), (4, 2), (5, 1), (5, 4), (8, 3)])
def test_exact_bootstrap_of_binary_data_is_the_binomial(n, ones):
  # The mean of a resample of n values with `ones` ones is Bin(n, ones/n) / n.
  values = [1.0] * ones + [0.0] * (n - ones)
  means, probs = stats.bootstrap_distribution(values)
  assert probs.sum() == pytest.approx(1.0)
  p = ones / n
  for k in range(n + 1):
    mass = probs[abs(means - k / n) < 1e-9].sum()
    assert mass == pytest.approx(math.comb(n, k) * p**k * (1 - p) ** (n - k))
  lo, hi = stats.bootstrap_interval(values, 0.95)
  assert lo == pytest.approx(_binomial_quantile(n, p, 0.025) / n)
  assert hi == pytest.approx(_binomial_quantile(n, p, 0.975) / n)


def test_three_seeds_give_the_min_max_interval_and_verdicts():
  # With 3 values each extreme resample has probability 1/27 > 2.5%: the interval is [min, max].
  assert stats.bootstrap_interval([0.2, 0.5, 0.9]) == pytest.approx((0.2, 0.9))
  ahead = stats.paired_difference({0: 0.9, 1: 0.8, 2: 1.0}, {0: 0.5, 1: 0.7, 2: 0.2})
  assert ahead["seeds"] == [0, 1, 2] and stats.verdict(ahead) == "EA ahead"
  mixed = stats.paired_difference({0: 0.9, 1: 0.6}, {0: 0.5, 1: 0.7, 2: 0.2})
  assert mixed["seeds"] == [0, 1] and stats.verdict(mixed) == "tie"
  behind = stats.paired_difference({0: 0.1, 1: 0.2}, {0: 0.5, 1: 0.7})
  assert stats.verdict(behind) == "DPA ahead"
  assert stats.verdict(None) == "tie"


# ------------------------------------------------------------------------------------------
# The report's reductions on hand-made rows
# ------------------------------------------------------------------------------------------


def _result_row(
  label, variant, width, seed, seq, ended="plateau", ladders=("recurrence",), complexity=None
):
  complexity = complexity if complexity is not None else {"A": 1.0, "B": 2.0}[label]
  base = {c: "" for c in results.RESULT_COLUMNS}
  base.update(
    label=label,
    complexity=repr(complexity),
    variant=variant,
    width=str(width),
    seed=str(seed),
    sequence_accuracy=repr(seq),
    token_accuracy=repr(seq),
    kernel=plan.kernel_name(variant),
    ended_by=ended,
    status="ok",
    learning_rate="0.01",
    pos_encoding="rope",
    steps="100",
    wall_seconds="1.0",
    run_id=f"{label}-{variant}-{width}-{seed}",
    level="0",
  )
  return [{**base, "task": t} for t in ladders]


def test_cells_count_a_shared_level_once_and_frontier_and_verdicts_follow():
  rows = []
  for seed in range(3):
    # Level A is shared by two ladders: its rows appear twice, its runs count once.
    rows += _result_row("A", "dpa", 16, seed, 1.0, "solved", ("recurrence", "recurrence_rules"))
    rows += _result_row(
      "A",
      "ea-rational",
      16,
      seed,
      [0.5, 1.0, 0.995][seed],
      ladders=("recurrence", "recurrence_rules"),
    )
    rows += _result_row("B", "dpa", 16, seed, 0.2)
    rows += _result_row("B", "ea-rational", 16, seed, 0.6, "max_steps" if seed == 0 else "plateau")
    rows += _result_row("B", "dpa", 32, seed, 0.995, "solved")
    rows += _result_row("B", "ea-rational", 32, seed, 1.0, "solved")
  cs = {(c["label"], c["variant"], c["width"]): c for c in report.cells(rows)}
  assert len(cs) == 6 and cs[("A", "dpa", 16)]["seeds"] == 3
  assert cs[("A", "ea-rational", 16)]["solved"] == 2
  assert cs[("B", "ea-rational", 16)]["max_steps"] == 1
  assert cs[("B", "ea-rational", 16)]["seq_mean"] == pytest.approx(0.6)
  front = report.frontier(list(cs.values()))
  assert front == {
    ("A", "dpa"): 16,
    ("A", "ea-rational"): None,
    ("B", "dpa"): 32,
    ("B", "ea-rational"): 32,
  }
  comp = {(c["label"], c["width"]): c for c in report.comparisons(list(cs.values()))}
  assert len(comp) == 3  # A w16, B w16, B w32: once each
  assert comp[("A", 16)]["verdict"] == "tie"  # diffs -0.5, 0, -0.005 include 0
  assert comp[("B", 16)]["verdict"] == "EA ahead"
  assert comp[("B", 16)]["diff"]["mean"] == pytest.approx(0.4)
  assert report.converged_fraction(rows) == (17, 18)
  config = _tune_config()
  with config.unlocked():
    config.variants = ("dpa", "ea-rational")
    config.widths = (16, 32)
  text = "\n".join(report.verdict_lines(config, rows))
  assert "EA ahead in 1, tie in 2, DPA ahead in 0" in text
  assert "by dpa but not by ea-rational: A w16" in text
  assert "17 of 18 runs converged" in text


def test_readme_block_is_replaced_between_the_markers(tmp_path):
  path = tmp_path / "README.md"
  path.write_text(f"intro\n{report.README_BEGIN}\nold\n{report.README_END}\nrest\n")
  report.update_readme(str(path), "new table")
  assert path.read_text() == f"intro\n{report.README_BEGIN}\nnew table\n{report.README_END}\nrest\n"
  (tmp_path / "bare.md").write_text("no markers\n")
  with pytest.raises(ValueError, match="no results markers"):
    report.update_readme(str(tmp_path / "bare.md"), "x")


# ------------------------------------------------------------------------------------------
# The executor: no deadlock after worker recycling, a dead worker is reported, no orphans
# ------------------------------------------------------------------------------------------


def _jobs(n, tmp_path, **payload):
  return [(str(tmp_path / f"marker{i}"), dict(payload), {"run_id": f"job{i}"}) for i in range(n)]


def test_more_jobs_than_workers_times_pool_size_all_finish(tmp_path, monkeypatch):
  # Python 3.11's ProcessPoolExecutor(max_tasks_per_child=3) finished 6 of these 12 and hung.
  cores = runner.usable_cores()[:2]
  monkeypatch.setattr(runner, "usable_cores", lambda: cores)  # 2 workers >= 2 cores: pinned
  ex = runner.Executor(2, None, tasks_per_pool=3, target=study_jobs.quick, log=lambda _: None)
  t0 = time.time()
  # Jobs of 0.3 s: long enough that both workers of a pool take some (with instant jobs one
  # worker can serve a whole pool, and the other core would go unseen).
  out = list(ex.map(_jobs(12, tmp_path, sleep=0.3)))
  ex.close()
  assert sorted(r["run_id"] for r in out) == sorted(f"job{i}" for i in range(12))
  assert all(r["status"] == "ok" for r in out)
  assert len({r["summary"]["pid"] for r in out}) >= 4  # pools were replaced (fresh workers)
  # Each single-threaded worker runs on a core of its own, and the pool's workers use them all.
  assert all(len(r["summary"]["cores"]) == 1 for r in out)
  assert {r["summary"]["cores"][0] for r in out} == set(cores)
  assert time.time() - t0 < 120


def test_a_killed_worker_is_reported_and_the_rest_finish(tmp_path):
  logs = []
  jobs = _jobs(4, tmp_path)
  jobs[1] = (jobs[1][0], {"die": True, "sleep": 0.5}, {"run_id": "dies-once"})
  ex = runner.Executor(2, None, tasks_per_pool=10, target=study_jobs.dies_once, log=logs.append)
  out = {r["run_id"]: r for r in ex.map(jobs)}
  ex.close()
  assert set(out) == {"job0", "dies-once", "job2", "job3"}
  # The lost run was retried, and so were the runs that shared its pool, without a charge.
  assert all(r["status"] == "ok" for r in out.values()), out
  assert any("worker process died" in line for line in logs)
  ex = runner.Executor(2, None, tasks_per_pool=10, target=study_jobs.always_dies, log=logs.append)
  out = list(ex.map(_jobs(1, tmp_path / "x")))
  ex.close()
  assert [r["status"] for r in out] == ["error"]
  assert "died 2 time(s)" in out[0]["error"] and "rerun resumes" in out[0]["error"]


def test_workers_get_the_compilation_cache_from_the_environment(tmp_path):
  cache = str(tmp_path / "cache")
  ex = runner.Executor(1, cache, target=study_jobs.jax_cache_settings, log=lambda _: None)
  (out,) = ex.map(_jobs(1, tmp_path))
  ex.close()
  assert out["status"] == "ok", out
  assert out["summary"] == {"cache_dir": cache, "min_compile_secs": 0.0, "min_entry_bytes": 0}


def test_workers_die_with_their_parent(tmp_path):
  pid_file = tmp_path / "pids"
  script = textwrap.dedent(f"""
      import sys, tempfile
      sys.path[:0] = [{ROOT!r}, {os.path.join(ROOT, "tests")!r}]
      tempfile.tempdir = {str(tmp_path)!r}  # the killed parent cannot remove its track dir
      import study_jobs
      from ea_jax.study import runner
      ex = runner.Executor(2, None, target=study_jobs.sleeps_long, log=print)
      for r in ex.map([("m", {{"pid_file": {str(pid_file)!r}}}, {{"run_id": str(i)}})
                       for i in range(2)]):
        pass
  """)
  parent = subprocess.Popen([sys.executable, "-c", script])
  deadline = time.time() + 90
  while time.time() < deadline and (not pid_file.exists() or len(pid_file.read_text().split()) < 2):
    time.sleep(0.2)
  workers = [int(p) for p in pid_file.read_text().split()]
  assert len(workers) == 2
  parent.kill()  # kill -9: no clean-up code runs
  parent.wait()
  deadline = time.time() + 10
  alive = workers
  while alive and time.time() < deadline:
    time.sleep(0.2)
    alive = [p for p in workers if _alive(p)]
  assert not alive, f"workers {alive} outlived their parent by 10 s"


def _alive(pid):
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().split()[2] != "Z"
  except FileNotFoundError:
    return False


# ------------------------------------------------------------------------------------------
# End to end: a shrunken smoke study
# ------------------------------------------------------------------------------------------


def tiny_study_config():
  """configs/sweep.py:smoke made smaller still: 2 variants, a 2-point lr grid (so every choice
  is an edge and the grid is extended once), 8 steps."""
  config = study_config("smoke")
  with config.unlocked():
    config.variants = ("dpa", "ea-square")
    config.tune.lr_grid = (3e-3, 1e-2)
    config.tune.max_extensions = 1
    config.base.train.num_steps = 8
    config.base.train.warmup_steps = 2
    config.base.train.eval_every = 4
    config.base.train.log_every = 4
    config.base.train.checkpoint_every = 4
    config.base.train.batch_size = 8
    config.base.eval.num_examples = 16
    config.base.eval.batch_size = 16
    config.geometry.num_examples = 4
    config.compilation_cache = "none"  # runs in this process: leave JAX's cache settings alone
  return config


def test_smoke_study_end_to_end(tmp_path):
  """One test (so that parallel test runners train the study once): run, resume, shard."""
  workdir = str(tmp_path / "study")
  config = tiny_study_config()
  logs = []
  out = runner.run_study(config, workdir, workers=0, log=logs.append)
  smoke = (config, workdir, out, logs)
  check_csv_figures_and_summary(smoke)
  check_resume_trains_nothing(smoke)
  check_shards_and_collect_give_the_unsharded_csv(smoke, tmp_path)
  with pytest.raises(ValueError, match="another config"):
    other = tiny_study_config()
    with other.unlocked():
      other.seeds = (0, 1)
    runner.run_study(other, workdir, workers=0, log=lambda _: None)


def check_csv_figures_and_summary(smoke):
  import json

  config, workdir, out, logs = smoke
  assert not out["errors"], out["errors"]
  with open(os.path.join(workdir, "results.csv")) as f:
    header = f.readline().strip().split(",")
  assert header[:10] == [
    "task",
    "level",
    "complexity",
    "attention",
    "seed",
    "token_accuracy",
    "sequence_accuracy",
    "final_loss",
    "steps",
    "wall_seconds",
  ]
  for col in (
    "kernel",
    "width",
    "ended_by",
    "test_sequence_accuracy",
    "validation_sequence_accuracy",
    "selected_step",
  ):
    assert col in header
  rows = results.read_results(os.path.join(workdir, "results.csv"))
  assert len(rows) == 2 * 2  # 2 levels x 2 variants x 1 width x 1 seed
  choices = out["choices"]
  assert set(choices) == {("dpa", 16), ("ea-square", 16)}
  tuning = results.read_tuning(os.path.join(workdir, "tuning.csv"))
  assert len(tuning) == 2 * 3  # 2 variants x (2 lrs + 1 extension)
  for v in ("dpa", "ea-square"):
    c = choices[(v, 16)]
    assert len(c["grid"]) == 3 and c["extensions"] == 1
    best = min((r for r in tuning if r["variant"] == v), key=lambda r: float(r["validation_loss"]))
    assert c["learning_rate"] == pytest.approx(float(best["learning_rate"]))
    assert [r["chosen"] for r in tuning if r["variant"] == v].count("True") == 1
  for r in rows:
    assert r["status"] == "ok" and r["task"] == "recurrence" and r["level"] in ("0", "1")
    assert r["attention"] == ("dpa" if r["variant"] == "dpa" else "ea")
    assert float(r["learning_rate"]) == pytest.approx(choices[(r["variant"], 16)]["learning_rate"])
    assert r["ended_by"] in results.ENDINGS
    # The row is the run's own summary: test metrics at the checkpoint selected on validation.
    with open(os.path.join(workdir, "runs", r["run_id"], "train_summary.json")) as f:
      s = json.load(f)
    assert float(r["sequence_accuracy"]) == s["test_sequence_accuracy"]
    assert float(r["final_loss"]) == s["test_loss"]
    assert float(r["validation_loss"]) == s["validation_loss"]
    assert int(r["selected_step"]) == s["selected_step"]
    assert int(r["selected_step"]) % config.base.train.eval_every == 0
  for png in ("ladder.png", "capacity.png", "frontier.png", "geometry.png"):
    with open(os.path.join(workdir, png), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n", png
  with open(os.path.join(workdir, "summary.md")) as f:
    text = f.read()
  for needle in (
    "## Verdict",
    "## Tuned settings",
    "## Capacity map",
    "## Frontier",
    "## EA − DPA, paired over seeds",
    "## Per cell",
    "## Attention geometry",
    "runs converged",
    "**yes**",
  ):
    assert needle in text, needle


def check_resume_trains_nothing(smoke):
  config, workdir, _, _ = smoke
  stamps = {
    d: os.path.getmtime(os.path.join(workdir, "runs", d, "result.json"))
    for d in os.listdir(os.path.join(workdir, "runs"))
  }
  before = open(os.path.join(workdir, "results.csv")).read()
  logs = []
  out = runner.run_study(config, workdir, workers=0, log=logs.append)
  assert "4 of 4 runs already finished; running 0" in logs  # main
  assert not any(line.startswith("tuning round") for line in logs)  # tuning complete
  assert {
    d: os.path.getmtime(os.path.join(workdir, "runs", d, "result.json")) for d in stamps
  } == stamps
  assert open(os.path.join(workdir, "results.csv")).read() == before
  assert not out["errors"]
  first, again = runner.read_invocations(workdir)
  assert first["runs_executed"] == 6 + 4 and again["runs_executed"] == 0
  assert first["finished"] and again["finished"]


def check_shards_and_collect_give_the_unsharded_csv(smoke, tmp_path):
  import shutil

  config, workdir, _, _ = smoke
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.geometry.enabled = False  # covered above; the CSVs are what is compared
  sharded = str(tmp_path / "sharded")
  shutil.copytree(
    workdir, sharded, ignore=shutil.ignore_patterns("*.csv", "*.png", "*.md", "study_config.json")
  )
  reference = results.read_results(os.path.join(workdir, "results.csv"))
  rerun = reference[-1]["run_id"]  # one study run is trained again by its shard
  shutil.rmtree(os.path.join(sharded, "runs", rerun))
  with pytest.raises(ValueError, match="in steps"):
    runner.run_study(config, sharded, workers=0, shard_index=0, num_shards=2)
  for stage in ("tune", "main"):
    for i in range(2):  # in this process, as the unsharded run: the same numerics
      runner.run_study(
        config, sharded, workers=0, stage=stage, shard_index=i, num_shards=2, log=lambda _: None
      )
  runner.collect(config, sharded, log=lambda _: None)
  merged = results.read_results(os.path.join(sharded, "results.csv"))
  assert [r["run_id"] for r in merged] == [r["run_id"] for r in reference]
  for got, want in zip(merged, reference):
    assert {k: v for k, v in got.items() if k != "wall_seconds"} == {
      k: v for k, v in want.items() if k != "wall_seconds"
    }, got["run_id"]
  assert results.read_tuning(os.path.join(sharded, "tuning.csv")) == results.read_tuning(
    os.path.join(workdir, "tuning.csv")
  )


def test_study_runs_in_worker_processes(tmp_path):
  """The smoke preset (no tuning, 2 runs) through two spawned workers: each run's result.json is
  written by a worker and the report is complete."""
  config = study_config("smoke")
  with config.unlocked():
    config.variants = ("dpa",)
    config.base.train.num_steps = 8
    config.base.train.eval_every = 4
    config.base.train.log_every = 4
    config.base.train.checkpoint_every = 4
    config.base.eval.num_examples = 16
    config.geometry.enabled = False
    config.compilation_cache = "none"  # the workers inherit the suite's cache (conftest.py)
  workdir = str(tmp_path / "study")
  out = runner.run_study(config, workdir, workers=2, log=lambda _: None)
  assert not out["errors"], [(e.get("error"), e.get("traceback")) for e in out["errors"]]
  assert len(out["results"]) == 2
  pids = {
    runner.read_result(os.path.join(workdir, "runs", r["run_id"]))["worker_pid"]
    for r in out["results"]
  }
  assert os.getpid() not in pids
  assert os.path.isfile(os.path.join(workdir, "summary.md"))


def test_main_stage_needs_the_tuning_runs(tmp_path):
  with pytest.raises(RuntimeError, match="--stage=tune"):
    runner.run_study(tiny_study_config(), str(tmp_path), workers=0, stage="main")
