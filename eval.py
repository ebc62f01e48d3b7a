"""Evaluates a run's latest checkpoint with its own model, task and data:

  python eval.py --workdir=DIR [--split=test] [--seq_len=96] [--num_examples=N] [--step=S]

Writes DIR/eval_<split>_L<seq_len>.json. `--config` is optional: the training command's own
config and flags are accepted (training-loop fields are ignored); a model, task or data field
that differs from DIR/train_config.json is an error (see `ea_jax.provenance.EVAL_MAY_CHANGE`).
`--plot_attention` saves PNG attention maps under DIR/attention/. Ends with three lines: what
was evaluated, its accuracy, where the eval file is. Bad input: one line on stderr, status 1.
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

from ea_jax import runtime

config_flags.DEFINE_config_file(
  "config", None, "Optional config (checked against the run's).", lock_config=True
)
flags.DEFINE_string("workdir", None, "Training directory holding checkpoints/.")
flags.DEFINE_enum("split", None, ["validation", "test"], "Split (default: the config's).")
flags.DEFINE_integer("num_examples", None, "Examples to evaluate (default: the config's).")
flags.DEFINE_integer("seq_len", None, "Sequence length (length generalisation).")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.DEFINE_bool("plot_attention", False, "Save attention-map figures for a few examples.")
flags.DEFINE_integer("num_attention_examples", 3, "How many examples --plot_attention draws.")
runtime.define_process_flags()
flags.mark_flags_as_required(["workdir"])
FLAGS = flags.FLAGS


def _eval() -> int:
  runtime.initialize_from_flags()
  import jax
  import ml_collections

  from ea_jax import evaluate, train_lib

  result = evaluate.evaluate(
    FLAGS.config,
    FLAGS.workdir,
    split=FLAGS.split,
    num_examples=FLAGS.num_examples,
    seq_len=FLAGS.seq_len,
    step=FLAGS.step,
    plot_attention=FLAGS.num_attention_examples if FLAGS.plot_attention else 0,
  )
  if jax.process_index() == 0:
    run = ml_collections.ConfigDict(train_lib.read_train_config(FLAGS.workdir)["config"])
    rollout = result.get("rollout_sequence_accuracy")
    print(
      f"evaluated: {train_lib.describe(run)}; checkpoint step {result['step']}, "
      f"{result['split']} split, {result['num_examples']} examples of length "
      f"{result['seq_len']}"
    )
    print(
      f"accuracy: token {result['token_accuracy']:.4f}, sequence "
      f"{result['sequence_accuracy']:.4f}"
      + ("" if rollout is None else f" (rollout sequence {rollout:.4f})")
    )
    path = os.path.join(
      os.path.abspath(FLAGS.workdir),
      evaluate.eval_file_name(result["split"], result["seq_len"], FLAGS.step),
    )
    print(f"eval file: {path}")
  return 0


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  sys.exit(runtime.run_reporting_errors(_eval))


if __name__ == "__main__":
  app.run(main)
