"""Trains a config: python train.py --config=configs/default.py --workdir=DIR [--config.x.y=...].

Resumes from DIR/checkpoints when present. Multi-process (e.g. 2 processes on one host):
  python train.py ... --coordinator_address=localhost:12345 --num_processes=2 --process_id=0
  python train.py ... --coordinator_address=localhost:12345 --num_processes=2 --process_id=1
Exits with status 143 after saving a checkpoint on SIGTERM.
"""
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from ea_jax import runtime

config_flags.DEFINE_config_file("config", None, "Config file (ml_collections get_config).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and summaries.")
runtime.define_process_flags()
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  runtime.initialize_from_flags()
  from ea_jax import train_lib
  summary = train_lib.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  if summary.get("stopped") == "sigterm":
    sys.exit(143)


if __name__ == "__main__":
  app.run(main)
