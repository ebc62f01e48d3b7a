"""Split overlap: how many held-out sequences the training stream has already shown the model.

  python benchmarks/split_overlap.py                       # every ladder level (~3 min, 2 cores)
  python benchmarks/split_overlap.py --ladders=recurrence --steps=5000
  python benchmarks/split_overlap.py --sizes    # split sizes vs training budgets (no sampling)

Per ladder level: the share of --num_eval validation sequences (the generator source's
validation set for eval seed --eval_seed; the whole validation split where it is smaller) that occur verbatim among the training sequences the
generator source streams for train seed --train_seed over --steps steps of --batch_size (the
study's budget by default: 600 x 64, seeds 0 and 1). Both sets come from the data source itself
(`ea_jax.data.make_source(...).train_batches` / `.eval_batches`), so the script runs unchanged on
code from before the split API (where the task had no split argument) and after it. Where the
task reports `num_sequences`, the table adds the size of its train and validation splits.

`--sizes` prints instead, per level, the distinct sequences of each split (">=" marks a lower
bound) and how many sequences a budget of --budgets steps at --batch_size draws, as a share of
the train split; a level whose train split is smaller than a budget's draw is memorisable there.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import ml_collections
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from ea_jax import (
  data,  # noqa: E402  pylint: disable=g-import-not-at-top
  sharding,  # noqa: E402  pylint: disable=g-import-not-at-top
  tasks,  # noqa: E402  pylint: disable=g-import-not-at-top
)


def _rows(batches) -> np.ndarray:
  """Full sequences x [N, L + 1] of the scored-or-padded rows of `batches`."""
  out = []
  for b in batches:
    inputs, targets = np.asarray(b.inputs), np.asarray(b.targets)
    out.append(np.concatenate([inputs, targets[:, -1:]], axis=1))
  return np.concatenate(out).astype(np.int32)


def _row_set(x: np.ndarray) -> set:
  return {r.tobytes() for r in np.ascontiguousarray(x)}


def level_overlap(level_cfg, args, mesh) -> dict:
  config = ml_collections.ConfigDict({"task": level_cfg, "data": {"source": "generator"}})
  source = data.make_source(config, splits=("train", "validation"))
  train_sh = sharding.batch_sharding(mesh, sharding.logical_rules(), args.batch_size)
  next_batch = source.train_batches(args.train_seed, args.batch_size, train_sh)
  train = _row_set(_rows(next_batch(step) for step in range(args.steps)))
  task = source.task
  num_eval = args.num_eval
  if hasattr(task, "num_split_keys"):  # a split smaller than --num_eval: all of it
    num_eval = min(num_eval, task.num_split_keys("validation"))
  eval_sh = sharding.batch_sharding(mesh, sharding.logical_rules(), num_eval)
  val = _rows(source.eval_batches("validation", args.eval_seed, num_eval, num_eval, eval_sh))
  found = sum(r.tobytes() in train for r in val)
  row = {
    "train_distinct": len(train),
    "num_eval": len(val),
    "found": found,
    "share": found / len(val),
  }
  if hasattr(task, "num_sequences"):
    row["train_split"] = task.num_sequences("train")
    row["val_split"] = task.num_sequences("validation")
    row["exact"] = task.num_sequences_is_exact("train")
  return row


def _count(n: int, exact: bool) -> str:
  text = f"{n:,}" if n < 10**7 else f"{n:.2e}"
  return text if exact else ">= " + text


def sizes_table(args) -> None:
  budgets = [int(b) for b in args.budgets.split(",")]
  head = " | ".join(f"{b} x {args.batch_size} draws / train" for b in budgets)
  print(f"| ladder | level | train | validation | test | {head} | memorisable at |")
  print("|---|---|---:|---:|---:|" + "---:|" * len(budgets) + "---|")
  for name in args.ladders.split(","):
    for level in tasks.ladder(name):
      task = tasks.make_task(level)
      counts = {s: task.num_sequences(s) for s in tasks.SPLITS}
      exact = {s: task.num_sequences_is_exact(s) for s in tasks.SPLITS}
      shares, memorisable = [], []
      for b in budgets:
        draws = b * args.batch_size
        shares.append(f"{'<= ' if not exact['train'] else ''}{draws / counts['train']:.3g}")
        if counts["train"] < draws:  # a lower bound below the draw is still a fact only if exact
          memorisable.append(f"{b} steps" if exact["train"] else f"{b} steps?")
      cells = " | ".join(_count(counts[s], exact[s]) for s in tasks.SPLITS)
      print(
        f"| {name} | {level.label} | {cells} | {' | '.join(shares)} | "
        f"{', '.join(memorisable) or 'no'} |",
        flush=True,
      )


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--ladders", default=",".join(tasks.ladder_names()))
  parser.add_argument("--steps", type=int, default=600)
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--num_eval", type=int, default=512)
  parser.add_argument("--train_seed", type=int, default=0)
  parser.add_argument("--eval_seed", type=int, default=1)
  parser.add_argument("--sizes", action="store_true", help="print split sizes vs budgets")
  parser.add_argument("--budgets", default="600,5000", help="--sizes: budgets in steps")
  args = parser.parse_args(argv)
  if args.sizes:
    start = time.time()
    sizes_table(args)
    print(f"\n{time.time() - start:.0f} s")
    return
  mesh = sharding.create_mesh({"data": -1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  start = time.time()
  print(
    f"training stream {args.steps} x {args.batch_size} (seed {args.train_seed}); "
    f"{args.num_eval} validation sequences (seed {args.eval_seed})\n"
  )
  print(
    "| ladder | level | train draws distinct | validation drawn | found in training | share "
    "| train split | validation split |"
  )
  print("|---|---|---:|---:|---:|---:|---:|---:|")
  for name in args.ladders.split(","):
    for i, level in enumerate(tasks.ladder(name)):
      row = level_overlap(level, args, mesh)
      bound = "" if row.get("exact", True) else ">= "
      sizes = (
        f"{bound}{row['train_split']:.3g} | {bound}{row['val_split']:.3g}"
        if "train_split" in row
        else "- | -"
      )
      print(
        f"| {name} | {level.label} | {row['train_distinct']} | {row['num_eval']} | "
        f"{row['found']} | "
        f"{100 * row['share']:.1f}% | {sizes} |",
        flush=True,
      )
  print(f"\n{time.time() - start:.0f} s")


if __name__ == "__main__":
  main()
