"""Tests of the task families, the registry and the ladders.

Every ladder level is sampled and checked by an independent, plain-Python checker per family that
re-derives each scored target from the input sequence and decides by its own route which positions
are determined; the sampler's weights must agree with it.
"""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ea_jax import tasks
from ea_jax.tasks import ladders, recurrence

CHECK_BATCH = 64  # rows re-derived in plain Python per level (a study training batch)


@pytest.fixture(autouse=True, scope="module")
def _quick_compilation():
  """Compiles this module's many small sampling programs with XLA optimisations off (results are
  identical; compilation dominates the runtime otherwise)."""
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)


def _all_levels():
  return [
    (name, i, cfg) for name in tasks.ladder_names() for i, cfg in enumerate(tasks.ladder(name))
  ]


# Each ladder's draws are compiled once per test process (`_split_draws`); `make test` runs with
# `--dist loadgroup`, so every test of one ladder runs in the process that drew it.
LEVELS = [
  pytest.param(name, i, cfg, id=f"{name}-{i}", marks=pytest.mark.xdist_group(name))
  for name, i, cfg in _all_levels()
]
LADDERS = [pytest.param(n, id=n, marks=pytest.mark.xdist_group(n)) for n in tasks.ladder_names()]


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
      first_fail[rule] = next(
        (s for s in range(big_d, big_t) if x[s] != sum(x[s - d] for d in rule) % n), big_t
      )
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


def check_recall(task, x_BT):
  """Parses each row into associations and queries; scored = the value tokens after SEP."""
  w, p, k = task.key_width, task.num_pairs, task.num_keys
  sep = p * (w + 1)
  expected = np.zeros((x_BT.shape[0], x_BT.shape[1] - 1))
  for b, row in enumerate(x_BT.tolist()):
    assert row[sep] == task.sep_id and row.count(task.sep_id) == 1
    items = [tuple(row[i : i + w + 1]) for i in range(0, sep, w + 1)]
    table = {item[:w]: item[w] for item in items}
    assert len(table) == p, "keys must be distinct"
    assert len(set(table.values())) == p, "values must be distinct"
    assert all(0 <= t < k for key in table for t in key)
    assert all(k <= v < k + task.num_values for v in table.values())
    if task.conjunctive:  # neither token alone fixes the value
      for pos in range(2):
        by_token = {}
        for key, v in table.items():
          by_token.setdefault(key[pos], set()).add(v)
        assert all(len(vs) >= 2 for vs in by_token.values()), (pos, by_token)
    queries = row[sep + 1 :]
    assert len(queries) == task.num_queries * (w + 1)
    for i in range(0, len(queries), w + 1):
      key, value = tuple(queries[i : i + w]), queries[i + w]
      assert table[key] == value
    for t in range(sep + 1, len(row) - 1):  # target x_{t+1} is a value token in the query part
      if row[t + 1] >= k:
        expected[b, t] = 1.0
  return expected


def check_induction(task, x_BT):
  """Brute force over every start of the context: which starts match the copy so far."""
  n, m = task.context_len, task.copy_len
  expected = np.zeros((x_BT.shape[0], x_BT.shape[1] - 1))
  for b, row in enumerate(x_BT.tolist()):
    c, copy = row[:n], row[n + 1 :]
    assert row[n] == task.sep_id and task.sep_id not in c + copy and len(copy) == m
    assert any(c[k : k + m] == copy for k in range(n - m + 1))
    for j in range(m):
      candidates = [k for k in range(n - m + 1) if c[k : k + j] == copy[:j]]
      predictions = {c[k + j] for k in candidates}
      if len(predictions) == 1:
        assert predictions == {copy[j]}
        expected[b, n + j] = 1.0  # target index of x_{n+1+j}
  return expected


def check_selective_copy(task, x_BT):
  """The tokens after MARK must be the non-blank region tokens in order; all of them scored."""
  expected = np.zeros((x_BT.shape[0], x_BT.shape[1] - 1))
  for b, row in enumerate(x_BT.tolist()):
    mark = row.index(task.mark_id)
    assert mark == task.region_len and row.count(task.mark_id) == 1
    data = [t for t in row[:mark] if t != task.blank_id]
    assert len(data) == task.num_data and row[mark + 1 :] == data
    expected[b, mark:] = 1.0
  return expected


def check_modular(task, x_BT):
  """Walks each row keeping the running sum; every token after EQ must equal it."""
  expected = np.zeros((x_BT.shape[0], x_BT.shape[1] - 1))
  for b, row in enumerate(x_BT.tolist()):
    total, since_eq, t = 0, 0, 0
    while t < len(row):
      if row[t] == task.eq_id:
        assert since_eq == task.block_len
        assert row[t + 1] == total % task.num_symbols
        expected[b, t] = 1.0
        since_eq, t = 0, t + 2
      else:
        total, since_eq, t = total + row[t], since_eq + 1, t + 1
    assert since_eq == 0
  return expected


def check_dyck(task, x_BT):
  """Stack simulation; a target is determined iff no opening bracket would be admissible there
  (depth limit, or too few positions left to close everything) and so the top must close."""
  k, big_d = task.num_types, task.max_depth
  big_t = x_BT.shape[1]
  expected = np.zeros((x_BT.shape[0], big_t - 1))
  for b, row in enumerate(x_BT.tolist()):
    stack = []
    for s, tok in enumerate(row):
      remaining_after = big_t - s - 1
      can_open = len(stack) < big_d and len(stack) + 1 <= remaining_after
      if stack and not can_open and s > 0:
        expected[b, s - 1] = 1.0
        assert tok == k + stack[-1]
      if tok < k:
        stack.append(tok)
        assert len(stack) <= big_d
      else:
        assert stack and stack[-1] == tok - k, (b, s)
        stack.pop()
    assert not stack or big_t % 2
  return expected


CHECKERS = {
  "recurrence": lambda task, x: check_recurrence(task, x)[0],
  "recall": check_recall,
  "induction": check_induction,
  "selective_copy": check_selective_copy,
  "modular": check_modular,
  "dyck": check_dyck,
}
MIN_SCORED_FRACTION = {
  "recurrence": 0.6,
  "recall": 0.08,
  "induction": 0.08,
  "selective_copy": 0.15,
  "modular": 0.1,
  "dyck": 0.07,
}


def _sequences(batch):
  inputs, targets = np.asarray(batch.inputs), np.asarray(batch.targets)
  np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])  # next-token layout
  return np.concatenate([inputs, targets[:, -1:]], axis=1)


# ------------------------------------------------------------------------------------------------
# Every ladder level
# ------------------------------------------------------------------------------------------------


def test_ladders_are_ordered_and_described():
  names = tasks.ladder_names()
  for required in (
    "recurrence",
    "recurrence_rules",
    "recall",
    "recall_conjunctive",
    "induction",
    "selective_copy",
    "modular",
    "dyck",
  ):
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


def _ladder_samples(name):
  """(tasks, the first and the second training batch of the study's stream) per level of ladder
  `name` (see `_split_draws`: one compilation per ladder)."""
  level_tasks, draws = _split_draws(name)
  step = lambda d, i: tasks.Batch(*(np.asarray(a)[i] for a in d["study"]))
  return (level_tasks, [step(d, 0) for d in draws], [step(d, 1) for d in draws])


@pytest.mark.parametrize("name,index,cfg", LEVELS)
def test_level_sampling_and_scoring(name, index, cfg):
  level_tasks, first, other = _ladder_samples(name)
  task, batch = level_tasks[index], first[index]
  assert task == tasks.make_task(cfg)
  # Another key gives other sequences (at most a few coincide on the smallest levels).
  x, y = _sequences(batch), _sequences(other[index])
  assert overlap_count(x, y) < CHECK_BATCH // 4

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


@pytest.mark.parametrize("name", LADDERS)
def test_checkers_reject_a_corrupted_scored_target(name):
  """The checkers can fail: changing one scored target of a valid row is caught."""
  level_tasks, first, _ = _ladder_samples(name)
  task, batch = level_tasks[0], first[0]
  x_BT = _sequences(batch)[:4].copy()
  t = int(np.argmax(batch.weights[0]))  # first scored target of row 0 is x[0, t + 1]
  x_BT[0, t + 1] = (x_BT[0, t + 1] + 1) % task.vocab_size
  with pytest.raises((AssertionError, KeyError, ValueError)):
    CHECKERS[task.family](task, x_BT)


@pytest.mark.xdist_group("recurrence")
def test_sampling_inside_a_larger_jit_matches_direct_sampling():
  from ea_jax import data

  level_tasks, first, _ = _ladder_samples("recurrence")
  direct = level_tasks[0].sample(
    jax.random.fold_in(data.stream_key(0, "train"), 0), CHECK_BATCH, "train"
  )
  for a, b in zip(direct, first[0]):
    np.testing.assert_array_equal(np.asarray(a), b)


# ------------------------------------------------------------------------------------------------
# Recurrence specifics
# ------------------------------------------------------------------------------------------------


def _recurrence_cfg(**overrides):
  cfg = dict(
    name="recurrence",
    num_symbols=5,
    num_rules=3,
    max_delay=4,
    num_delays=2,
    seq_len=24,
    rule_seed=0,
  )
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


def test_recurrence_rules_are_distinct_deterministic_and_nested():
  task = tasks.make_task(_recurrence_cfg(num_rules=6))
  assert len(set(task.rule_delays)) == 6 == math.comb(4, 2)
  assert all(len(r) == 2 and all(1 <= d <= 4 for d in r) for r in task.rule_delays)
  small = tasks.make_task(_recurrence_cfg(num_rules=3))
  assert task.rule_delays[:3] == small.rule_delays
  seeds = {tasks.make_task(_recurrence_cfg(num_rules=3, rule_seed=s)).rule_delays for s in range(6)}
  assert len(seeds) > 1
  many = recurrence.draw_rules(40, max_delay=30, num_delays=3, rule_seed=1)
  assert len(set(many)) == 40


def test_recurrence_uses_every_rule_and_explicit_rules():
  task = tasks.make_task(_recurrence_cfg(num_rules=6, num_symbols=7))
  batch = task.sample(jax.random.key(3), 128)
  _, seen = check_recurrence(task, _sequences(batch))
  assert seen == set(task.rule_delays)

  explicit = tasks.make_task(
    _recurrence_cfg(num_rules=2, max_delay=2, num_delays=1, rules=((1,), (2,)))
  )
  assert explicit.rule_delays == ((1,), (2,))
  batch = explicit.sample(jax.random.key(4), 32)
  np.testing.assert_array_equal(
    np.asarray(batch.weights), check_recurrence(explicit, _sequences(batch))[0]
  )


def test_recurrence_weights_on_worked_example():
  """The module docstring's example: rules copy x_{s-1} or x_{s-2}; x = 3 1 3 1 3 1."""
  task = tasks.make_task(
    _recurrence_cfg(
      num_symbols=5, num_rules=2, max_delay=2, num_delays=1, seq_len=5, rules=((1,), (2,))
    )
  )
  x = jax.numpy.asarray([[3, 1, 3, 1, 3, 1]])
  scored = recurrence.scored_targets(x, jax.numpy.asarray(task.coefficients_RD()), 5)
  np.testing.assert_array_equal(np.asarray(scored[0]), [False, False, True, True, True])


def test_tasks_compare_by_their_dials():
  task = tasks.make_task(tasks.default_task())
  same = tasks.make_task(dict(tasks.default_task()))
  assert task == same and hash(task) == hash(same)  # a jit cache key: equal dials, one program
  assert task != tasks.make_task(tasks.ladder("recurrence")[1])
  assert task != tasks.make_task({**dict(tasks.default_task()), "split_fractions": (0.7, 0.2, 0.1)})


def test_sample_accepts_traced_and_legacy_keys():
  task = tasks.make_task(tasks.default_task())
  key = jax.random.key(5)
  traced = jax.jit(lambda k: task.sample(jax.random.fold_in(k, 0), 8, "test"))(key)
  direct = task.sample(jax.random.fold_in(key, 0), 8, "test")
  np.testing.assert_array_equal(np.asarray(traced.inputs), np.asarray(direct.inputs))
  raw = task.sample(jax.random.PRNGKey(5), 8)  # legacy uint32 keys work too
  np.testing.assert_array_equal(np.asarray(task.split_of(_sequences(raw))), 0)
  with pytest.raises(ValueError, match="batch_size"):
    task.sample(key, 0)
  with pytest.raises(ValueError, match=r"split='dev'; allowed: \('train', 'validation', 'test'\)"):
    task.sample(key, 8, "dev")


@pytest.mark.parametrize(
  "overrides,match",
  [
    (dict(num_symbols=1), r"num_symbols=1.*integer >= 2"),
    (dict(num_symbols=2.5), r"num_symbols=2.5"),
    (dict(max_delay=24), r"seq_len=24 is too short for max_delay=24.*integer >= 25"),
    (dict(max_delay=6, seq_len=1), r"recurrence.seq_len=1 is too short.*integer >= 7"),
    (dict(num_delays=5), r"num_delays=5.*\[1, 4\]"),
    (dict(num_rules=7), r"num_rules=7 exceeds the 6 distinct rules.*\[1, 6\]"),
    (dict(num_rules=0), r"num_rules=0"),
    (dict(num_rules=2, rules=((1, 2), (2, 1))), r"duplicate rules \[\(1, 2\)\]"),
    (dict(num_rules=2, rules=((1, 2),)), r"rules has 1 rules but num_rules=2"),
    (dict(num_rules=1, rules=((1, 5),)), r"rules contains \(1, 5\).*\[1, max_delay=4\]"),
    (dict(num_symbol=5), r"unknown field\(s\) \['num_symbol'\].*'num_symbols'"),
    (dict(name="recurence"), r"task.name='recurence'.*'recurrence'"),
  ],
)
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


@pytest.mark.parametrize(
  "cfg,match",
  [
    (dict(name="recall", num_pairs=5, conjunctive=True), r"recall.num_pairs=5.*even"),
    (dict(name="recall", num_pairs=8, num_values=4), r"recall.num_values=4.*>= 8"),
    (dict(name="recall", num_pairs=8, num_keys=4), r"recall.num_keys=4.*>= 8"),
    (dict(name="recall", conjunctive=1), r"recall.conjunctive=1.*True or False"),
    (dict(name="induction", context_len=4, copy_len=8), r"induction.context_len=4.*>= 8"),
    (dict(name="induction", num_symbols=1), r"induction.num_symbols=1"),
    (dict(name="selective_copy", region_len=3, num_data=4), r"selective_copy.region_len=3"),
    (dict(name="modular", block_len=0), r"modular.block_len=0.*>= 1"),
    (dict(name="dyck", max_depth=30, seq_len=47), r"dyck.seq_len=47.*>= 59.*\[1, 24\]"),
    (dict(name="dyck", num_types=1), r"dyck.num_types=1.*>= 2"),
    (
      dict(name="modular", split_fractions=(0.8, 0.1, 0.2)),
      r"modular.split_fractions=.*sums "
      r"to 1.1; allowed: 3 positive numbers",
    ),
    (
      dict(name="modular", split_fractions=(0.9, 0.1, 0.0)),
      r"modular.split_fractions=.*3 "
      r"positive numbers",
    ),
    (dict(name="modular", split_fractions=(0.5, 0.5)), r"modular.split_fractions=\(0.5, 0.5\)"),
    (
      dict(name="recall", num_keys=4, num_values=4, num_pairs=2, num_queries=2),
      r"recall.split_fractions=\(0.8, 0.1, 0.1\) leaves split 'test' empty: this level has only "
      r"4 split keys",
    ),
    (dict(name="dyck", num_type=2), r"unknown field\(s\) \['num_type'\].*'num_types'"),
  ],
)
def test_other_families_bad_config(cfg, match):
  with pytest.raises(ValueError, match=match):
    tasks.make_task(ml_collections.ConfigDict(cfg))


@pytest.mark.parametrize(
  "family,cfg,x,weights",
  [
    (
      "recall",
      dict(
        num_keys=4, num_values=4, num_pairs=2, num_queries=2, split_fractions=(0.5, 0.25, 0.25)
      ),  # 4 split keys: one per query pair
      [2, 5, 0, 7, 8, 0, 7, 2, 5],
      [0, 0, 0, 0, 0, 1, 0, 1],
    ),
    (
      "induction",
      dict(num_symbols=3, context_len=6, copy_len=3),
      [1, 2, 1, 0, 2, 1, 3, 1, 0, 2],
      [0, 0, 0, 0, 0, 0, 0, 0, 1],
    ),
    (
      "selective_copy",
      dict(num_symbols=4, region_len=5, num_data=2),
      [4, 2, 4, 4, 0, 5, 2, 0],
      [0, 0, 0, 0, 0, 1, 1],
    ),
    (
      "modular",
      dict(num_symbols=5, block_len=2, num_blocks=2),
      [3, 4, 5, 2, 1, 1, 5, 4],
      [0, 0, 1, 0, 0, 0, 1],
    ),
    ("dyck", dict(num_types=2, max_depth=2, seq_len=5), [0, 1, 3, 1, 3, 2], [0, 1, 0, 1, 1]),
  ],
)
def test_worked_examples_of_module_docstrings(family, cfg, x, weights):
  """The docstring examples, checked by the independent checkers (layout and weights)."""
  task = tasks.make_task(dict(name=family, **cfg))
  assert len(x) == task.seq_len + 1 and max(x) < task.vocab_size
  np.testing.assert_array_equal(CHECKERS[family](task, np.asarray([x])), [weights])


# ------------------------------------------------------------------------------------------------
# TFDS: frozen splits written as ArrayRecord and read back through tfds.data_source
# ------------------------------------------------------------------------------------------------


def test_tfds_config_names():
  from ea_jax.tasks import tfds_builder

  assert tfds_builder.builder_config_name("recurrence", 2) == "recurrence-2"
  names = [c.name for c in tfds_builder.EaLadder.BUILDER_CONFIGS]
  expected = [tfds_builder.builder_config_name(name, i) for name, i, _ in _all_levels()]
  assert names == expected and len(set(names)) == len(names)
  top = len(tasks.ladder("recurrence")) - 1
  with pytest.raises(ValueError, match=rf"level_index={top + 1}.*\[0, {top}\]"):
    tfds_builder.builder_config_name("recurrence", top + 1)
  with pytest.raises(ValueError, match="ladder name='nope'"):
    tfds_builder.builder_config_name("nope", 0)
  with pytest.raises(ValueError, match="TFDS config 'recurrence-99' is not known"):
    tfds_builder.load_split("recurrence-99", "test", "/nonexistent")
  with pytest.raises(ValueError, match=r"split='dev'.*'validation'"):
    tfds_builder.load_split("recurrence-0", "dev", "/nonexistent")
  with pytest.raises(ValueError, match="split_sizes"):
    tfds_builder.make_config("recurrence", 0, split_sizes={"train": 4})


def test_tfds_round_trip(tmp_path, monkeypatch):
  from ea_jax.tasks import tfds_builder

  sizes = {"train": 24, "validation": 8, "test": 8}
  config = tfds_builder.make_config("dyck", 1, split_sizes=sizes, seed=3)
  assert config.name == "dyck-1-n24.8.8-s3"
  task = tasks.make_task(config.task)
  loaded = {}
  for split, n in sizes.items():
    arrays = tfds_builder.load_split(config, split, tmp_path)
    fresh = tfds_builder.generate_split(config.task, split, n, seed=3)
    assert sorted(arrays) == ["inputs", "targets", "weights"]
    for field, dtype in (("inputs", np.int32), ("targets", np.int32), ("weights", np.float32)):
      assert arrays[field].dtype == dtype and arrays[field].shape == (n, task.seq_len)
      np.testing.assert_array_equal(arrays[field], fresh[field])
    x_BT = np.concatenate([arrays["inputs"], arrays["targets"][:, -1:]], axis=1)
    np.testing.assert_array_equal(arrays["weights"], check_dyck(task, x_BT))
    loaded[split] = arrays
  # The prepared splits are pairwise disjoint and each lies in its own part of the level.
  x = {s: np.concatenate([a["inputs"], a["targets"][:, -1:]], axis=1) for s, a in loaded.items()}
  for i, a in enumerate(tasks.SPLITS):
    np.testing.assert_array_equal(np.asarray(task.split_of(x[a])), i)
    for b in tasks.SPLITS[i + 1 :]:
      assert overlap_count(x[a], x[b]) == 0, (a, b)
  prepared = tmp_path / "ea_ladder" / config.name / tfds_builder.DATASET_VERSION
  assert list(prepared.glob("*array_record*"))

  def no_generation(*args, **kwargs):
    raise AssertionError("the prepared dataset should be read, not generated again")

  monkeypatch.setattr(tfds_builder, "generate_split", no_generation)
  again = tfds_builder.load_split(config, "test", tmp_path)
  np.testing.assert_array_equal(again["inputs"], loaded["test"]["inputs"])


# ------------------------------------------------------------------------------------------------
# Splits: train, validation and test share no sequence
# ------------------------------------------------------------------------------------------------

STUDY_BUDGET = (600, 64)  # steps x batch of a sample of a study run (configs/sweep.py draws
# 4000 x 32; the split is a function of the sequence, so a larger draw checks the same rule)
DEFAULT_BUDGET = (3000, 32)  # configs/default.py: steps x batch
EVAL_DRAW = 2048  # validation and test sequences drawn per level (fewer if the split
# has fewer distinct sequences)
CHECKED_ROWS = 48  # rows per split re-derived by the plain-Python checkers


def _rows(x_NT):
  """The rows of an int array as a set of bytes (exact sequence identity)."""
  x_NT = np.ascontiguousarray(x_NT, dtype=np.int32)
  return {r.tobytes() for r in x_NT}


def overlap_count(a_NT, b_MT):
  """How many distinct rows of `b_MT` occur verbatim in `a_NT`."""
  return len(_rows(a_NT) & _rows(b_MT))


def _full(batch):
  inputs, targets = np.asarray(batch.inputs), np.asarray(batch.targets)
  return np.concatenate(
    [inputs.reshape(-1, inputs.shape[-1]), targets.reshape(-1, targets.shape[-1])[:, -1:]], axis=1
  )


@functools.cache
def _split_draws(name):
  """Per level of ladder `name`: the study budget's training stream (seed 0, keys as ea_jax.data
  derives them), EVAL_DRAW validation and test sequences (seed 1, the generator source's distinct
  eval draw); the default config's training stream for the default task's level. All levels of a
  ladder are drawn by one jit (one compilation per ladder)."""
  from ea_jax import data

  level_tasks = [tasks.make_task(cfg) for cfg in tasks.ladder(name)]
  train_key = data.stream_key(0, "train")

  def stream(task, steps, batch):
    keys = jax.vmap(lambda s: jax.random.fold_in(train_key, s))(jnp.arange(steps))
    return jax.vmap(lambda k: task.sample(k, batch, "train"))(keys)

  def held_out(task, split):
    n = min(EVAL_DRAW, task.num_split_keys(split))
    return task.sample_distinct(data.stream_key(1, split), jnp.arange(n), split)

  def draw_level(task):
    out = {
      "study": stream(task, *STUDY_BUDGET),
      "validation": held_out(task, "validation"),
      "test": held_out(task, "test"),
    }
    if task == tasks.make_task(tasks.default_task()):
      out["default"] = stream(task, *DEFAULT_BUDGET)
    return out

  draws = jax.device_get(jax.jit(lambda: [draw_level(t) for t in level_tasks])())
  return level_tasks, draws


@pytest.mark.parametrize("name,index,cfg", LEVELS)
def test_splits_share_no_sequence_at_the_training_budgets(name, index, cfg):
  level_tasks, draws = _split_draws(name)
  task, batches = level_tasks[index], draws[index]
  assert task == tasks.make_task(cfg)
  x = {k: _full(b) for k, b in batches.items()}
  assert x["study"].shape == (STUDY_BUDGET[0] * STUDY_BUDGET[1], task.seq_len + 1)
  for train in [k for k in ("study", "default") if k in x]:
    for held_out in ("validation", "test"):
      assert overlap_count(x[train], x[held_out]) == 0, (train, held_out)
  assert overlap_count(x["validation"], x["test"]) == 0
  # Evaluation draws hold no repetition.
  for split in ("validation", "test"):
    assert len(x[split]) == min(EVAL_DRAW, task.num_split_keys(split))
    assert len(_rows(x[split])) == len(x[split])
  # Every split's sequences are valid sequences of the family with the sampler's weights (the
  # plain-Python checkers are slow: CHECKED_ROWS rows per split).
  for key in ("study", "validation", "test"):
    rows = x[key][:CHECKED_ROWS]
    weights = np.asarray(batches[key].weights).reshape(-1, task.seq_len)[:CHECKED_ROWS]
    np.testing.assert_array_equal(weights, CHECKERS[task.family](task, rows))
  if (name, index) == (ladders.DEFAULT_LADDER, ladders.DEFAULT_LEVEL):
    assert x["default"].shape == (DEFAULT_BUDGET[0] * DEFAULT_BUDGET[1], task.seq_len + 1)


def test_overlap_counter_finds_shared_sequences():
  """Meta-test: with the splits deliberately shared (validation drawn from the train split) the
  counter reports the repeats that a set computation over the raw rows finds."""
  task = tasks.make_task(tasks.ladder("recurrence")[0])  # 3277 training prefixes
  train = _full(task.sample(jax.random.key(0), 4096, "train"))
  shared = _full(task.sample(jax.random.key(1), 512, "train"))
  found = overlap_count(train, shared)
  brute = len({tuple(r) for r in shared.tolist()} & {tuple(r) for r in train.tolist()})
  assert found == brute and found > 100
  mixed = np.concatenate([_full(task.sample(jax.random.key(2), 64, "validation")), shared[:5]])
  assert overlap_count(train, mixed) == len(
    {tuple(r) for r in shared[:5].tolist()} & {tuple(r) for r in train.tolist()}
  )


THIRDS = (1 / 3, 1 / 3, 1 / 3)
HALF = (0.5, 0.25, 0.25)
# Tiny levels whose every sequence can be enumerated: (config, per-position token ranges of a
# superset of the family's sequences, which the checker then filters).
TINY_LEVELS = {
  "recurrence": (
    dict(
      name="recurrence",
      num_symbols=3,
      num_rules=2,
      max_delay=2,
      num_delays=1,
      seq_len=5,
      split_fractions=THIRDS,
    ),
    [range(3)] * 6,
  ),
  "recall": (
    dict(name="recall", num_keys=2, num_values=2, num_pairs=2, num_queries=2, split_fractions=HALF),
    [range(2), range(2, 4)] * 2 + [range(4, 5)] + [range(2), range(2, 4)] * 2,
  ),
  "induction": (
    dict(name="induction", num_symbols=2, context_len=4, copy_len=2, split_fractions=HALF),
    [range(2)] * 4 + [range(2, 3)] + [range(2)] * 2,
  ),
  "selective_copy": (
    dict(name="selective_copy", num_symbols=3, region_len=3, num_data=1, split_fractions=THIRDS),
    [range(4)] * 3 + [range(4, 5), range(3)],
  ),
  "modular": (
    dict(name="modular", num_symbols=2, block_len=1, num_blocks=3, split_fractions=HALF),
    [range(2), range(2, 3), range(2)] * 3,
  ),
  "dyck": (
    dict(name="dyck", num_types=2, max_depth=2, seq_len=5, split_fractions=HALF),
    [range(4)] * 6,
  ),
}


def _valid(task, x):
  try:
    CHECKERS[task.family](task, np.asarray([x]))
  except (AssertionError, KeyError, ValueError, IndexError):
    return False
  return True


@pytest.mark.parametrize("family", sorted(TINY_LEVELS))
def test_num_sequences_matches_brute_force_enumeration(family):
  """Every string of a superset, filtered by the family's checker, is the family's support; its
  members by `split_of` are each split, whose size must be `num_sequences(split)`; sampling a
  split many times must find exactly those sequences (and nothing else)."""
  import itertools

  cfg, ranges = TINY_LEVELS[family]
  task = tasks.make_task(cfg)
  assert len(ranges) == task.seq_len + 1
  support = np.asarray([x for x in itertools.product(*ranges) if _valid(task, x)], np.int32)
  split_of = np.asarray(task.split_of(support))
  assert sum(task.num_sequences(s) for s in tasks.SPLITS) == len(support)
  for i, split in enumerate(tasks.SPLITS):
    members = _rows(support[split_of == i])
    assert task.num_sequences_is_exact(split)
    assert task.num_sequences(split) == len(members), split
    drawn = _full(task.sample(jax.random.key(i), 200 * len(members), split))
    assert _rows(drawn) == members, split


def test_conjunctive_recall_count_matches_exhaustive_sampling():
  """Conjunctive recall is too large to enumerate by strings (2304 sequences); sampling 40 times
  a split's size must find exactly num_sequences(split) distinct valid sequences."""
  task = tasks.make_task(
    dict(
      name="recall",
      num_keys=2,
      num_values=4,
      num_pairs=4,
      num_queries=1,
      conjunctive=True,
      split_fractions=HALF,
    )
  )
  assert [task.num_sequences(s) for s in tasks.SPLITS] == [1152, 576, 576]
  seen = set()
  for i, split in enumerate(tasks.SPLITS):
    drawn = _full(task.sample(jax.random.key(i), 40 * task.num_sequences(split), split))
    check_recall(task, drawn[:256])
    rows = _rows(drawn)
    assert len(rows) == task.num_sequences(split) and not rows & seen
    seen |= rows
