"""Exactness of the attention implementations on q/k/v taken from trained models.

  python benchmarks/attention_trained.py --study_dir=workdirs/study [--width=16 --seed=0]
  python benchmarks/attention_trained.py --study_dir= --workdirs=workdirs/demo

For every finished EA run of a study (`ea_jax.study`) and every EA training workdir named in
--workdirs (train.py's, e.g. the demo's), at the checkpoint it selected on validation: q, k, v
of every layer on test sequences of its own task (captured from the model's attention
projection, after rope), then each implementation's causal output against a float64 reference
of the same inputs (benchmarks/attention_exactness.py). Prints one row per run: the
median |cos(q, k)| over the attended pairs (how near-orthogonal real rows are; the synthetic
construction's f is about that cosine) and the max relative error of each implementation.
The trained tasks' sequences are short (48 tokens in the demo), shorter than the modules' own
blocks, so chunked and linear run with --chunk_rows / --linear_chunk: chunked then crosses block
boundaries and linear reads most of each row's sum from its state, as at long lengths.
"""

from __future__ import annotations

import glob
import json
import os
import sys

import jax
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import attention_exactness as ex  # noqa: E402

flags.DEFINE_string("study_dir", "workdirs/study", "A study directory (runs/*/result.json).")
flags.DEFINE_list("workdirs", [], "Training workdirs (train.py's) of EA runs, besides the study's.")
flags.DEFINE_integer("num_sequences", 8, "Test sequences per run.")
flags.DEFINE_integer("width", 16, "Only the runs of this width (-1: all).")
flags.DEFINE_integer("seed", 0, "Only the runs of this seed (-1: all).")
flags.DEFINE_list(
  "columns",
  ["naive", "chunked", "linear", "auto", "kv_cache", "recurrent"],
  "Implementations to compare.",
)
flags.DEFINE_integer("chunk_rows", 16, "chunked's block (ea_jax.attention.chunked.CHUNK_ROWS).")
flags.DEFINE_integer("linear_chunk", 8, "linear's chunk (ea_jax.attention.linear.LINEAR_CHUNK).")
FLAGS = flags.FLAGS


def _runs(study_dir: str, workdirs: list[str]) -> list[tuple[str, str]]:
  """(workdir, row name) of the study's finished EA runs and of the given training workdirs."""
  out = []
  paths = glob.glob(os.path.join(study_dir, "runs", "main-*", "result.json")) if study_dir else []
  for path in sorted(paths):
    with open(path) as f:
      result = json.load(f)
    if (
      result["status"] == "ok"
      and not result["variant"].startswith("dpa")
      and FLAGS.width in (-1, result["width"])
      and FLAGS.seed in (-1, result["seed"])
    ):
      name = f"{result['label']} {result['variant']} w{result['width']} s{result['seed']}"
      out.append((os.path.dirname(path), name))
  return out + [(w, w) for w in workdirs]


def _median_abs_cos(q_TNH, k_TNH) -> float:
  qn = q_TNH / (np.linalg.norm(q_TNH, axis=-1, keepdims=True) + 1e-30)
  kn = k_TNH / (np.linalg.norm(k_TNH, axis=-1, keepdims=True) + 1e-30)
  cos_NTS = np.einsum("tnh,snh->nts", qn, kn)
  T = q_TNH.shape[0]
  causal = np.tril(np.ones((T, T), bool))
  return float(np.median(np.abs(cos_NTS[:, causal])))


def main(argv):
  del argv
  from ea_jax import attention, tasks
  from ea_jax.study.analysis import geometry, loading

  attention.chunked.CHUNK_ROWS = FLAGS.chunk_rows
  attention.linear.LINEAR_CHUNK = FLAGS.linear_chunk
  print(f"# chunked blocks of {FLAGS.chunk_rows}, linear chunks of {FLAGS.linear_chunk}")
  header = ["run", "kernel", "median |cos|"] + list(FLAGS.columns)
  print(" | ".join(header))
  print("|".join("---" for _ in header))
  for run_dir, name in _runs(FLAGS.study_dir, FLAGS.workdirs):
    model, params, config = loading.load_run(run_dir)
    if config.model.attention != "ea":
      raise app.UsageError(
        f"--workdirs: {run_dir} trained attention={config.model.attention!r}; EA only"
      )
    kernel = config.model.ea_kernel
    task = tasks.make_task(config.task)
    batch = task.sample(jax.random.key(0), FLAGS.num_sequences, split="test")
    captured = geometry.capture_qkv(model, params, batch.inputs)
    errs = {c: 0.0 for c in FLAGS.columns}
    cosines = []
    for q_BLNH, k_BLKH, v_BLKH in captured:
      q_BLNH, k_BLKH, v_BLKH = (np.asarray(x, np.float32) for x in (q_BLNH, k_BLKH, v_BLKH))
      refs = []
      for b in range(q_BLNH.shape[0]):
        q, k, v = (x[b : b + 1] for x in (q_BLNH, k_BLKH, v_BLKH))
        cosines.append(_median_abs_cos(q[0], k[0]))
        refs.append(ex.reference_causal(q, k, v, kernel=kernel)[0])
      for c in FLAGS.columns:
        out = ex.run_column(c, q_BLNH, k_BLKH, v_BLKH, kernel)  # all sequences at once
        if out is None:
          errs[c] = float("nan")
          continue
        out = np.asarray(out, np.float64)
        for b, ref in enumerate(refs):
          errs[c] = max(errs[c], ex.rel_err(out[b], ref))
    cells = [f"{errs[c]:.1e}" if np.isfinite(errs[c]) else "—" for c in FLAGS.columns]
    print(" | ".join([name, kernel, f"{np.median(cosines):.3f}"] + cells), flush=True)


if __name__ == "__main__":
  app.run(main)
