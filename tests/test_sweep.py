"""The sweep (ea_jax.sweep, ea_jax.report, configs/sweep.py): planning, the learning-rate
rule, aggregation, and a shrunken smoke sweep end to end (worker processes, CSV, figures,
summary), its resume, and shards + collect against the unsharded CSV."""
import csv
import importlib.util
import math
import os
import shutil

import pytest

from ea_jax import report
from ea_jax import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sweep_config(preset=""):
  spec = importlib.util.spec_from_file_location("sweep_cfg", os.path.join(ROOT, "configs",
                                                                          "sweep.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset)


# ------------------------------------------------------------------------------------------
# Planning and bookkeeping (no training)
# ------------------------------------------------------------------------------------------


def test_variants_parse_to_model_fields():
  assert sweep.parse_variant("dpa") == {"attention": "dpa"}
  assert sweep.parse_variant("ea-square+scale=1+eps=1e-3+qknorm") == {
      "attention": "ea", "ea_kernel": "square", "attention_scale": 1.0, "ea_eps": 1e-3,
      "qk_norm": True}
  assert sweep.parse_variant("ea-rational+pos=learned") == {
      "attention": "ea", "ea_kernel": "rational", "pos_encoding": "learned"}
  assert [sweep.kernel_name(v) for v in ("dpa", "ea-rational", "ea-square+qknorm")] == [
      "softmax", "rational", "square"]
  for bad, match in (("ea", "base name"), ("dpa+temp=2", "modifier"), ("ea-square+eps=x",
                                                                         "number"),
                     ("dpa+pos=alibi", "pos= must be one of")):
    with pytest.raises(ValueError, match=match):
      sweep.parse_variant(bad)


def test_cpu_study_plan_shares_levels_and_shards_partition_it():
  config = sweep_config()
  tune, main = sweep.plan(config)
  # The recurrence and recurrence_rules ladders share task configs (N=8 symbols): such a level
  # is trained once and reported under both ladders.
  from ea_jax import tasks
  levels = [(name, i) for name in config.ladders for i in config.levels[name]]
  distinct = {sweep._task_items(tasks.ladder(n)[i]) for n, i in levels}  # pylint: disable=protected-access
  cells = len(config.variants) * len(config.widths) * len(config.seeds)
  assert len(main) == len(distinct) * cells
  assert sum(len(r.levels) for r in main) == len(levels) * cells
  assert len(tune) == len(config.variants) * len(config.widths) * len(config.lr_grid)
  assert len(config.seeds) >= 3 and len(config.widths) >= 2
  assert set(config.variants) == {"dpa", "ea-rational", "ea-square"}
  assert {"recurrence", "recurrence_rules"} <= set(config.ladders)
  assert len({r.key(1e-3) for r in main}) == len(main)          # run dirs are unique
  shards = [sweep.shard(main, i, 3) for i in range(3)]
  assert sorted(r.key(1e-3) for s in shards for r in s) == sorted(r.key(1e-3) for r in main)
  with pytest.raises(ValueError, match="shard_index"):
    sweep.shard(main, 3, 3)


def test_presets_build_and_bad_fields_are_named():
  for preset in ("smoke", "paper", "ablation"):
    tune, main = sweep.plan(sweep_config(preset))
    assert main
  assert sweep.plan(sweep_config("ablation"))[1][0].variant == "dpa"
  with pytest.raises(ValueError, match="allowed"):
    sweep_config("huge")
  config = sweep_config("smoke")
  with config.unlocked():
    config.widths = (18,)
  with pytest.raises(ValueError, match="config.widths"):
    sweep.plan(config)


def _row(variant, width, lr, seq, tok, steps, loss=1.0, level=0, seed=0, task="t"):
  return {"variant": variant, "width": str(width), "learning_rate": repr(lr),
          "sequence_accuracy": repr(seq), "token_accuracy": repr(tok),
          "steps_to_100": "" if steps is None else str(steps), "eval_loss": repr(loss),
          "level": str(level), "seed": str(seed), "task": task, "label": f"L{level}",
          "complexity": str(float(level)), "kernel": "k", "status": "ok", "wall_seconds": "1.0",
          "run_id": f"{variant}{width}{lr}{level}{seed}"}


def test_learning_rate_rule():
  rows = [
      _row("dpa", 32, 1e-3, 0.5, 0.9, None), _row("dpa", 32, 3e-3, 0.7, 0.8, None),  # seq acc
      _row("ea", 32, 1e-3, 1.0, 1.0, 400), _row("ea", 32, 3e-3, 1.0, 1.0, 200),       # speed
      _row("ea", 64, 1e-3, 0.2, 0.9, None, loss=0.5),
      _row("ea", 64, 3e-3, 0.2, 0.9, None, loss=0.4),                                 # loss
      _row("dpa", 64, 1e-3, 0.0, 0.5, None), _row("dpa", 64, 3e-3, 0.0, 0.5, None),    # tie
  ]
  assert sweep.choose_learning_rates(rows) == {("dpa", 32): 3e-3, ("ea", 32): 3e-3,
                                               ("ea", 64): 3e-3, ("dpa", 64): 1e-3}


def test_aggregate_and_frontier():
  rows = []
  # variant a: all seeds solve levels 0 and 2, one seed fails level 1 -> frontier 2.
  # variant b: solves level 0 only; level 1 has a diverged run (empty metrics = accuracy 0).
  for seed in range(3):
    rows += [_row("a", 32, 1e-3, 1.0, 1.0, 100, level=0, seed=seed),
             _row("a", 32, 1e-3, 0.9 if seed == 1 else 1.0, 0.99, None, level=1, seed=seed),
             _row("a", 32, 1e-3, 1.0, 1.0, 300 + 100 * seed, level=2, seed=seed),
             _row("b", 32, 1e-3, 1.0, 1.0, 200, level=0, seed=seed)]
    b1 = _row("b", 32, 1e-3, 0.5, 0.9, None, level=1, seed=seed)
    if seed == 0:
      b1.update(sequence_accuracy="", token_accuracy="", status="diverged")
    rows.append(b1)
  cells = {(c["variant"], c["level"]): c for c in report.aggregate(rows)}
  assert cells[("a", 1)]["solved"] == 2 and cells[("a", 1)]["seq_min"] == pytest.approx(0.9)
  assert cells[("a", 2)]["steps_to_100"] == pytest.approx(400.0)
  assert cells[("b", 1)]["seq_mean"] == pytest.approx(1.0 / 3)      # (0 + 0.5 + 0.5) / 3
  assert cells[("b", 1)]["diverged"] == 1
  front = report.frontiers(list(cells.values()))
  assert front[("t", "a", 32)]["level"] == 2 and front[("t", "b", 32)]["level"] == 0
  comp = {(c["variant"], c["level"]): c for c in report.comparisons(list(cells.values()),
                                                                    baseline="b")}
  assert comp[("a", 1)]["delta_seq"] == pytest.approx((2.9 / 3) - 1.0 / 3)


# ------------------------------------------------------------------------------------------
# End to end: a shrunken smoke sweep
# ------------------------------------------------------------------------------------------


def tiny_smoke_config():
  """configs/sweep.py:smoke made smaller still: 2 variants, a 2-point lr grid (tuning on
  level 0), 8 steps."""
  config = sweep_config("smoke")
  with config.unlocked():
    config.variants = ("dpa", "ea-square")
    config.lr_grid = (3e-3, 1e-2)
    config.base.train.num_steps = 8
    config.base.train.warmup_steps = 2
    config.base.train.eval_every = 4
    config.base.train.log_every = 4
    config.base.train.checkpoint_every = 8
    config.base.train.batch_size = 8
    config.base.eval.num_examples = 16
    config.base.eval.batch_size = 16
    config.geometry.num_examples = 4
  return config


def test_smoke_sweep_end_to_end(tmp_path):
  """One test (so that parallel test runners train the sweep once): run, resume, shard."""
  workdir = str(tmp_path / "sweep")
  config = tiny_smoke_config()
  logs = []
  out = sweep.run_sweep(config, workdir, workers=2, log=logs.append)
  smoke = (config, workdir, out, logs)
  check_csv_figures_and_summary(smoke)
  check_resume_skips_finished_runs(smoke)
  check_shards_and_collect_give_the_unsharded_csv(smoke, tmp_path)


def _read(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def check_csv_figures_and_summary(smoke):
  config, workdir, out, logs = smoke
  assert not out["errors"], out["errors"]
  rows = _read(os.path.join(workdir, "results.csv"))
  with open(os.path.join(workdir, "results.csv")) as f:
    header = f.readline().strip().split(",")
  assert header[:10] == ["task", "level", "complexity", "attention", "seed", "token_accuracy",
                         "sequence_accuracy", "final_loss", "steps", "wall_seconds"]
  for col in ("kernel", "variant", "width", "num_params", "learning_rate", "steps_to_100"):
    assert col in header
  assert len(rows) == 2 * 2                       # 2 levels x 2 variants x 1 width x 1 seed
  chosen = out["learning_rates"]
  assert set(chosen) == {("dpa", 16), ("ea-square", 16)}
  tuning = _read(os.path.join(workdir, "tuning.csv"))
  assert len(tuning) == 2 * 2                     # 2 variants x 2 learning rates
  assert sweep.choose_learning_rates(tuning) == chosen
  for r in rows:
    assert r["status"] == "ok" and r["task"] == "recurrence" and r["level"] in ("0", "1")
    assert r["attention"] == ("dpa" if r["variant"] == "dpa" else "ea")
    assert r["kernel"] == ("softmax" if r["variant"] == "dpa" else "square")
    assert float(r["learning_rate"]) == chosen[(r["variant"], 16)]
    assert 0.0 <= float(r["token_accuracy"]) <= 1.0 and math.isfinite(float(r["final_loss"]))
    assert int(r["steps"]) == 8 and int(r["num_params"]) > 0
    # The row is the run's own train_summary.json.
    import json
    with open(os.path.join(workdir, "runs", r["run_id"], "train_summary.json")) as f:
      s = json.load(f)
    assert float(r["sequence_accuracy"]) == s["sequence_accuracy"]
    assert int(r["num_params"]) == s["num_params"]
  for png in ("ladder.png", "frontier.png", "geometry.png"):
    with open(os.path.join(workdir, png), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n", png
  with open(os.path.join(workdir, "summary.md")) as f:
    text = f.read()
  for needle in ("## 100% frontier", "## Learning rate per variant and width", "## Per level",
                 "## Attention geometry", "| 1 | N=5 R=1 | ea-square | 16 |", "**yes**"):
    assert needle in text, needle


def check_resume_skips_finished_runs(smoke):
  config, workdir, _, _ = smoke
  stamps = {d: os.path.getmtime(os.path.join(workdir, "runs", d, "result.json"))
            for d in os.listdir(os.path.join(workdir, "runs"))}
  before = open(os.path.join(workdir, "results.csv")).read()
  logs = []
  out = sweep.run_sweep(config, workdir, workers=0, log=logs.append)
  assert "4 of 4 runs already finished; running 0" in logs   # tuning
  assert logs.count("4 of 4 runs already finished; running 0") == 2   # and main
  assert {d: os.path.getmtime(os.path.join(workdir, "runs", d, "result.json"))
          for d in stamps} == stamps
  assert open(os.path.join(workdir, "results.csv")).read() == before
  assert not out["errors"]
  first, again = sweep.read_invocations(workdir)   # the wall time of both invocations is kept
  assert first["runs_executed"] == 8 and again["runs_executed"] == 0
  assert first["finished"] and again["finished"] and first["seconds"] > 0
  with open(os.path.join(workdir, "summary.md")) as f:
    assert "over 2 invocation(s)" in f.read()


def check_shards_and_collect_give_the_unsharded_csv(smoke, tmp_path):
  config, workdir, _, _ = smoke
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.geometry.enabled = False   # already covered above; the CSVs are what is compared
  sharded = str(tmp_path / "sharded")
  shutil.copytree(workdir, sharded, ignore=shutil.ignore_patterns("*.csv", "*.png", "*.md"))
  reference = _read(os.path.join(workdir, "results.csv"))
  # One study run is trained again from scratch by its shard.
  rerun = reference[-1]["run_id"]
  shutil.rmtree(os.path.join(sharded, "runs", rerun))
  with pytest.raises(ValueError, match="two steps"):
    sweep.run_sweep(config, sharded, workers=0, shard_index=0, num_shards=2)
  for stage in ("tune", "main"):
    for i in range(2):
      sweep.run_sweep(config, sharded, workers=0, stage=stage, shard_index=i, num_shards=2,
                      log=lambda _: None)
  assert sorted(os.listdir(os.path.join(sharded, "shards"))) == [
      "results-00000-of-00002.csv", "results-00001-of-00002.csv",
      "tuning-00000-of-00002.csv", "tuning-00001-of-00002.csv"]
  sweep.collect(config, sharded, log=lambda _: None)
  merged = _read(os.path.join(sharded, "results.csv"))
  assert [r["run_id"] for r in merged] == [r["run_id"] for r in reference]
  for got, want in zip(merged, reference):
    if got["run_id"] != rerun:
      assert got == want
    else:   # retrained: the same run up to float round-off in a different process
      for k in want:
        if k in ("token_accuracy", "sequence_accuracy", "final_loss", "eval_loss"):
          assert float(got[k]) == pytest.approx(float(want[k]), abs=0.02), k
        elif k != "wall_seconds":
          assert got[k] == want[k], k
  assert _read(os.path.join(sharded, "tuning.csv")) == _read(os.path.join(workdir, "tuning.csv"))
  assert os.path.isfile(os.path.join(sharded, "ladder.png"))


def test_main_stage_needs_the_tuning_runs(tmp_path):
  with pytest.raises(RuntimeError, match="--stage=tune"):
    sweep.run_sweep(tiny_smoke_config(), str(tmp_path), workers=0, stage="main")
