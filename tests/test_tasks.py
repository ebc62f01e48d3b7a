"""Tests of the task families, the registry and the ladders.

Every ladder level is sampled and checked by an independent, plain-Python checker per family that
re-derives each scored target from the input sequence and decides by its own route which positions
are determined; the sampler's weights must agree with it.
"""
import math

import jax
import ml_collections
import numpy as np
import pytest

from ea_jax import tasks
from ea_jax.tasks import recurrence

CHECK_BATCH = 64  # rows re-derived in plain Python per level


def _all_levels():
  return [(name, i, cfg) for name in tasks.ladder_names()
          for i, cfg in enumerate(tasks.ladder(name))]


LEVELS = _all_levels()
LEVEL_IDS = [f"{name}-{i}" for name, i, _ in LEVELS]


# ------------------------------------------------------------------------------------------------
# Independent checkers: each returns the expected weights [B, L] (0/1) and raises on a wrong target.
# ------------------------------------------------------------------------------------------------


def check_recurrence(task, x_BT):
  """Brute force over the rule set: for each rule, the first position it fails to reproduce."""
  n, big_d = task.num_symbols, task.max_delay
  b_size, big_t = x_BT.shape
  expected = np.zeros((b_size, big_t - 1))
  rules_seen = set()
  for b in range(b_size):
    x = [int(v) for v in x_BT[b]]
    first_fail = {}
    for rule in task.rule_delays:
      first_fail[rule] = next((s for s in range(big_d, big_t)
                               if x[s] != sum(x[s - d] for d in rule) % n), big_t)
    followed = [r for r in task.rule_delays if first_fail[r] == big_t]
    assert followed, f"row {b} follows none of the rules {task.rule_delays}"
    rules_seen.update(followed)
    for s in range(big_d, big_t):
      consistent = [r for r in task.rule_delays if first_fail[r] >= s]
      predictions = {sum(x[s - d] for d in r) % n for r in consistent}
      if len(predictions) == 1:
        assert predictions == {x[s]}
        expected[b, s - 1] = 1.0
  return expected, rules_seen


CHECKERS = {"recurrence": lambda task, x: check_recurrence(task, x)[0]}
MIN_SCORED_FRACTION = {"recurrence": 0.6}


def _sequences(batch):
  inputs, targets = np.asarray(batch.inputs), np.asarray(batch.targets)
  np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])  # next-token layout
  return np.concatenate([inputs, targets[:, -1:]], axis=1)


# ------------------------------------------------------------------------------------------------
# Every ladder level
# ------------------------------------------------------------------------------------------------


def test_ladders_are_ordered_and_described():
  names = tasks.ladder_names()
  for required in ("recurrence", "recurrence_rules"):
    assert required in names
  for name in names:
    levels = tasks.ladder(name)
    assert len(levels) >= 6, name
    complexities = [lvl.complexity for lvl in levels]
    assert all(isinstance(c, float) for c in complexities)
    assert complexities == sorted(complexities) and len(set(complexities)) == len(levels), name
    assert all(isinstance(lvl.label, str) and lvl.label for lvl in levels)
    assert len({lvl.label for lvl in levels}) == len(levels)
  with pytest.raises(ValueError, match="recurrence"):
    tasks.ladder("recurence")


def test_default_task_is_a_recurrence_ladder_level():
  cfg = tasks.default_task()
  assert cfg.name == "recurrence"
  assert cfg.to_dict() in [lvl.to_dict() for lvl in tasks.ladder("recurrence")]


@pytest.mark.parametrize("name,index,cfg", LEVELS, ids=LEVEL_IDS)
def test_level_sampling_and_scoring(name, index, cfg):
  del name, index
  task = tasks.make_task(cfg)
  key = jax.random.key(17)
  batch = task.sample(key, CHECK_BATCH)
  again = task.sample(key, CHECK_BATCH)
  other = task.sample(jax.random.key(18), CHECK_BATCH)
  for a, b in zip(batch, again):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.array_equal(np.asarray(batch.inputs), np.asarray(other.inputs))

  assert isinstance(batch, tasks.Batch)
  for arr, dtype in zip(batch, (np.int32, np.int32, np.float32)):
    assert arr.shape == (CHECK_BATCH, task.seq_len) and arr.dtype == dtype
  for arr in (batch.inputs, batch.targets):
    assert int(arr.min()) >= 0 and int(arr.max()) < task.vocab_size
  weights = np.asarray(batch.weights)
  assert set(np.unique(weights)) <= {0.0, 1.0}
  assert weights.mean() >= MIN_SCORED_FRACTION[cfg.name], weights.mean()

  expected = CHECKERS[cfg.name](task, _sequences(batch))
  np.testing.assert_array_equal(weights, expected)


# ------------------------------------------------------------------------------------------------
# Recurrence specifics
# ------------------------------------------------------------------------------------------------


def _recurrence_cfg(**overrides):
  cfg = dict(name="recurrence", num_symbols=5, num_rules=3, max_delay=4, num_delays=2, seq_len=24,
             rule_seed=0)
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


def test_recurrence_rules_are_distinct_deterministic_and_nested():
  task = tasks.make_task(_recurrence_cfg(num_rules=6))
  assert len(set(task.rule_delays)) == 6 == math.comb(4, 2)
  assert all(len(r) == 2 and all(1 <= d <= 4 for d in r) for r in task.rule_delays)
  assert tasks.make_task(_recurrence_cfg(num_rules=6)).rule_delays == task.rule_delays
  small = tasks.make_task(_recurrence_cfg(num_rules=3))
  assert task.rule_delays[:3] == small.rule_delays
  seeds = {tasks.make_task(_recurrence_cfg(num_rules=3, rule_seed=s)).rule_delays
           for s in range(6)}
  assert len(seeds) > 1
  many = recurrence.draw_rules(40, max_delay=30, num_delays=3, rule_seed=1)
  assert len(set(many)) == 40


def test_recurrence_uses_every_rule_and_explicit_rules():
  task = tasks.make_task(_recurrence_cfg(num_rules=6, num_symbols=7))
  batch = task.sample(jax.random.key(3), 128)
  _, seen = check_recurrence(task, _sequences(batch))
  assert seen == set(task.rule_delays)

  explicit = tasks.make_task(_recurrence_cfg(num_rules=2, max_delay=2, num_delays=1,
                                             rules=((1,), (2,))))
  assert explicit.rule_delays == ((1,), (2,))
  batch = explicit.sample(jax.random.key(4), 32)
  np.testing.assert_array_equal(np.asarray(batch.weights),
                                check_recurrence(explicit, _sequences(batch))[0])


def test_recurrence_weights_on_worked_example():
  """The module docstring's example: rules copy x_{s-1} or x_{s-2}; x = 3 1 3 1 3 1."""
  task = tasks.make_task(_recurrence_cfg(num_symbols=5, num_rules=2, max_delay=2, num_delays=1,
                                         seq_len=5, rules=((1,), (2,))))
  x = jax.numpy.asarray([[3, 1, 3, 1, 3, 1]])
  scored = recurrence.scored_targets(x, jax.numpy.asarray(task.coefficients_RD()), 5)
  np.testing.assert_array_equal(np.asarray(scored[0]), [False, False, True, True, True])


def test_sample_is_jittable_and_hashable():
  task = tasks.make_task(tasks.default_task())
  assert hash(task) == hash(tasks.make_task(tasks.default_task()))
  key = jax.random.key(5)
  direct = task.sample(key, 8)
  jitted = jax.jit(task.sample, static_argnums=1)(key, 8)
  closed = jax.jit(lambda k: task.sample(jax.random.fold_in(k, 0), 8))(key)
  for a, b in zip(direct, jitted):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert closed.inputs.shape == (8, task.seq_len)
  raw = task.sample(jax.random.PRNGKey(5), 8)  # legacy uint32 keys work too
  assert raw.inputs.shape == (8, task.seq_len)
  with pytest.raises(ValueError, match="batch_size"):
    task.sample(key, 0)


@pytest.mark.parametrize("overrides,match", [
    (dict(num_symbols=1), r"num_symbols=1.*integer >= 2"),
    (dict(num_symbols=2.5), r"num_symbols=2.5"),
    (dict(max_delay=24), r"max_delay=24 must be < seq_len=24.*\[1, 23\]"),
    (dict(num_delays=5), r"num_delays=5.*\[1, 4\]"),
    (dict(num_rules=7), r"num_rules=7 exceeds the 6 distinct rules.*\[1, 6\]"),
    (dict(num_rules=0), r"num_rules=0"),
    (dict(num_rules=2, rules=((1, 2), (2, 1))), r"duplicate rules \[\(1, 2\)\]"),
    (dict(num_rules=2, rules=((1, 2),)), r"rules has 1 rules but num_rules=2"),
    (dict(num_rules=1, rules=((1, 5),)), r"rules contains \(1, 5\).*\[1, max_delay=4\]"),
    (dict(num_symbol=5), r"unknown field\(s\) \['num_symbol'\].*'num_symbols'"),
    (dict(name="recurence"), r"task.name='recurence'.*'recurrence'"),
])
def test_recurrence_bad_config(overrides, match):
  with pytest.raises(ValueError, match=match):
    tasks.make_task(_recurrence_cfg(**overrides))


def test_make_task_requires_name_and_ignores_descriptions():
  with pytest.raises(ValueError, match="no 'name' field"):
    tasks.make_task(ml_collections.ConfigDict(dict(num_symbols=5)))
  plain = tasks.make_task(_recurrence_cfg())
  described = tasks.make_task(_recurrence_cfg(complexity=3.0, label="x"))
  assert plain == described
  assert tasks.make_task(dict(_recurrence_cfg())) == plain
