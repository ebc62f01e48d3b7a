"""`python -m ea_jax.study.analysis --sweep_dir=SWEEP --out=docs/analysis`: delay locking and
length generalisation of a finished sweep (ea_jax.study.analysis.report; `--help` lists the
flags).

  python -m ea_jax.study.analysis --sweep_dir=/tmp/exp/final_sweep --out=docs/analysis \\
      --tasks="N=5 R=1,N=5 R=2" --widths=64 --length_factors=1,2
"""
import shlex
import sys

from absl import app
from absl import flags

from ea_jax.study.analysis import report

_SWEEP_DIR = flags.DEFINE_string("sweep_dir", None, "sweep workdir (holds runs/*/result.json)",
                                 required=True)
_OUT = flags.DEFINE_string("out", "docs/analysis", "output folder (README, CSVs, PNGs)")
_SCRATCH = flags.DEFINE_string("scratch", "/tmp/analysis/runs",
                               "where copies of the runs are evaluated")
_TASKS = flags.DEFINE_list("tasks", list(report.DEFAULT_TASKS), "comma-separated task labels")
_WIDTHS = flags.DEFINE_list("widths", ["64"], "comma-separated model widths")
_LENGTH_FACTORS = flags.DEFINE_list(
    "length_factors", ["1", "2"],
    "evaluate at training length x each factor (comma-separated integers, the first 1)")
_DELAY_EXAMPLES = flags.DEFINE_integer("delay_examples", 512, "sequences per delay analysis",
                                       lower_bound=1)
_NUM_OFFSETS = flags.DEFINE_integer("num_offsets", 12, "offsets shown in the delay figures",
                                    lower_bound=1)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; all options are --flags")
  try:
    options = report.Options(
        sweep_dir=_SWEEP_DIR.value, out=_OUT.value, scratch=_SCRATCH.value, tasks=_TASKS.value,
        widths=_WIDTHS.value, length_factors=_LENGTH_FACTORS.value,
        delay_examples=_DELAY_EXAMPLES.value, num_offsets=_NUM_OFFSETS.value)
  except ValueError as e:
    raise app.UsageError(f"--{e}") from None
  command = "python -m ea_jax.study.analysis " + " ".join(shlex.quote(a) for a in sys.argv[1:])
  report.run(options, command=command)


if __name__ == "__main__":
  app.run(main)
