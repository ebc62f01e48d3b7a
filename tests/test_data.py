"""Data sources: npz validation errors, deterministic (seed, step) batches, fixed eval sets."""

import math

import jax
import numpy as np
import pytest
import train_helpers

from ea_jax import data, sharding, tasks


def _arrays(n=6, length=5, vocab=7, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.integers(0, vocab, (n, length + 1)).astype(np.int32)
  w = np.ones((n, length), np.float32)
  w[:, 0] = 0
  return {"inputs": x[:, :-1], "targets": x[:, 1:], "weights": w}


def _save(tmp_path, name, arrays):
  path = str(tmp_path / name)
  np.savez(path, **arrays)
  return path


def test_valid_npz_loads_and_infers_vocab(tmp_path):
  arrays = _arrays()
  arrays["inputs"] = arrays["inputs"].astype(np.int64)  # any integer dtype is accepted
  batch, vocab = data.load_npz(_save(tmp_path, "ok.npz", arrays), field="f")
  assert vocab == max(arrays["inputs"].max(), arrays["targets"].max()) + 1
  assert batch.inputs.dtype == np.int32 and batch.weights.dtype == np.float32
  np.testing.assert_array_equal(batch.targets, arrays["targets"])
  _, vocab = data.load_npz(
    _save(tmp_path, "v.npz", {**arrays, "vocab_size": np.int32(50)}), field="f"
  )
  assert vocab == 50


@pytest.mark.parametrize(
  "mutate, message",
  [
    (lambda a: a.pop("weights"), r"missing array\(s\) \['weights'\]"),
    (lambda a: a.update(inputs=a["inputs"].astype(np.float32)), "'inputs' must have an integer"),
    (lambda a: a.update(targets=a["targets"][:, :, None]), "'targets' must have rank 2"),
    (lambda a: a.update(weights=a["weights"][:, :-1]), "must have the same shape"),
    (lambda a: a.update(weights=a["weights"] * 0.5), "must hold only 0 or 1"),
    (lambda a: a.update(weights=np.zeros_like(a["weights"])), "all zero"),
    (lambda a: a.update(weights=np.full_like(a["weights"], np.nan)), "NaN or Inf"),
    (lambda a: a.update(inputs=a["inputs"] - 10), "tokens must be >= 0"),
    (lambda a: a.update(vocab_size=np.int32(3)), r"out of the vocabulary \[0, 3\)"),
    (lambda a: a.update(vocab_size=np.float32(9.0)), "'vocab_size' must be a positive integer"),
    (
      lambda a: a.update(
        inputs=a["inputs"][:0], targets=a["targets"][:0], weights=a["weights"][:0]
      ),
      "is empty",
    ),
  ],
)
def test_npz_rejects_malformed_arrays(tmp_path, mutate, message):
  arrays = _arrays()
  mutate(arrays)
  path = _save(tmp_path, "bad.npz", arrays)
  with pytest.raises(ValueError, match=message) as info:
    data.load_npz(path, field="config.data.train_path")
  assert "config.data.train_path" in str(info.value)


def test_npz_file_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.data.eval_path"):
    data.load_npz(str(tmp_path / "nope.npz"), field="config.data.eval_path")
  junk = tmp_path / "junk.npz"
  junk.write_bytes(b"not a zip file")
  with pytest.raises(ValueError, match="not a readable .npz"):
    data.load_npz(str(junk), field="config.data.train_path")
  pickled = _save(tmp_path, "obj.npz", {**_arrays(), "inputs": np.array([None], object)})
  with pytest.raises(ValueError, match="not a readable .npz"):
    data.load_npz(pickled, field="config.data.train_path")
  with pytest.raises(ValueError, match="is empty"):
    data.load_npz("", field="config.data.train_path")


def test_eval_file_checked_against_training_vocab(tmp_path):
  arrays = _arrays(vocab=7)
  arrays["inputs"][0, 0] = 6
  with pytest.raises(ValueError, match=r"out of the vocabulary \[0, 5\)"):
    data.load_npz(_save(tmp_path, "e.npz", arrays), field="config.data.eval_path", vocab_size=5)


def test_array_batch_order_walks_per_epoch_permutations():
  n, bs = 10, 4
  flat = np.concatenate([data.array_batch_indices(3, s, bs, n) for s in range(5)])
  # Reference: example c is row perm(seed, epoch = c // n)[c % n], the permutations drawn by
  # numpy's generator seeded with (seed, epoch).
  perms = [np.random.default_rng([3, e]).permutation(n) for e in range(2)]
  np.testing.assert_array_equal(flat, np.concatenate(perms))
  assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
  # A later step alone (a resumed run) gives the rows of its place in the sequence.
  np.testing.assert_array_equal(data.array_batch_indices(3, 3, bs, n), flat[12:16])


def _one_device_sharding(batch_size):
  mesh = sharding.create_mesh({"data": -1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  return sharding.batch_sharding(mesh, sharding.logical_rules(), batch_size)


def _full(batch):
  inputs, targets = np.asarray(batch.inputs), np.asarray(batch.targets)
  return np.concatenate([inputs, targets[:, -1:]], axis=1)


def test_generator_batches_are_split_samples_at_folded_keys():
  config = train_helpers.load_config("tiny")
  src = data.make_source(config)
  task = tasks.make_task(config.task)
  sh = _one_device_sharding(4)
  got = src.train_batches(7, 4, sh)(5)
  want = task.sample(jax.random.fold_in(data.stream_key(7, "train"), 5), 4, "train")
  for g, w in zip(got, want):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
  np.testing.assert_array_equal(np.asarray(task.split_of(_full(got))), 0)
  val = src.eval_batches("validation", 7, 6, 4, sh)
  test = src.eval_batches("test", 7, 6, 4, sh)
  assert len(val) == 2
  # Eval rows are the distinct enumeration of their split for the eval seed's stream key.
  want_val = task.sample_distinct(data.stream_key(7, "validation"), np.arange(8), "validation")
  for b, rows in zip(val, (slice(0, 4), slice(4, 8))):
    np.testing.assert_array_equal(np.asarray(b.inputs), np.asarray(want_val.inputs)[rows])
  np.testing.assert_array_equal(np.asarray(task.split_of(_full(val[0]))), 1)
  np.testing.assert_array_equal(np.asarray(task.split_of(_full(test[0]))), 2)
  # Padding: rows 6, 7 of the 8 drawn carry no weight; the others keep the task's weights.
  np.testing.assert_array_equal(np.asarray(val[1].weights)[2:], 0.0)
  np.testing.assert_array_equal(np.asarray(val[1].weights)[:2], np.asarray(want_val.weights)[4:6])
  with pytest.raises(ValueError, match="config.eval.split='train'"):
    src.eval_batches("train", 7, 6, 4, sh)


def test_eval_set_larger_than_its_split_is_refused():
  config = train_helpers.load_config("tiny", {"task": tasks.ladder("recurrence")[0]})
  src = data.make_source(config)
  keys = src.task.num_split_keys("validation")  # 4**6 prefixes, 10% of them
  assert keys == round(0.9 * 4**6) - round(0.8 * 4**6)
  sh = _one_device_sharding(4)
  assert len(src.eval_batches("validation", 0, keys, 512, sh)) == math.ceil(keys / 512)
  with pytest.raises(
    ValueError,
    match=rf"config.eval.num_examples={keys + 1}: task level "
    rf"recurrence N=4 R=1 has only {keys} distinct validation sequences",
  ):
    src.eval_batches("validation", 0, keys + 1, 512, sh)


def test_npz_source_train_and_padded_eval(tmp_path):
  train = _arrays(n=6, seed=1)
  ev = _arrays(n=5, seed=2)
  config = train_helpers.load_config(
    "tiny",
    {
      "data.source": "npz",
      "data.train_path": _save(tmp_path, "t.npz", train),
      "data.eval_path": _save(tmp_path, "e.npz", ev),
      "data.test_path": _save(tmp_path, "x.npz", _arrays(n=3, seed=3)),
    },
  )
  src = data.make_source(config)
  assert src.seq_len == 5
  sh = _one_device_sharding(4)
  b = src.train_batches(0, 4, sh)(1)
  idx = data.array_batch_indices(0, 1, 4, 6)
  np.testing.assert_array_equal(np.asarray(b.inputs), train["inputs"][idx])
  batches = src.eval_batches("validation", 0, 100, 4, sh)
  assert src.eval_size("validation", 100) == 5 and len(batches) == 2
  np.testing.assert_array_equal(np.asarray(batches[1].inputs)[:1], ev["inputs"][4:5])
  np.testing.assert_array_equal(np.asarray(batches[1].weights)[1:], 0.0)


def test_unknown_source_rejected():
  config = train_helpers.load_config("tiny", {"data.source": "csv"})
  with pytest.raises(ValueError, match="config.data.source='csv'"):
    data.make_source(config)


def test_tfds_source_reads_frozen_level(tmp_path):
  from ea_jax.tasks import tfds_builder

  name = tfds_builder.builder_config_name("recurrence", 0)
  config = train_helpers.load_config(
    "tiny",
    {
      "data.source": "tfds",
      "data.tfds_config": name,
      "data.tfds_data_dir": str(tmp_path),
      "task": tasks.ladder("recurrence")[0],
    },
  )
  src = data.make_source(config, splits=("train", "validation"))
  assert src.vocab_size == tasks.make_task(config.task).vocab_size
  train = tfds_builder.load_split(name, "train", str(tmp_path))
  sh = _one_device_sharding(4)
  b = src.train_batches(0, 4, sh)(3)
  idx = data.array_batch_indices(0, 3, 4, train["inputs"].shape[0])
  np.testing.assert_array_equal(np.asarray(b.targets), train["targets"][idx])
  np.testing.assert_array_equal(np.asarray(b.weights), train["weights"][idx])
  with pytest.raises(ValueError, match="tfds_data_dir is empty"):
    data.make_source(
      train_helpers.load_config("tiny", {"data.source": "tfds", "data.tfds_config": name})
    )


def test_npz_test_split_needs_its_own_file(tmp_path, caplog):
  paths = {
    k: _save(tmp_path, f"{k}.npz", _arrays(n=4, seed=i))
    for i, k in enumerate(("train", "val", "test"))
  }
  base = {"data.source": "npz", "data.train_path": paths["train"], "data.eval_path": paths["val"]}
  # Training needs no test file.
  data.make_source(train_helpers.load_config("tiny", base), splits=("train", "validation"))
  with pytest.raises(ValueError, match=r"config.data.test_path is empty.*test_path=eval_path"):
    data.make_source(train_helpers.load_config("tiny", base), splits=("test",))
  src = data.make_source(
    train_helpers.load_config("tiny", {**base, "data.test_path": paths["test"]})
  )
  np.testing.assert_array_equal(src.evals["test"].inputs, _arrays(n=4, seed=2)["inputs"])
  np.testing.assert_array_equal(src.evals["validation"].inputs, _arrays(n=4, seed=1)["inputs"])
  with caplog.at_level("WARNING"):
    same = data.make_source(
      train_helpers.load_config("tiny", {**base, "data.test_path": paths["val"]})
    )
  assert "test split is the validation split" in caplog.text
  np.testing.assert_array_equal(same.evals["test"].inputs, same.evals["validation"].inputs)


def test_npz_rows_shared_with_training_are_counted(tmp_path, caplog):
  train = _arrays(n=6, seed=1)
  ev = {k: v[[0, 2, 4]] for k, v in train.items()}  # three training rows
  config = train_helpers.load_config(
    "tiny",
    {
      "data.source": "npz",
      "data.train_path": _save(tmp_path, "t.npz", train),
      "data.eval_path": _save(tmp_path, "e.npz", ev),
    },
  )
  with caplog.at_level("WARNING"):
    data.make_source(config, splits=("train", "validation"))
  assert "config.data.eval_path shares 3 of its 3 sequences" in caplog.text


def test_finite_training_set_repeats_in_epochs_of_distinct_sequences():
  config = train_helpers.load_config("tiny", {"data.train_size": 10})
  src = data.make_source(config, splits=("train",))
  sh = _one_device_sharding(4)
  get = src.train_batches(3, 4, sh)
  x = np.concatenate([_full(get(step)) for step in range(10)])  # 40 rows = 4 epochs of 10
  epochs = [x[i : i + 10] for i in range(0, 40, 10)]
  first = {tuple(r) for r in epochs[0].tolist()}
  assert len(first) == 10  # distinct sequences
  for e in epochs[1:]:
    assert {tuple(r) for r in e.tolist()} == first  # each epoch is the same set, reordered
  assert not np.array_equal(epochs[0], epochs[1])
  np.testing.assert_array_equal(np.asarray(src.task.split_of(x)), 0)
  # Resume: a fresh source (a restarted process) gives step 7 the same batch.
  again = data.make_source(config, splits=("train",)).train_batches(3, 4, sh)(7)
  np.testing.assert_array_equal(np.asarray(again.inputs), x[28:32, :-1])
  # The streaming source draws (almost surely) more than 10 distinct sequences in 40 rows.
  stream = data.make_source(train_helpers.load_config("tiny"), splits=("train",))
  streamed = np.concatenate([_full(stream.train_batches(3, 4, sh)(s)) for s in range(10)])
  assert len({tuple(r) for r in streamed.tolist()}) > 10


@pytest.mark.parametrize(
  "size,match",
  [
    (-1, r"config.data.train_size=-1; allowed: 0 \(streaming\)"),
    (
      10**9,
      r"config.data.train_size=1000000000: task level recurrence N=5 R=2 has only "
      r"12500 distinct train sequences",
    ),
  ],
)
def test_bad_train_size(size, match):
  config = train_helpers.load_config("tiny", {"data.train_size": size})
  with pytest.raises(ValueError, match=match):
    data.make_source(config, splits=("train",))
