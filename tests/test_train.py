"""Training library: exact metrics, schedule, decay mask, a loss-reducing step, exact resume after
SIGTERM, NaN stop, checkpoint/config mismatch errors, rollout, length-generalisation eval."""

import json
import os
import shutil
import signal

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_helpers
from absl import flags
from flax import traverse_util
from ml_collections import config_flags

from ea_jax import checkpointing, evaluate, files, metrics, provenance, train_lib, workdir_lock
from ea_jax import data as data_lib

# ------------------------------------------------------------------------------------------
# Pure pieces against numpy references
# ------------------------------------------------------------------------------------------


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_metrics_match_numpy_reference():
  rng = np.random.default_rng(0)
  B, L, V = 5, 6, 4
  logits = rng.normal(size=(B, L, V)).astype(np.float32)
  targets = rng.integers(0, V, (B, L)).astype(np.int32)
  weights = (rng.random((B, L)) < 0.6).astype(np.float32)
  weights[3] = 0.0  # a row with nothing scored is not a sequence
  # Make row 1 fully right at its scored positions.
  targets[1] = np.where(weights[1] > 0, logits[1].argmax(-1), targets[1])
  m = metrics.EvalMetrics.make(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights))
  got = m.compute()

  nll = -np.take_along_axis(_log_softmax(logits.astype(np.float64)), targets[..., None], -1)[..., 0]
  right = logits.argmax(-1) == targets
  scored = weights > 0
  rows = scored.any(1)
  np.testing.assert_allclose(got["loss"], (nll * weights).sum() / weights.sum(), rtol=1e-6)
  assert float(got["token_accuracy"]) == right[scored].mean()
  seq_right = [(right[b] | ~scored[b]).all() for b in range(B) if rows[b]]
  assert float(got["sequence_accuracy"]) == np.mean(seq_right)
  per_pos = got["per_position_accuracy"]
  for t in range(L):
    if scored[:, t].any():
      assert per_pos[t] == right[scored[:, t], t].mean()
    else:
      assert np.isnan(per_pos[t])
  # Merging two halves equals computing on the whole.
  a = metrics.EvalMetrics.make(*(jnp.asarray(x[:2]) for x in (logits, targets, weights)))
  b = metrics.EvalMetrics.make(*(jnp.asarray(x[2:]) for x in (logits, targets, weights)))
  merged = a.merge(b).compute()
  assert float(merged["sequence_accuracy"]) == float(got["sequence_accuracy"])
  np.testing.assert_allclose(merged["loss"], got["loss"], rtol=1e-6)


def test_schedule_warmup_then_cosine():
  config = train_helpers.load_config(
    "tiny",
    {
      "train.num_steps": 100,
      "train.warmup_steps": 10,
      "train.learning_rate": 1e-2,
      "train.min_lr_ratio": 0.1,
    },
  )
  sched = train_lib.learning_rate_schedule(config.train)
  np.testing.assert_allclose(sched(0), 0.0)
  np.testing.assert_allclose(sched(5), 5e-3, rtol=1e-6)
  np.testing.assert_allclose(sched(10), 1e-2, rtol=1e-6)
  frac = (55 - 10) / 90
  np.testing.assert_allclose(
    sched(55), 1e-3 + (1e-2 - 1e-3) * 0.5 * (1 + np.cos(np.pi * frac)), rtol=1e-5
  )
  np.testing.assert_allclose(sched(100), 1e-3, rtol=1e-6)
  # warmup_steps > num_steps: the warmup is clamped to the whole run (linear to the peak at 8).
  short = train_helpers.load_config(
    "tiny", {"train.warmup_steps": 50, "train.learning_rate": 1e-2}
  ).train
  sched = train_lib.learning_rate_schedule(short)
  np.testing.assert_allclose([sched(4), sched(8)], [5e-3, 1e-2], rtol=1e-6)


@pytest.mark.parametrize("warmup,total,ratio", [(10, 100, 0.1), (0, 7, 0.0), (3, 3, 0.5)])
def test_schedule_equals_optax_warmup_cosine_also_with_traced_settings(warmup, total, ratio):
  import optax

  want = optax.warmup_cosine_decay_schedule(0.0, 2e-3, warmup, max(total, warmup + 1), 2e-3 * ratio)
  hp = train_lib.Hyper(2e-3, warmup, total, ratio, 0.9, 0.99, 0.0, 1.0)
  steps = np.arange(total + 3)
  traced = jax.jit(lambda h, t: train_lib.schedule_from(h)(t))
  got = [traced(train_lib.Hyper(*np.asarray(hp, np.float32)), t) for t in steps]
  np.testing.assert_allclose(got, [want(t) for t in steps], rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize(
  "override, field",
  [
    ({"train.learning_rate": -1.0}, "config.train.learning_rate=-1.0: must be > 0"),
    ({"train.learning_rate": 0.0}, "config.train.learning_rate=0.0: must be > 0"),
    ({"train.patience": 0}, "config.train.patience=0"),
    ({"data.source": "csv"}, "config.data.source='csv'"),
  ],
)
def test_bad_config_names_the_field_and_creates_nothing(tmp_path, override, field):
  workdir = str(tmp_path / "never")
  with pytest.raises(ValueError, match=field.replace("(", r"\(").replace(".", r"\.")):
    train_lib.train_and_evaluate(train_helpers.load_config("tiny", override), workdir)
  assert not os.path.exists(workdir)


def _setup(config):
  src = data_lib.make_source(config, splits=("train",))
  return src, train_lib.get_setup(config, vocab_size=src.vocab_size, max_len=src.seq_len)


def test_decay_mask_spares_norms_biases_embeddings():
  config = train_helpers.load_config("tiny", {"model.pos_encoding": "learned"})
  _, setup = _setup(config)
  with jax.set_mesh(setup.mesh):
    state, _ = setup.init_state()
  mask = traverse_util.flatten_dict(train_lib.decay_mask(state.params), sep="/")
  params = traverse_util.flatten_dict(state.params, sep="/")
  for name, decays in mask.items():
    is_embedding = "embed" in name
    assert decays == (params[name].ndim >= 2 and not is_embedding), name
  assert any(mask.values()) and not all(mask.values())
  assert any("embed" in n for n in mask)


def test_one_step_reduces_loss_on_a_fixed_batch():
  config = train_helpers.load_config("tiny", {"train.warmup_steps": 0, "train.learning_rate": 3e-3})
  src, setup = _setup(config)
  sh = setup.batch_sharding(config.train.batch_size)
  with jax.set_mesh(setup.mesh):
    state, _ = setup.init_state()
    batch = src.train_batches(0, config.train.batch_size, sh)(0)
    eval_step = setup.eval_step(config.train.batch_size)
    before = float(eval_step(state.params, batch).compute()["loss"])
    step = setup.train_step(config.train.batch_size, config.train)
    state, m = step(state, batch)
    np.testing.assert_allclose(float(m.compute()["loss"]), before, rtol=1e-5)
    after = float(eval_step(state.params, batch).compute()["loss"])
  assert int(state.step) == 1
  assert after < before - 1e-3, (before, after)


def test_hyperparameters_are_runtime_arguments_equal_to_optax_adamw():
  """Runs that differ in lr, budget and AdamW settings share one Setup (one compiled step), and
  each one's update equals optax's clip + AdamW on optax's warmup-cosine schedule built here."""
  import optax

  configs = [
    train_helpers.load_config(
      "tiny",
      {"train.warmup_steps": 2, "train.learning_rate": lr, "train.num_steps": n, **other},
    )
    for lr, n, other in (
      (3e-3, 8, {"train.weight_decay": 0.1}),
      (3e-2, 5, {"train.b2": 0.9, "train.grad_clip": 0.5, "train.min_lr_ratio": 0.5}),
    )
  ]
  (src, setup), (_, other) = _setup(configs[0]), _setup(configs[1])
  assert setup is other
  sh = setup.batch_sharding(configs[0].train.batch_size)
  with jax.set_mesh(setup.mesh):
    batch = src.train_batches(0, configs[0].train.batch_size, sh)(0)
    for config in configs:
      tc = config.train
      state, _ = setup.init_state()
      params0 = jax.device_get(state.params)
      tx = optax.chain(
        optax.clip_by_global_norm(tc.grad_clip),
        optax.adamw(
          optax.warmup_cosine_decay_schedule(
            0.0, tc.learning_rate, tc.warmup_steps, tc.num_steps, tc.learning_rate * tc.min_lr_ratio
          ),
          b1=tc.b1,
          b2=tc.b2,
          weight_decay=tc.weight_decay,
          mask=train_lib.decay_mask,
        ),
      )

      # The reference step, jitted (op by op it compiles each of optax's and the model's
      # primitives separately: 20 s of this test on a fresh cache).
      @jax.jit
      def reference_step(want, opt):
        grads = jax.grad(
          lambda p: metrics.mean_loss(
            setup.model.apply({"params": p}, batch.inputs), batch.targets, batch.weights
          )
        )(want)
        updates, opt = tx.update(grads, opt, want)
        return optax.apply_updates(want, updates), opt

      want, opt = dict(params0), tx.init(params0)
      step = setup.train_step(tc.batch_size, tc)
      for _ in range(3):  # through the warmup: lr(0) = 0, lr(1) = lr / 2, lr(2) = lr
        want, opt = reference_step(want, opt)
        state, m = step(state, batch)  # the same batch each step
      np.testing.assert_allclose(float(m.compute()["learning_rate"]), tc.learning_rate, rtol=1e-6)
      chex.assert_trees_all_close(jax.device_get(state.params), want, rtol=2e-5, atol=1e-7)
      moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), want, params0)
      assert max(jax.tree.leaves(moved)) > tc.learning_rate  # Adam moves ~lr(t) per step


# Training losses of configs/tiny.py (seed 0) at step 0 and after one update, measured with jax
# 0.10.2 / flax 0.12.8 / optax 0.2.8 on x86-64 CPU.
GOLDEN_TINY_LOSSES = (2.308720827102661, 2.2243316173553467)


def test_golden_one_step_losses_of_the_tiny_config():
  losses = train_helpers.run_steps(train_helpers.load_config("tiny"), 2)["losses"]
  np.testing.assert_allclose(
    losses,
    GOLDEN_TINY_LOSSES,
    rtol=1e-5,
    err_msg="The tiny config's first losses changed. If the change is intended (model, init, "
    "optimizer, data or a library upgrade), check that the other tests still pass, "
    "then update GOLDEN_TINY_LOSSES with the new values and say why in the commit; "
    "if not, the change is a regression in the numerics.",
  )


def test_config_typos_are_rejected():
  config = train_helpers.load_config("tiny")
  with pytest.raises(AttributeError):
    config.train.num_stpes = 3
  path = os.path.join(train_helpers.REPO, "configs", "tiny.py")

  def parse(*overrides):
    argv = ["prog", f"--config={path}", *overrides]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file(
      "config", None, "", flag_values=fv, lock_config=True, sys_argv=argv
    )
    fv(argv)
    return fv.config

  with pytest.raises(AttributeError, match="num_stpes"):
    parse("--config.train.num_stpes=3")
  config = parse(
    "--config.model.attention_scale=0.5",
    "--config.model.attention_impl=naive",
    "--config.logical_axis_rules.embed=tensor",
    "--config.task.seq_len=20",
  )
  assert config.model.attention_scale == 0.5 and config.model.attention_impl == "naive"
  assert config.logical_axis_rules.embed == "tensor" and config.task.seq_len == 20


# ------------------------------------------------------------------------------------------
# Full runs
# ------------------------------------------------------------------------------------------

RUN = {
  "train.num_steps": 8,
  "train.checkpoint_every": 4,
  "train.eval_every": 4,
  "train.keep_checkpoints": 5,
}


def _restore(workdir, config):
  _, step, state = train_lib.restore(workdir, config=config)
  return step, jax.device_get(state)


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  config = train_helpers.load_config("tiny", RUN)
  summary = train_lib.train_and_evaluate(config, workdir)
  return workdir, config, summary


def test_summary_contract(trained):
  workdir, config, summary = trained
  with open(os.path.join(workdir, "train_summary.json")) as f:
    assert json.load(f) == summary
  for key in (
    "step",
    "loss",
    "eval_loss",
    "token_accuracy",
    "sequence_accuracy",
    "first_step_100",
    "wall_seconds",
    "num_params",
    "steps_to_100",
  ):
    assert key in summary, key
  assert summary["step"] == 8 and summary["ended_by"] == "max_steps"
  # Selection on validation: the eval with the lowest validation loss (nothing reached 1.0).
  history = files.read_jsonl(os.path.join(workdir, "eval_history.jsonl"))
  assert [r["step"] for r in history] == [4, 8]
  best = min(history, key=lambda r: r["loss"])
  assert summary["selected_step"] == best["step"]
  assert summary["validation_loss"] == best["loss"]
  # The old keys are the test numbers at the selected step.
  assert summary["eval_loss"] == summary["test_loss"] != summary["validation_loss"]
  assert summary["sequence_accuracy"] == summary["test_sequence_accuracy"]
  assert sorted(
    int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit()
  ) == [4, 8]
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))


def _test_metrics_of(workdir, config, step):
  """The test split at checkpoint `step`, measured apart from train_and_evaluate."""
  src = data_lib.make_source(config, splits=("test",))
  setup = train_lib.get_setup(config, vocab_size=src.vocab_size, max_len=src.seq_len)
  sh = setup.batch_sharding(config.eval.batch_size)
  with jax.set_mesh(setup.mesh):
    ckpts = checkpointing.Checkpoints(os.path.join(workdir, "checkpoints"), keep=10)
    state = ckpts.restore(step, setup.abstract_state())
    ckpts.close()
    batches = src.eval_batches(
      "test", config.eval.seed, config.eval.num_examples, config.eval.batch_size, sh
    )
    return train_lib.run_eval(setup.eval_step(config.eval.batch_size), state.params, batches)


def test_plateau_stops_selects_on_validation_and_reports_test(tmp_path):
  # A 99% improvement per eval is out of reach: the run surely plateaus at its second eval.
  stop = {
    "train.eval_every": 2,
    "train.checkpoint_every": 1,
    "train.keep_checkpoints": 1,
    "train.early_stop": True,
    "train.patience": 1,
    "train.plateau_rel": 0.99,
  }
  config = train_helpers.load_config("tiny", {**stop, "train.num_steps": 40})
  workdir = str(tmp_path)
  summary = train_lib.train_and_evaluate(config, workdir)
  assert summary["ended_by"] == "plateau" and summary["step"] == 4
  history = files.read_jsonl(os.path.join(workdir, "eval_history.jsonl"))
  assert [r["step"] for r in history] == [2, 4]
  assert summary["selected_step"] == min(history, key=lambda r: r["loss"])["step"]
  # keep_checkpoints=1 keeps the latest; the selected one survives beside it.
  ckpt_dir = os.path.join(workdir, "checkpoints")
  steps = sorted(int(s) for s in os.listdir(ckpt_dir) if s.isdigit())
  assert steps == sorted({4, summary["selected_step"]})
  test = _test_metrics_of(workdir, config, summary["selected_step"])
  for key in ("loss", "token_accuracy", "sequence_accuracy"):
    assert summary[f"test_{key}"] == test[key], key

  # Rerun (even with a larger budget): already done, nothing trained, nothing rewritten.
  path = os.path.join(workdir, "train_summary.json")
  before = (open(path).read(), os.stat(path).st_mtime_ns)
  longer = train_helpers.load_config("tiny", {**stop, "train.num_steps": 80})
  again = train_lib.train_and_evaluate(longer, workdir)
  assert again == summary
  assert (open(path).read(), os.stat(path).st_mtime_ns) == before

  # Without its summary (killed after the last checkpoint), a resume trains 0 further steps:
  # the history decides "plateau" again and the same checkpoint is selected and tested.
  os.remove(path)
  resumed = train_lib.train_and_evaluate(longer, workdir)
  assert resumed["step"] == 4 and resumed["ended_by"] == "plateau"
  assert files.read_jsonl(os.path.join(workdir, "eval_history.jsonl")) == history
  for key in ("selected_step", "test_loss", "test_sequence_accuracy", "validation_loss"):
    assert resumed[key] == summary[key], key


def test_min_steps_defers_a_plateau_stop(tmp_path):
  # The same surely-plateauing run, but no plateau may end it before step 8: it ends there.
  overrides = {
    "train.eval_every": 2,
    "train.checkpoint_every": 2,
    "train.early_stop": True,
    "train.patience": 1,
    "train.plateau_rel": 0.99,
    "train.min_steps": 8,
    "train.num_steps": 40,
  }
  summary = train_lib.train_and_evaluate(
    train_helpers.load_config("tiny", overrides), str(tmp_path)
  )
  assert summary["ended_by"] == "plateau" and summary["step"] == 8


def test_sigterm_saves_and_resume_is_exact(trained, tmp_path, monkeypatch):
  ref_dir, config, ref_summary = trained
  workdir = str(tmp_path / "interrupted")
  real = data_lib.GeneratorSource.train_batches

  def train_batches(self, seed, batch_size, sharding):
    get = real(self, seed, batch_size, sharding)

    def batch(step):
      if step == 2:
        os.kill(os.getpid(), signal.SIGTERM)
      return get(step)

    return batch

  monkeypatch.setattr(data_lib.GeneratorSource, "train_batches", train_batches)
  first = train_lib.train_and_evaluate(config, workdir)
  assert first["stopped"] == "sigterm" and first["step"] == 3
  monkeypatch.setattr(data_lib.GeneratorSource, "train_batches", real)
  second = train_lib.train_and_evaluate(config, workdir)
  assert second["step"] == 8
  for key in ("loss", "eval_loss", "token_accuracy", "sequence_accuracy"):
    assert second[key] == ref_summary[key], key
  step_a, a = _restore(ref_dir, config)
  step_b, b = _restore(workdir, config)
  assert step_a == step_b == 8
  chex.assert_trees_all_equal(a, b)


def test_nan_stops_naming_the_step_and_keeps_good_checkpoint(tmp_path, monkeypatch):
  real = train_lib.schedule_from

  def poisoned(hp):
    sched = real(hp)
    return lambda step: jnp.where(step >= 3, jnp.nan, sched(step))

  monkeypatch.setattr(train_lib, "schedule_from", poisoned)
  train_lib._cached_setup.cache_clear()  # build (and later drop) a poisoned Setup  # pylint: disable=protected-access
  config = train_helpers.load_config(
    "tiny", {**RUN, "train.checkpoint_every": 1, "train.keep_checkpoints": 2}
  )
  workdir = str(tmp_path)
  with pytest.raises(FloatingPointError, match="at step 3.*Last good checkpoint: step 3"):
    train_lib.train_and_evaluate(config, workdir)
  monkeypatch.setattr(train_lib, "schedule_from", real)
  train_lib._cached_setup.cache_clear()  # pylint: disable=protected-access
  step, state = _restore(workdir, config)
  assert step == 3
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))


def test_checkpoint_shape_mismatch_names_the_parameter(trained, tmp_path):
  workdir = str(tmp_path / "copy")
  shutil.copytree(trained[0], workdir)
  os.remove(os.path.join(workdir, "train_config.json"))  # no record: the checkpoint check remains
  config = train_helpers.load_config("tiny", {**RUN, "model.mlp_dim": 48})
  with pytest.raises(checkpointing.CheckpointError, match=r"mlp.*\(16, 32\) != model \(16, 48\)"):
    train_lib.train_and_evaluate(config, workdir)


@pytest.mark.parametrize(
  "override, fields",
  [
    ({"model.attention": "dpa"}, ["model.attention"]),
    ({"task.num_rules": 3, "train.learning_rate": 3e-3}, ["task.num_rules", "train.learning_rate"]),
    ({"train.seed": 1}, ["train.seed"]),
    ({"eval.num_examples": 16}, ["eval.num_examples"]),
  ],
)
def test_resume_with_another_experiment_is_refused(trained, tmp_path, override, fields):
  workdir = str(tmp_path / "copy")
  shutil.copytree(trained[0], workdir)
  record = open(os.path.join(workdir, "train_config.json")).read()
  config = train_helpers.load_config("tiny", {**RUN, **override})
  with pytest.raises(provenance.ProvenanceError, match="new --workdir") as info:
    train_lib.train_and_evaluate(config, workdir)
  listed = str(info.value).split(" (", 1)[1].split("); ", 1)[0]
  assert sorted(f.split(":")[0].strip() for f in listed.split(";")) == fields
  assert open(os.path.join(workdir, "train_config.json")).read() == record
  assert len(files.read_jsonl(os.path.join(workdir, "eval_history.jsonl"))) == 2


def test_provenance_lists_allow_cadence_and_budget_only():
  base = train_helpers.load_config("tiny")
  changed = train_helpers.load_config(
    "tiny",
    {
      "train.num_steps": 99,
      "train.eval_every": 3,
      "train.log_every": 1,
      "mesh.data": 1,
      "model.attention_impl": "naive",
      "task.seq_len": 40,
      "model.embed_dim": 32,
    },
  )
  diffs = provenance.differences(base, changed, provenance.RESUME_MAY_CHANGE)
  assert [d[0] for d in diffs] == ["model.embed_dim", "task.seq_len"]
  diffs = provenance.differences(base, changed, provenance.EVAL_MAY_CHANGE, provenance.EVAL_IGNORES)
  assert [d[0] for d in diffs] == ["model.embed_dim"]
  assert diffs[0][1:] == (16, 32)


def test_a_second_trainer_fails_at_once_and_a_stale_lock_is_taken_over(trained, tmp_path):
  workdir = str(tmp_path / "copy")
  shutil.copytree(trained[0], workdir)
  with workdir_lock.WorkdirLock(workdir):
    with pytest.raises(workdir_lock.WorkdirLockedError, match=f"pid {os.getpid()}"):
      train_lib.train_and_evaluate(trained[1], workdir)
  # A lock file left by a process that is gone (no flock held): taken over, the run proceeds.
  with open(os.path.join(workdir, ".lock"), "w") as f:
    json.dump({"host": "elsewhere", "pid": 999999, "since": "earlier"}, f)
  assert train_lib.train_and_evaluate(trained[1], workdir) == trained[2]


def test_corrupt_checkpoint_is_a_clear_error(trained, tmp_path):
  workdir = str(tmp_path / "copy")
  shutil.copytree(trained[0], workdir)
  item = os.path.join(workdir, "checkpoints", "8", "default")
  for root, _, names in os.walk(item):
    for name in names:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")
  with pytest.raises(checkpointing.CheckpointError, match="checkpoints/8"):
    train_lib.train_and_evaluate(trained[1], workdir)


def test_eval_reads_the_run_and_names_its_file(trained, tmp_path):
  workdir = str(tmp_path / "copy")
  shutil.copytree(trained[0], workdir)
  last = files.read_jsonl(os.path.join(workdir, "eval_history.jsonl"))[-1]
  assert last["step"] == 8
  # No config: the run's own. Its validation numbers are the run's last validation eval.
  same = evaluate.evaluate(None, workdir)
  assert same["loss"] == pytest.approx(last["loss"], rel=1e-6)
  assert same["sequence_accuracy"] == last["sequence_accuracy"]
  # The training command's own config with different training-loop fields: ignored.
  loop = train_helpers.load_config("tiny", {"train.num_steps": 99, "train.learning_rate": 1.0})
  assert evaluate.evaluate(loop, workdir)["loss"] == same["loss"]
  # The test split at the selected step is what the summary reports.
  test = evaluate.evaluate(None, workdir, split="test", step=trained[2]["selected_step"])
  assert test["loss"] == trained[2]["test_loss"]
  assert os.path.isfile(os.path.join(workdir, f"eval_test_L48_step{test['step']}.json"))
  # A model or task field that differs from the run is an error naming it.
  for override, field in (
    ({"model.embed_dim": 32}, "model.embed_dim: run 16, given 32"),
    ({"model.attention": "dpa"}, "model.attention"),
    ({"task.num_rules": 3}, "task.num_rules"),
  ):
    with pytest.raises(provenance.ProvenanceError, match=field):
      evaluate.evaluate(train_helpers.load_config("tiny", override), workdir)
  # Another length writes its own file; the length-48 result stays.
  path48 = os.path.join(workdir, "eval_validation_L48.json")
  before = open(path48).read()
  result = evaluate.evaluate(None, workdir, seq_len=56)
  assert result["seq_len"] == 56 and len(result["per_position_accuracy"]) == 56
  assert result["step"] == 8
  assert files.read_json(os.path.join(workdir, "eval_validation_L56.json")) == result
  assert open(path48).read() == before
  # In the next-token layout a rollout that gets a whole sequence right fed back the true tokens,
  # and a teacher-forced sequence that is right feeds back the same: the two rates are equal.
  assert result["rollout_sequence_accuracy"] == result["sequence_accuracy"]


def test_rollout_feeds_predictions_back_at_scored_positions():
  V, L = 5, 7
  # A "model" that predicts (token + 1) mod V at every position.
  apply_fn = lambda params, tokens: jax.nn.one_hot((tokens + 1) % V, V)
  inputs = np.array([[0, 3, 3, 3, 3, 3, 3], [2, 2, 0, 0, 0, 0, 0]], np.int32)
  weights = np.array([[0, 1, 1, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1]], np.float32)
  targets = np.roll(inputs, -1, axis=1)
  batch = data_lib.Batch(jnp.asarray(inputs), jnp.asarray(targets), jnp.asarray(weights))
  got = np.asarray(evaluate.rollout_predictions(apply_fn, None, batch))
  # Reference: walk left to right; a scored position's prediction becomes the next input.
  tokens = inputs.copy()
  for t in range(L - 1):
    for b in range(2):
      if weights[b, t] > 0:
        tokens[b, t + 1] = (tokens[b, t] + 1) % V
  np.testing.assert_array_equal(got, (tokens + 1) % V)
