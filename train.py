"""Trains a config: python train.py --config=configs/default.py --workdir=DIR [--config.x.y=...].

Resumes from DIR/checkpoints when present (the config must match DIR/train_config.json except
in `ea_jax.provenance.RESUME_MAY_CHANGE`); a finished run is left as it is. One trainer per
workdir (a lock). Multi-process (e.g. 2 processes on one host):
  python train.py ... --coordinator_address=localhost:12345 --num_processes=2 --process_id=0
  python train.py ... --coordinator_address=localhost:12345 --num_processes=2 --process_id=1
Exits with status 143 after saving a checkpoint on SIGTERM, 1 on bad input (one line on
stderr; --verbose for the traceback). Ends with three lines: what trained, its result, where.
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

from ea_jax import runtime

config_flags.DEFINE_config_file(
  "config", None, "Config file (ml_collections get_config).", lock_config=True
)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and summaries.")
runtime.define_process_flags()
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def _train() -> int:
  runtime.initialize_from_flags()
  import jax

  from ea_jax import train_lib

  summary = train_lib.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  if summary.get("ended_by") == "sigterm":
    return 143
  if jax.process_index() == 0:
    print(f"trained: {train_lib.describe(FLAGS.config, summary.get('num_params'))}")
    print(
      f"result: ended by {summary['ended_by']} at step {summary['step']}; test token "
      f"accuracy {summary['test_token_accuracy']:.4f}, sequence accuracy "
      f"{summary['test_sequence_accuracy']:.4f} (checkpoint {summary['selected_step']}, "
      f"selected on validation)"
    )
    print(f"summary: {os.path.join(os.path.abspath(FLAGS.workdir), train_lib.SUMMARY_FILE)}")
  return 0


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  sys.exit(runtime.run_reporting_errors(_train))


if __name__ == "__main__":
  app.run(main)
