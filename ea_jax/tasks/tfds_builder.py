"""Frozen train/validation/test splits of every ladder level as a TFDS dataset (`ea_ladder`).

One `LadderConfig` (a `tfds.core.BuilderConfig`) per ladder level, named
`builder_config_name(ladder, level)`, e.g. "recurrence-2". Each split is drawn from its own part
of the level (`task.sample(..., split)`, see `ea_jax.tasks.splits`) with a fixed seed (chunk i of
split s uses `fold_in(fold_in(key(seed), s), i)`), checked to lie in that part, written as
ArrayRecord and read back without TensorFlow through `tfds.data_source`:

  arrays = load_split("recurrence-2", "test", "/tmp/tfds")   # prepares the level if missing
  arrays["inputs"].shape == (512, 48)

Examples carry `inputs`, `targets` (int32 [L]), `weights` (float32 [L]) and their generation
`index`; `load_split` returns the split in generation order. Default split sizes are small (see
`DEFAULT_SPLIT_SIZES`; preparing a level takes seconds); other sizes get their own config name
through `make_config(..., split_sizes=...)`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from ea_jax.tasks import ladders, registry

DATASET_NAME = "ea_ladder"
SPLITS = ("train", "validation", "test")
DEFAULT_SPLIT_SIZES = (("train", 4096), ("validation", 512), ("test", 512))
DEFAULT_SEED = 0
DATASET_VERSION = "2.0.0"
_CHUNK = 512  # examples sampled per jitted call while generating


def builder_config_name(ladder_name: str, level_index: int) -> str:
  """The BuilderConfig name of level `level_index` of ladder `ladder_name`, e.g. "recurrence-2"."""
  levels = ladders.ladder(ladder_name)  # raises for an unknown ladder
  if (
    isinstance(level_index, bool)
    or not isinstance(level_index, int)
    or not (0 <= level_index < len(levels))
  ):
    raise ValueError(
      f"level_index={level_index!r} for ladder {ladder_name!r}; allowed: an "
      f"integer in [0, {len(levels) - 1}]"
    )
  return f"{ladder_name}-{level_index}"


@dataclasses.dataclass(eq=False)
class LadderConfig(tfds.core.BuilderConfig):
  """One frozen task: `task` is the task config as a plain dict (name + dials)."""

  task: dict = dataclasses.field(default_factory=dict)
  split_sizes: tuple = DEFAULT_SPLIT_SIZES
  seed: int = DEFAULT_SEED


def make_config(
  ladder_name: str, level_index: int, *, split_sizes=None, seed: int = DEFAULT_SEED
) -> LadderConfig:
  """The config of a ladder level; non-default sizes or seed are spelled into its name."""
  name = builder_config_name(ladder_name, level_index)
  level = ladders.ladder(ladder_name)[level_index]
  sizes = _check_split_sizes(DEFAULT_SPLIT_SIZES if split_sizes is None else split_sizes)
  if sizes != DEFAULT_SPLIT_SIZES or seed != DEFAULT_SEED:
    name += f"-n{'.'.join(str(n) for _, n in sizes)}-s{seed}"
  task = {k: v for k, v in level.to_dict().items() if k not in registry.DESCRIPTIVE_FIELDS}
  description = f"{ladder_name}: {level.label} (complexity {level.complexity:.3f})"
  return LadderConfig(
    name=name,
    version=DATASET_VERSION,
    description=description,
    task=task,
    split_sizes=sizes,
    seed=seed,
  )


def _check_split_sizes(split_sizes) -> tuple:
  sizes = dict(split_sizes)
  if sorted(sizes) != sorted(SPLITS) or not all(
    isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in sizes.values()
  ):
    raise ValueError(f"split_sizes={split_sizes!r}; allowed: a positive int for each of {SPLITS}")
  return tuple((s, sizes[s]) for s in SPLITS)


def generate_split(
  task_config: Mapping[str, Any], split: str, num_examples: int, seed: int = DEFAULT_SEED
) -> dict[str, np.ndarray]:
  """The examples of `split` as numpy arrays [num_examples, L] (what the builder writes)."""
  if split not in SPLITS:
    raise ValueError(f"split={split!r}; allowed: {SPLITS}")
  task = registry.make_task(task_config)
  split_key = jax.random.fold_in(jax.random.key(seed), SPLITS.index(split))
  chunks = []
  for i in range(0, num_examples, _CHUNK):
    batch = task.sample(jax.random.fold_in(split_key, i // _CHUNK), _CHUNK, split)
    chunks.append(jax.device_get(batch))
  arrays = {
    field: np.concatenate([getattr(c, field) for c in chunks])[:num_examples]
    for field in ("inputs", "targets", "weights")
  }
  x_NT = np.concatenate([arrays["inputs"], arrays["targets"][:, -1:]], axis=1)
  wrong = np.asarray(task.split_of(x_NT)) != SPLITS.index(split)
  if wrong.any():  # cannot happen by construction; a prepared split is never written unchecked
    raise RuntimeError(
      f"{int(wrong.sum())} generated {split} sequences are not in the {split} split"
    )
  return arrays


class EaLadder(tfds.core.GeneratorBasedBuilder):
  """Frozen splits of the complexity-ladder tasks (one config per ladder level)."""

  VERSION = tfds.core.Version(DATASET_VERSION)
  RELEASE_NOTES = {
    "1.0.0": "Initial release.",
    "2.0.0": "Each split drawn from its own part of the level: disjoint splits.",
  }
  BUILDER_CONFIGS = [
    make_config(name, i)
    for name in ladders.ladder_names()
    for i in range(len(ladders.ladder(name)))
  ]

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # tfds 4.9.10 locates a builder's source through `importlib_resources`, which it only
    # declares for Python < 3.9; the answer it looks for is this file.
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    task = registry.make_task(self.builder_config.task)
    length = task.seq_len
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(
        {
          "index": tfds.features.Scalar(dtype=np.int64),
          "inputs": tfds.features.Tensor(shape=(length,), dtype=np.int32),
          "targets": tfds.features.Tensor(shape=(length,), dtype=np.int32),
          "weights": tfds.features.Tensor(shape=(length,), dtype=np.float32),
        }
      ),
      metadata=tfds.core.MetadataDict(
        vocab_size=task.vocab_size, seq_len=length, task=dict(self.builder_config.task)
      ),
      disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download: the data comes from the generators
    return {
      split: self._generate_examples(split, n) for split, n in self.builder_config.split_sizes
    }

  def _generate_examples(self, split, num_examples):
    cfg = self.builder_config
    arrays = generate_split(cfg.task, split, num_examples, cfg.seed)
    for i in range(num_examples):
      yield (
        i,
        {
          "index": i,
          "inputs": arrays["inputs"][i],
          "targets": arrays["targets"][i],
          "weights": arrays["weights"][i],
        },
      )


def _resolve_config(config) -> LadderConfig:
  if isinstance(config, LadderConfig):
    return config
  known = {c.name: c for c in EaLadder.BUILDER_CONFIGS}
  if config not in known:
    raise ValueError(
      f"TFDS config {config!r} is not known; allowed: names "
      "builder_config_name(ladder, level) gives, e.g. "
      f"{sorted(known)[:4]} ... ({len(known)} in all), or a LadderConfig"
    )
  return known[config]


def load_split(config_name, split: str, data_dir) -> dict[str, np.ndarray]:
  """Prepares `config_name` under `data_dir` if missing and reads `split` back.

  Args:
    config_name: a `builder_config_name(...)` or a `LadderConfig` (e.g. from `make_config`).
    split: "train", "validation" or "test".
    data_dir: the TFDS data directory.
  Returns:
    dict of numpy arrays `inputs`, `targets` (int32 [N, L]) and `weights` (float32 [N, L]) in
    generation order.
  """
  if split not in SPLITS:
    raise ValueError(f"split={split!r}; allowed: {SPLITS}")
  if not data_dir:
    raise ValueError(f"data_dir={data_dir!r}; allowed: a directory path")
  config = _resolve_config(config_name)
  source = tfds.data_source(
    DATASET_NAME,
    split=split,
    data_dir=str(data_dir),
    builder_kwargs={"config": config, "file_format": "array_record"},
    download_and_prepare_kwargs={
      "download_config": tfds.download.DownloadConfig(
        try_download_gcs=False, compute_stats=tfds.download.ComputeStatsMode.SKIP
      )
    },
  )
  examples = source.__getitems__(range(len(source)))
  order = np.argsort([int(e["index"]) for e in examples])
  return {
    field: np.stack([np.asarray(examples[i][field]) for i in order])
    for field in ("inputs", "targets", "weights")
  }
