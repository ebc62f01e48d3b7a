"""The study's command line (`python -m ea_jax.study`; `python -m ea_jax.sweep` is an alias).

python -m ea_jax.study --config=configs/sweep.py --workdir=DIR [--workers=2]
python -m ea_jax.study ... --stage=tune --shard_index=I --num_shards=N   (array job; repeat
                                                                         until no run is needed)
python -m ea_jax.study ... --stage=main --shard_index=I --num_shards=N   (array job, step 2)
python -m ea_jax.study ... --collect                                     (merge the shards)
python -m ea_jax.study ... --publish=docs/results [--readme=README.md]   (copy the report)
"""

from __future__ import annotations

import sys


def main(argv=None) -> int:
  from absl import app, flags
  from ml_collections import config_flags

  from ea_jax.study import plan, report, runner

  config_flags.DEFINE_config_file(
    "config", None, "Study config (configs/sweep.py[:preset]).", lock_config=True
  )
  flags.DEFINE_string("workdir", None, "Study directory (runs/, results.csv, figures).")
  flags.DEFINE_integer("workers", 2, "Worker processes (0 = run in this process).")
  flags.DEFINE_enum("stage", "all", list(plan.STAGES), "tune, main, or all (both).")
  flags.DEFINE_integer("shard_index", 0, "This shard's index.")
  flags.DEFINE_integer("num_shards", 1, "Number of shards (array-job size).")
  flags.DEFINE_bool("collect", False, "Merge shards/*.csv into results.csv and the report.")
  flags.DEFINE_string("publish", None, "Copy the finished report and CSVs to this directory.")
  flags.DEFINE_string("readme", None, "With --publish: write the results block of this README.")
  flags.DEFINE_bool("verbose", False, "Show libraries' INFO logs and the traceback of an error.")
  flags.mark_flags_as_required(["config", "workdir"])
  FLAGS = flags.FLAGS

  def _main(args):
    if len(args) > 1:
      raise app.UsageError(f"unexpected arguments: {args[1:]}")
    from ea_jax import runtime

    runtime.keep_freed_memory()  # runs trained in this process (--workers=0), the report
    if not FLAGS.verbose:  # orbax's per-checkpoint INFO lines of the report's analyses
      runtime.quiet_library_logs()
    try:
      if FLAGS.publish:
        for p in report.publish(FLAGS.config, FLAGS.workdir, FLAGS.publish, FLAGS.readme):
          print(f"wrote {p}")
        return 0
      if FLAGS.collect:
        runner.collect(FLAGS.config, FLAGS.workdir)
        return 0
      out = runner.run_study(
        FLAGS.config,
        FLAGS.workdir,
        workers=FLAGS.workers,
        stage=FLAGS.stage,
        shard_index=FLAGS.shard_index,
        num_shards=FLAGS.num_shards,
      )
    except (ValueError, RuntimeError, FileNotFoundError) as e:
      if FLAGS.verbose:
        raise
      print(f"error: {e}", file=sys.stderr)
      return 2
    return 1 if out["errors"] or out["stopped"] else 0

  return app.run(_main, argv=argv)


if __name__ == "__main__":
  sys.exit(main())
