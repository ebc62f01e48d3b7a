"""Text: character-level language modelling on real text, the rung beyond the synthetic ladder.

A sequence is a window of `seq_len + 1` consecutive characters of one split's text, starting at
a uniformly drawn offset; every position is scored (weights all 1.0: the next character is the
target, and loss is what matters, not 100% accuracy). The ladder dial is the context length
`seq_len`.

Corpora (`corpus`):
  "shakespeare"  the `ea_shakespeare` TFDS dataset under `data_dir` (`make lm-data` prepares it;
                 see `shakespeare_builder`): splits disjoint by work (validation: Macbeth,
                 Twelfth Night, the Sonnets; test: Othello, As You Like It, The Rape of Lucrece).
  "files"        local UTF-8 files: `text_files` (train), `validation_files`, `test_files`,
                 each a comma-separated list of paths; one file belongs to one split only.
  "tfds"         a TFDS text dataset already prepared under `data_dir` (e.g. `tiny_shakespeare`,
                 `lm1b`): `tfds_name`, the example field `tfds_text_key`, and `tfds_splits`, the
                 TFDS split names (slicing allowed) used as train, validation, test, e.g.
                 "train,test[:50%],test[50%:]" for lm1b, which has no validation split. Its
                 splits are whatever the dataset defines (tiny_shakespeare's are contiguous
                 slices of one text, not separate works).
A split's text is its documents (works, files or examples) in order, joined by `SEPARATOR`.

Vocabulary: the sorted set of characters over all three splits (Unicode code points; the
Shakespeare corpus has 84, all ASCII). `task.vocabulary[i]` is token i; `encode` / `decode`
convert. `num_sequences(split)` = number of distinct window offsets = len(split text) - seq_len.

Sampling is pure JAX: the split's tokens are a constant of the jitted sampler, and the windows
are a function of (key, split) alone.

Letters: B batch, L sequence length (= seq_len), T = L + 1 drawn characters.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ea_jax.tasks import base, splits

FAMILY = "text"
CORPORA = ("shakespeare", "files", "tfds")
SPLITS = ("train", "validation", "test")
SEPARATOR = "\n\n"  # between documents of one split
DEFAULT_DATA_DIR = "workdirs/lm_data"  # relative to the working directory (`make lm-data`)


class Corpus(NamedTuple):
  vocabulary: str  # token i is vocabulary[i]
  tokens: dict  # split -> 1-D numpy array (uint8 if the vocabulary fits, else int32)
  documents: dict  # split -> tuple of document names (works, paths or example indices)


def _split_list(paths: str) -> tuple[str, ...]:
  return tuple(p.strip() for p in paths.split(",") if p.strip())


def _read_files(field: str, paths: str) -> list[tuple[str, str]]:
  docs = []
  for path in _split_list(paths):
    if not os.path.isfile(path):
      raise ValueError(
        f"{FAMILY}.{field}: {path!r} is not a file; allowed: comma-separated "
        "paths of UTF-8 text files"
      )
    with open(path, encoding="utf-8") as f:
      docs.append((path, f.read()))
  if not docs:
    raise ValueError(
      f"{FAMILY}.{field}={paths!r}; allowed: one or more comma-separated paths "
      "(corpus='files' needs text_files, validation_files and test_files)"
    )
  return docs


def _files_documents(text_files, validation_files, test_files) -> dict:
  fields = {
    "train": ("text_files", text_files),
    "validation": ("validation_files", validation_files),
    "test": ("test_files", test_files),
  }
  seen = {}
  for split, (field, paths) in fields.items():
    for path in _split_list(paths):
      real = os.path.realpath(path)
      if real in seen and seen[real] != split:
        raise ValueError(
          f"{FAMILY}.{field}: {path!r} is also in the {seen[real]} split; "
          "allowed: each file in one split only"
        )
      seen[real] = split
  return {split: _read_files(field, paths) for split, (field, paths) in fields.items()}


def _shakespeare_documents(data_dir) -> dict:
  from ea_jax.tasks import shakespeare_builder  # imports tensorflow_datasets: only when used

  path = os.path.join(os.path.abspath(data_dir), shakespeare_builder.DATASET_NAME)
  manual = os.path.join(
    os.path.abspath(data_dir), "downloads", "manual", shakespeare_builder.TARBALL
  )
  if not os.path.isdir(path) and not os.path.isfile(manual):
    raise ValueError(
      f"{FAMILY}.data_dir={data_dir!r} holds no prepared {path!r} and no "
      f"{manual!r}; run `make lm-data` (python -m "
      "ea_jax.tasks.shakespeare_prepare --data_dir=...) first"
    )
  return {
    split: [(e["work"], e["text"]) for e in shakespeare_builder.load_split(split, data_dir)]
    for split in SPLITS
  }


def _tfds_documents(name, data_dir, text_key, tfds_splits) -> dict:
  import tensorflow_datasets as tfds  # only when used

  names = _split_list(tfds_splits)
  if len(names) != 3:
    raise ValueError(
      f"{FAMILY}.tfds_splits={tfds_splits!r}; allowed: three comma-separated TFDS "
      "split names (train, validation, test), e.g. 'train,validation,test'"
    )
  out = {}
  for split, tfds_split in zip(SPLITS, names):
    ds = tfds.load(name, split=tfds_split, data_dir=data_dir or None, download=False)
    docs = []
    for i, example in enumerate(tfds.as_numpy(ds)):
      if text_key not in example:
        raise ValueError(
          f"{FAMILY}.tfds_text_key={text_key!r} is not a field of {name!r}; "
          f"allowed: {sorted(example)}"
        )
      value = example[text_key]
      docs.append(
        (f"{tfds_split}[{i}]", value.decode("utf-8") if isinstance(value, bytes) else str(value))
      )
    out[split] = docs
  return out


def _code_points(text: str) -> np.ndarray:
  return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


@functools.lru_cache(maxsize=8)
def load_corpus(
  corpus: str,
  data_dir: str,
  text_files: str,
  validation_files: str,
  test_files: str,
  tfds_name: str,
  tfds_text_key: str,
  tfds_splits: str,
) -> Corpus:
  """Reads and tokenises the three splits of a corpus (cached: one read per process)."""
  if corpus == "shakespeare":
    documents = _shakespeare_documents(data_dir)
  elif corpus == "files":
    documents = _files_documents(text_files, validation_files, test_files)
  else:
    documents = _tfds_documents(tfds_name, data_dir, tfds_text_key, tfds_splits)
  texts = {s: SEPARATOR.join(text for _, text in documents[s]) for s in SPLITS}
  points = {s: _code_points(t) for s, t in texts.items()}
  vocab_points = np.unique(np.concatenate(list(points.values())))
  dtype = np.uint8 if vocab_points.size <= 256 else np.int32
  tokens = {s: np.searchsorted(vocab_points, p).astype(dtype) for s, p in points.items()}
  vocabulary = "".join(chr(c) for c in vocab_points)
  return Corpus(vocabulary, tokens, {s: tuple(n for n, _ in documents[s]) for s in SPLITS})


@dataclasses.dataclass(frozen=True)
class TextTask(base.TaskBase):
  """Random character windows of one split of a text corpus; see the module docstring."""

  seq_len: int = 64  # context length (the ladder dial)
  corpus: str = "shakespeare"  # "shakespeare", "files" or "tfds"
  data_dir: str = DEFAULT_DATA_DIR  # TFDS data directory (corpus "shakespeare" / "tfds")
  text_files: str = ""  # corpus "files": training files, comma-separated
  validation_files: str = ""  # corpus "files": validation files
  test_files: str = ""  # corpus "files": test files
  tfds_name: str = ""  # corpus "tfds": dataset name, e.g. "tiny_shakespeare"
  tfds_text_key: str = "text"  # corpus "tfds": the example field holding text
  tfds_splits: str = "train,validation,test"  # corpus "tfds": TFDS splits for train,val,test

  family = FAMILY

  def __post_init__(self):
    f = FAMILY
    object.__setattr__(self, "seq_len", base.check_int(f, "seq_len", self.seq_len, 1))
    if self.corpus not in CORPORA:
      raise ValueError(f"{f}.corpus={self.corpus!r}; allowed: {CORPORA}")
    for name in (
      "data_dir",
      "text_files",
      "validation_files",
      "test_files",
      "tfds_name",
      "tfds_text_key",
      "tfds_splits",
    ):
      if not isinstance(getattr(self, name), str):
        raise ValueError(f"{f}.{name}={getattr(self, name)!r}; allowed: a string")
    if self.corpus == "tfds" and not self.tfds_name:
      raise ValueError(
        f"{f}.tfds_name is empty; corpus='tfds' needs a TFDS dataset name, e.g. 'tiny_shakespeare'"
      )
    for split in SPLITS:
      n = self.tokens(split).size
      if n <= self.seq_len:
        raise ValueError(
          f"{f}.seq_len={self.seq_len}: the {split} split has only {n} "
          f"characters; allowed: seq_len < {n}"
        )

  @property
  def _corpus(self) -> Corpus:
    return load_corpus(
      self.corpus,
      self.data_dir,
      self.text_files,
      self.validation_files,
      self.test_files,
      self.tfds_name,
      self.tfds_text_key,
      self.tfds_splits,
    )

  @property
  def vocabulary(self) -> str:
    return self._corpus.vocabulary

  @property
  def vocab_size(self) -> int:
    return len(self.vocabulary)

  def documents(self, split: str) -> tuple[str, ...]:
    """Names of the documents (works, files, examples) of `split`, in order."""
    return self._corpus.documents[_check_split(split)]

  def tokens(self, split: str) -> np.ndarray:
    """The whole tokenised text of `split` (1-D numpy array)."""
    return self._corpus.tokens[_check_split(split)]

  def num_sequences(self, split: str = "train") -> int:
    """Distinct windows of `split`: one per start offset, len(text) - seq_len."""
    return int(self.tokens(split).size) - self.seq_len

  def encode(self, text: str) -> np.ndarray:
    """int32 tokens of `text`; a character outside the vocabulary is an error naming it."""
    points = _code_points(text)
    vocab_points = _code_points(self.vocabulary)
    idx = np.minimum(np.searchsorted(vocab_points, points), vocab_points.size - 1)
    bad = vocab_points[idx] != points
    if bad.any():
      chars = sorted({chr(c) for c in points[bad]})
      raise ValueError(
        f"text has character(s) {chars} outside the corpus vocabulary; allowed: {self.vocabulary!r}"
      )
    return idx.astype(np.int32)

  def decode(self, tokens) -> str:
    """The text of a 1-D sequence of tokens."""
    return "".join(self.vocabulary[int(t)] for t in np.asarray(tokens).reshape(-1))

  def sample(self, rng: jax.Array, batch_size: int, split: str = "train") -> base.Batch:
    """`batch_size` windows of `split`; pure and jit-able (`batch_size`, `split` static)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
      raise ValueError(f"batch_size={batch_size!r}; allowed: a positive Python int")
    return _jitted_sample(self, rng, batch_size, _check_split(split))

  def window_starts(self, rng: jax.Array, batch_size: int, split: str = "train") -> jax.Array:
    """int32 [B]: the start offsets `sample(rng, batch_size, split)` uses."""
    return jax.random.randint(rng, (batch_size,), 0, self.num_sequences(split), jnp.int32)

  def num_split_keys(self, split: str) -> int:
    """Distinct sequences `sample_distinct` can draw from `split` (= num_sequences)."""
    return self.num_sequences(split)

  def sample_distinct(self, rng: jax.Array, index_B: jax.Array, split: str = "train") -> base.Batch:
    """Windows at distinct start offsets: index i -> a keyed permutation of the split's offsets
    (distinct indices give distinct windows; used for evaluation sets and finite training sets)."""
    split = _check_split(split)
    n = self.num_sequences(split)
    keys = tuple(jax.random.bits(rng, (splits.ROUNDS,), jnp.uint32))
    start_B = splits.permute(jnp.asarray(index_B, jnp.int32) % n, n, keys)
    tokens_N = jnp.asarray(self.tokens(split))
    x_BT = tokens_N[start_B[:, None] + jnp.arange(self.seq_len + 1, dtype=jnp.int32)[None, :]]
    return base.next_token_batch(x_BT, jnp.ones((start_B.shape[0], self.seq_len), bool))

  def _sample(self, rng, batch_size, split="train"):
    start_B = self.window_starts(rng, batch_size, split)
    tokens_N = jnp.asarray(self.tokens(split))
    x_BT = tokens_N[start_B[:, None] + jnp.arange(self.seq_len + 1, dtype=jnp.int32)[None, :]]
    return base.next_token_batch(x_BT, jnp.ones((batch_size, self.seq_len), bool))


def _check_split(split: str) -> str:
  if split not in SPLITS:
    raise ValueError(f"split={split!r}; allowed: {SPLITS}")
  return split


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def _jitted_sample(task, rng, batch_size, split):
  return task._sample(rng, batch_size, split)  # pylint: disable=protected-access
