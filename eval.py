"""Evaluates the latest checkpoint: python eval.py --config=configs/default.py --workdir=DIR.

Writes DIR/eval.json. `--config.eval.split=test`, `--config.task.seq_len=96` (length
generalisation), `--plot_attention` (PNG attention maps under DIR/attention/).
"""
from absl import app
from absl import flags
from ml_collections import config_flags

from ea_jax import runtime

config_flags.DEFINE_config_file("config", None, "Config file (ml_collections get_config).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Training directory holding checkpoints/.")
flags.DEFINE_bool("plot_attention", False, "Save attention-map figures for a few examples.")
flags.DEFINE_integer("num_attention_examples", 3, "How many examples --plot_attention draws.")
runtime.define_process_flags()
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  runtime.initialize_from_flags()
  from ea_jax import evaluate
  evaluate.evaluate(FLAGS.config, FLAGS.workdir,
                    plot_attention=FLAGS.num_attention_examples if FLAGS.plot_attention else 0)


if __name__ == "__main__":
  app.run(main)
