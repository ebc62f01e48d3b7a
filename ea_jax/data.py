"""Input pipeline: task generator | TFDS splits | .npz files -> global, sharded [B, L] batches.

Every batch is a pure function of (seed, step): the generator samples the task's "train" split
from `fold_in(stream_key(seed, "train"), step)` (or, with `config.data.train_size`, walks a fixed
set of that many distinct training sequences) inside a jit whose `out_shardings` is the batch
sharding; array sources (npz, TFDS) pick rows from a permutation seeded by (seed, epoch). A
resumed run therefore sees exactly the batches an uninterrupted one would, with no iterator state.

Evaluation sets are fixed: generator evaluation sets are distinct sequences of the task's
"validation" / "test" split, which share no sequence with "train" by construction
(`ea_jax.tasks.splits`); padded rows of the last eval batch carry zero weights.

Letters: B batch, L sequence length, N number of examples in a file.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from ea_jax import sharding as sharding_lib

SOURCES = ("generator", "tfds", "npz")
EVAL_SPLITS = ("validation", "test")
# Independent random streams derived from one seed.
STREAMS = {"train": 0, "validation": 1, "test": 2, "init": 3}


class Batch(NamedTuple):
  inputs: jax.Array  # int32 [B, L]
  targets: jax.Array  # int32 [B, L]
  weights: jax.Array  # float32 [B, L], 1.0 where a position is scored


def stream_key(seed: int, stream: str) -> jax.Array:
  """The PRNG key of one named stream ("train", "validation", "test", "init") of `seed`."""
  if stream not in STREAMS:
    raise ValueError(f"stream={stream!r}; allowed: {tuple(STREAMS)}")
  return jax.random.fold_in(jax.random.key(seed), STREAMS[stream])


# ------------------------------------------------------------------------------------------
# Validation of user arrays (npz files, TFDS splits)
# ------------------------------------------------------------------------------------------


def validate_arrays(
  arrays: Mapping[str, np.ndarray], *, name: str, vocab_size: int | None = None
) -> tuple[Batch, int]:
  """Checks arrays against the DESIGN .npz contract; returns (numpy Batch, vocab size).

  Args:
    arrays: mapping with `inputs`, `targets` (integer [N, L]), `weights` ([N, L], every value 0
      or 1) and optional scalar `vocab_size` (else max token + 1).
    name: what the arrays are (a path or split name), used in error messages.
    vocab_size: if given, tokens must lie below it (e.g. an eval file checked against the
      training vocabulary); a `vocab_size` stored in the arrays must not exceed it.
  """
  missing = [k for k in ("inputs", "targets", "weights") if k not in arrays]
  if missing:
    raise ValueError(
      f"{name}: missing array(s) {missing}; required: inputs, targets (int [N, L]), "
      f"weights (float [N, L]); optional: vocab_size (scalar); "
      f"found: {sorted(arrays)}"
    )
  out = {}
  for key in ("inputs", "targets", "weights"):
    a = np.asarray(arrays[key])
    if a.ndim != 2:
      raise ValueError(f"{name}: array '{key}' must have rank 2 [N, L], got shape {a.shape}")
    if a.shape[0] == 0 or a.shape[1] == 0:
      raise ValueError(f"{name}: array '{key}' is empty (shape {a.shape})")
    out[key] = a
  shapes = {k: v.shape for k, v in out.items()}
  if len(set(shapes.values())) != 1:
    raise ValueError(
      f"{name}: inputs, targets and weights must have the same shape [N, L], got {shapes}"
    )
  for key in ("inputs", "targets"):
    if not np.issubdtype(out[key].dtype, np.integer):
      raise ValueError(
        f"{name}: array '{key}' must have an integer dtype (int32), got {out[key].dtype}"
      )
  w = out["weights"]
  if not (
    np.issubdtype(w.dtype, np.floating) or np.issubdtype(w.dtype, np.integer) or w.dtype == np.bool_
  ):
    raise ValueError(f"{name}: array 'weights' must be float32 (0.0 or 1.0), got dtype {w.dtype}")
  w = w.astype(np.float64)
  if not np.all(np.isfinite(w)):
    raise ValueError(f"{name}: array 'weights' contains NaN or Inf")
  bad = np.abs(w - np.round(w)) > 1e-6
  bad |= (np.round(w) != 0) & (np.round(w) != 1)
  if bad.any():
    i, j = np.argwhere(bad)[0]
    raise ValueError(
      f"{name}: array 'weights' must hold only 0 or 1 (scored or not); found "
      f"{w[i, j]!r} at [{i}, {j}] ({int(bad.sum())} bad values)"
    )
  if not (np.round(w) > 0).any():
    raise ValueError(f"{name}: array 'weights' is all zero: no position is scored")

  lo = min(int(out["inputs"].min()), int(out["targets"].min()))
  hi = max(int(out["inputs"].max()), int(out["targets"].max()))
  if lo < 0:
    raise ValueError(f"{name}: tokens must be >= 0, found {lo}")
  stored = arrays.get("vocab_size") if hasattr(arrays, "get") else None
  if stored is not None:
    stored = np.asarray(stored)
    if stored.ndim != 0 or not np.issubdtype(stored.dtype, np.integer) or int(stored) <= 0:
      raise ValueError(
        f"{name}: 'vocab_size' must be a positive integer scalar, got "
        f"{stored!r} (dtype {stored.dtype}, shape {stored.shape})"
      )
    stored = int(stored)
    if vocab_size is not None and stored > vocab_size:
      raise ValueError(f"{name}: vocab_size={stored} exceeds the model's vocabulary {vocab_size}")
  vocab = vocab_size if vocab_size is not None else stored if stored is not None else hi + 1
  limit = stored if stored is not None else vocab
  if hi >= limit:
    which = "inputs" if int(out["inputs"].max()) == hi else "targets"
    raise ValueError(f"{name}: token {hi} in '{which}' is out of the vocabulary [0, {limit})")
  if hi >= np.iinfo(np.int32).max:
    raise ValueError(f"{name}: token {hi} does not fit int32")
  batch = Batch(
    inputs=out["inputs"].astype(np.int32),
    targets=out["targets"].astype(np.int32),
    weights=np.round(w).astype(np.float32),
  )
  return batch, int(vocab)


def load_npz(path: str, *, field: str, vocab_size: int | None = None) -> tuple[Batch, int]:
  """Reads and validates one .npz file (see `validate_arrays`). `field` names the config entry."""
  if not path:
    raise ValueError(f"{field} is empty: config.data.source='npz' needs a path to a .npz file")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{field}={path!r}: no such file")
  try:
    with np.load(path, allow_pickle=False) as f:
      arrays = {k: f[k] for k in f.files}
  except Exception as e:  # np.load raises several types for non-npz or pickled content
    raise ValueError(f"{field}={path!r} is not a readable .npz file of plain arrays: {e}") from e
  return validate_arrays(arrays, name=f"{field}={path!r}", vocab_size=vocab_size)


def array_batch_indices(seed: int, step: int, batch_size: int, num_examples: int) -> np.ndarray:
  """Row indices of training batch `step`: consecutive slices of per-epoch permutations.

  Example `c = step * batch_size + i` is row `perm(seed, c // N)[c % N]`, so the order is a
  function of (seed, step) alone and every row is seen once per epoch.
  """
  c = step * batch_size + np.arange(batch_size, dtype=np.int64)
  epochs, pos = np.divmod(c, num_examples)
  out = np.empty(batch_size, np.int64)
  for e in np.unique(epochs):
    perm = _epoch_permutation(seed, int(e), num_examples)
    sel = epochs == e
    out[sel] = perm[pos[sel]]
  return out


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(n)


def _pad_rows(batch: Batch, rows: int) -> Batch:
  """Pads a numpy batch to `rows` rows by repeating row 0 with zero weights."""
  extra = rows - batch.inputs.shape[0]
  if extra <= 0:
    return batch
  pad = lambda a, fill: np.concatenate([a, np.repeat(a[:1], extra, 0) * 0 + fill], 0)
  return Batch(pad(batch.inputs, 0), pad(batch.targets, 0), pad(batch.weights, 0.0))


def _to_global(batch: Batch, sharding) -> Batch:
  return Batch(*(sharding_lib.host_to_global(np.asarray(a), sharding) for a in batch))


# ------------------------------------------------------------------------------------------
# Sources
# ------------------------------------------------------------------------------------------


class GeneratorSource:
  """Samples a task (`ea_jax.tasks.make_task`) on device; batches are f(seed, step).

  Training batches come from the task's "train" split only: streaming (`train_size=0`), step
  `step` is `task.sample(fold_in(stream_key(seed, "train"), step), B, "train")`; with a finite
  training set (`train_size > 0`), sequence i of the set is `task.sample_distinct(stream_key(seed,
  "train"), [i], "train")` (all distinct) and steps walk through per-epoch permutations of the
  set (`array_batch_indices`). Evaluation sets are the first `num_examples` sequences of the
  split's distinct enumeration for `stream_key(seed, split)`: no repetition inside a set, and none
  across splits.
  """

  def __init__(self, task_config, train_size: int = 0):
    from ea_jax import tasks  # the tasks package imports lazily (keeps data.py light)

    self.task = tasks.make_task(task_config)
    self.level = _level_name(task_config)
    self.vocab_size = int(self.task.vocab_size)
    self.seq_len = int(self.task.seq_len)
    if isinstance(train_size, bool) or not isinstance(train_size, int) or train_size < 0:
      raise ValueError(
        f"config.data.train_size={train_size!r}; allowed: 0 (streaming) or a "
        "positive number of distinct training sequences"
      )
    if train_size > self.task.num_split_keys("train"):
      raise ValueError(self._too_small("train", train_size, "config.data.train_size"))
    self.train_size = train_size

  def _too_small(self, split: str, wanted: int, field: str) -> str:
    fractions = getattr(self.task, "split_fractions", None)  # the text task splits by document
    return (
      f"{field}={wanted}: task level {self.level} has only "
      f"{self.task.num_split_keys(split)} distinct {split} sequences that can be drawn "
      f"without repetition{'' if fractions is None else f' (split_fractions={fractions})'}; "
      "allowed: at most that many, or a larger level / split"
    )

  def train_batches(self, seed: int, batch_size: int, sharding) -> Callable[[int], Batch]:
    if not self.train_size:
      sample = _jitted_stream(self.task, batch_size, sharding)
      return lambda step: sample(np.int32(seed), np.uint32(step))
    sample = _jitted_indexed(self.task, "train", batch_size, sharding)
    n = self.train_size

    def get(step):
      idx = array_batch_indices(seed, int(step), batch_size, n).astype(np.int32)
      return sample(np.int32(seed), idx, np.int32(batch_size))

    return get

  def eval_size(self, split: str, num_examples: int) -> int:
    """How many examples `eval_batches(split, ..., num_examples, ...)` holds."""
    del split
    return num_examples

  def eval_batches(
    self, split: str, seed: int, num_examples: int, batch_size: int, sharding
  ) -> list[Batch]:
    if split not in EVAL_SPLITS:
      raise ValueError(f"config.eval.split={split!r}; allowed: {EVAL_SPLITS}")
    available = self.task.num_split_keys(split)
    if num_examples > available:
      raise ValueError(self._too_small(split, num_examples, "config.eval.num_examples"))
    sample = _jitted_indexed(self.task, split, batch_size, sharding)
    batches = []
    for i in range(math.ceil(num_examples / batch_size)):
      # Rows past num_examples are padding (zero weights); keep their indices in range.
      idx = (i * batch_size + np.arange(batch_size)) % available
      batches.append(
        sample(np.int32(seed), idx.astype(np.int32), np.int32(num_examples - i * batch_size))
      )
    return batches


def _level_name(task_config) -> str:
  get = task_config.get if hasattr(task_config, "get") else lambda k, d=None: d
  label = get("label", None)
  return f"{get('name', '?')} {label}" if label else repr(get("name", "?"))


def _mask_rows(b, batch_size: int, num_valid) -> Batch:
  keep_B1 = (jnp.arange(batch_size) < num_valid)[:, None]
  return Batch(
    jnp.asarray(b.inputs, jnp.int32),
    jnp.asarray(b.targets, jnp.int32),
    jnp.where(keep_B1, jnp.asarray(b.weights, jnp.float32), 0.0),
  )


@functools.lru_cache(maxsize=16)
def _jitted_stream(task, batch_size: int, sharding) -> Callable:
  """jit(seed, step) -> the streaming training batch with `sharding`."""

  @functools.partial(jax.jit, out_shardings=Batch(sharding, sharding, sharding))
  def sample(seed, step):
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), STREAMS["train"]), step)
    return _mask_rows(task.sample(key, batch_size, "train"), batch_size, batch_size)

  return sample


@functools.lru_cache(maxsize=16)
def _jitted_indexed(task, split: str, batch_size: int, sharding) -> Callable:
  """jit(seed, index_B, num_valid) -> distinct sequences `index_B` of `split`; rows at or beyond
  `num_valid` get zero weights. The key is derived inside the jit from plain integers, so every
  process computes the same batch."""

  @functools.partial(jax.jit, out_shardings=Batch(sharding, sharding, sharding))
  def sample(seed, index_B, num_valid):
    key = jax.random.fold_in(jax.random.key(seed), STREAMS[split])
    return _mask_rows(task.sample_distinct(key, index_B, split), batch_size, num_valid)

  return sample


class ArraySource:
  """In-memory arrays (npz files or TFDS splits): train rows by (seed, epoch) permutation."""

  def __init__(self, train: Batch | None, evals: Mapping[str, Batch], vocab_size: int):
    self.train = train
    self.evals = dict(evals)
    self.vocab_size = int(vocab_size)
    any_batch = train if train is not None else next(iter(self.evals.values()))
    self.seq_len = int(any_batch.inputs.shape[1])

  def train_batches(self, seed: int, batch_size: int, sharding) -> Callable[[int], Batch]:
    if self.train is None:
      raise ValueError("no training arrays were loaded")
    n = self.train.inputs.shape[0]

    def get(step):
      idx = array_batch_indices(seed, int(step), batch_size, n)
      return _to_global(Batch(*(a[idx] for a in self.train)), sharding)

    return get

  def eval_size(self, split: str, num_examples: int) -> int:
    """How many examples `eval_batches(split, ..., num_examples, ...)` holds."""
    return min(num_examples, self.evals[split].inputs.shape[0])

  def eval_batches(
    self, split: str, seed: int, num_examples: int, batch_size: int, sharding
  ) -> list[Batch]:
    del seed  # eval files are used in their stored order
    if split not in self.evals:
      raise ValueError(f"no evaluation arrays for split {split!r}; have {sorted(self.evals)}")
    data = self.evals[split]
    n = min(num_examples, data.inputs.shape[0])
    batches = []
    for start in range(0, n, batch_size):
      stop = min(start + batch_size, n)
      b = _pad_rows(Batch(*(a[start:stop] for a in data)), batch_size)
      batches.append(_to_global(b, sharding))
    return batches


def _tfds_vocab_size(name: str, raw: Mapping[str, Mapping[str, np.ndarray]]) -> int:
  """The frozen level's task vocabulary; else the largest token over the loaded splits + 1."""
  import ml_collections

  from ea_jax import tasks
  from ea_jax.tasks import tfds_builder

  for c in tfds_builder.EaLadder.BUILDER_CONFIGS:
    if c.name == name and c.task:
      return int(tasks.make_task(ml_collections.ConfigDict(dict(c.task))).vocab_size)
  return 1 + max(max(int(np.max(r["inputs"])), int(np.max(r["targets"]))) for r in raw.values())


def _npz_source(config, splits, vocab_size):
  """Train from `train_path`, validation from `eval_path`, test from `test_path`.

  Validation and test from one file is refused unless `test_path` is set to `eval_path`
  explicitly (then a warning says that they coincide); rows a held-out file shares with the
  training file are counted in a warning.
  """
  train, vocab = None, vocab_size
  if "train" in splits:
    train, vocab = load_npz(
      config.data.train_path, field="config.data.train_path", vocab_size=vocab_size
    )
  evals = {}
  for split, field in (("validation", "eval_path"), ("test", "test_path")):
    if split not in splits:
      continue
    path = config.data.get(field, "")
    if split == "test" and not path:
      raise ValueError(
        "config.data.test_path is empty: the npz source needs a test file of its "
        "own (config.data.eval_path is the validation file); allowed: a path to a "
        ".npz file, or test_path=eval_path to evaluate on the validation file"
      )
    if split == "test" and path == config.data.eval_path:
      logging.warning(
        "config.data.test_path == config.data.eval_path (%s): the test split is "
        "the validation split",
        path,
      )
    evals[split], ev_vocab = load_npz(path, field=f"config.data.{field}", vocab_size=vocab)
    vocab = vocab if vocab is not None else ev_vocab
    if train is not None:
      shared = len(_row_set(evals[split]) & _row_set(train))
      if shared:
        logging.warning(
          "config.data.%s shares %d of its %d sequences with config.data.train_path",
          field,
          shared,
          evals[split].inputs.shape[0],
        )
  return ArraySource(train, evals, vocab)


def _row_set(batch: Batch) -> set:
  """The distinct (inputs, last target) rows of a numpy batch, as bytes."""
  x = np.concatenate([batch.inputs, batch.targets[:, -1:]], axis=1).astype(np.int32)
  return {r.tobytes() for r in np.ascontiguousarray(x)}


def make_source(config, *, splits=("train",) + EVAL_SPLITS, vocab_size: int | None = None):
  """The data source named by `config.data.source`.

  Args:
    config: the experiment ConfigDict (uses `data`, `task`).
    splits: which splits to load for array sources ("train", "validation", "test").
    vocab_size: the model's vocabulary if already fixed (evaluation of a trained model); array
      tokens are checked against it.
  """
  source = config.data.source
  if source == "generator":
    src = GeneratorSource(config.task, train_size=config.data.get("train_size", 0))
    if vocab_size is not None and src.vocab_size > vocab_size:
      raise ValueError(
        f"config.task has vocab_size {src.vocab_size} but the trained model's "
        f"vocabulary is {vocab_size}"
      )
    return src
  if source == "npz":
    return _npz_source(config, splits, vocab_size)
  if source == "tfds":
    from ea_jax.tasks import tfds_builder

    name = config.data.tfds_config
    if not name:
      raise ValueError(
        "config.data.tfds_config is empty: name a builder config, e.g. "
        "tfds_builder.builder_config_name('recurrence', 2) = 'recurrence-2'"
      )
    if not config.data.tfds_data_dir:
      raise ValueError(
        "config.data.tfds_data_dir is empty: give the TFDS data directory (the "
        "level is prepared there if missing)"
      )
    raw = {s: tfds_builder.load_split(name, s, config.data.tfds_data_dir) for s in splits}
    if vocab_size is None:
      vocab_size = _tfds_vocab_size(name, raw)
    checked = {
      s: validate_arrays(r, name=f"tfds {name}/{s}", vocab_size=vocab_size)[0]
      for s, r in raw.items()
    }
    return ArraySource(
      checked.get("train"), {s: checked[s] for s in EVAL_SPLITS if s in checked}, vocab_size
    )
  raise ValueError(f"config.data.source={source!r}; allowed: {SOURCES}")
