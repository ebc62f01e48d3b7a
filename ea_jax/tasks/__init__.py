"""The complexity ladder: task families, a registry (`make_task`) and named ladders.

  task = make_task(ladder("recurrence")[2])
  batch = task.sample(jax.random.key(0), 32, split="train")   # or "validation", "test"

`batch` is a `Batch(inputs, targets, weights)` of int32/int32/float32 [B, L] arrays in the
next-token layout (`inputs[:, t + 1] == targets[:, t]`), weights 1.0 where the target is
determined by the inputs so far. The three splits (`SPLITS`) never share a sequence, by
construction (`ea_jax.tasks.splits`); `task.num_sequences(split)` counts a split. The TFDS
builder lives in `ea_jax.tasks.tfds_builder` (imported on demand: it needs tensorflow_datasets).
"""

from ea_jax.tasks.base import Batch
from ea_jax.tasks.ladders import default_task, ladder, ladder_names
from ea_jax.tasks.registry import family_names, make_task
from ea_jax.tasks.splits import DEFAULT_SPLIT_FRACTIONS, SPLITS

__all__ = [
  "Batch",
  "DEFAULT_SPLIT_FRACTIONS",
  "SPLITS",
  "default_task",
  "family_names",
  "ladder",
  "ladder_names",
  "make_task",
]
