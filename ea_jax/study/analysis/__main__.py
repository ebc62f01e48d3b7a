"""`python -m ea_jax.study.analysis --sweep_dir=SWEEP --out=docs/analysis`: delay locking and
length generalisation of a finished sweep (ea_jax.study.analysis.report; `--help` lists the
flags).

  python -m ea_jax.study.analysis --sweep_dir=/tmp/exp/final_sweep --out=docs/analysis \\
      --tasks="N=5 R=1,N=5 R=2" --widths=64 --length_factors=1,2
"""

import shlex
import sys

from absl import app, flags

from ea_jax.study.analysis import report

_SWEEP_DIR = flags.DEFINE_string(
  "sweep_dir", None, "sweep workdir (holds runs/*/result.json)", required=True
)
_OUT = flags.DEFINE_string("out", "docs/analysis", "output folder (README, CSVs, PNGs)")
_SCRATCH = flags.DEFINE_string(
  "scratch", "/tmp/analysis/runs", "where copies of the runs are evaluated"
)
_TASKS = flags.DEFINE_list("tasks", list(report.DEFAULT_TASKS), "comma-separated task labels")
_WIDTHS = flags.DEFINE_list("widths", ["64"], "comma-separated model widths")
_LENGTH_FACTORS = flags.DEFINE_list(
  "length_factors",
  ["1", "2"],
  "evaluate at training length x each factor (comma-separated integers, the first 1)",
)
_DELAY_EXAMPLES = flags.DEFINE_integer(
  "delay_examples", 512, "sequences per delay analysis", lower_bound=1
)
_NUM_OFFSETS = flags.DEFINE_integer(
  "num_offsets", 12, "offsets shown in the delay figures", lower_bound=1
)


_OPTION_FLAGS = (
  "sweep_dir",
  "out",
  "scratch",
  "tasks",
  "widths",
  "length_factors",
  "delay_examples",
  "num_offsets",
)


def _check(name: str):
  """A flag validator: report.Options' check of that field (one line naming the flag)."""

  def check(value) -> bool:
    try:
      report.Options(**{"sweep_dir": "-", name: value})
    except ValueError as e:
      raise flags.ValidationError(str(e).split(": ", 1)[-1]) from None
    return True

  return check


for _name in ("tasks", "widths", "length_factors"):
  flags.register_validator(_name, _check(_name))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; all options are --flags")
  from ea_jax import runtime

  runtime.keep_freed_memory()
  runtime.quiet_library_logs()  # orbax's INFO lines for every checkpoint restored
  options = report.Options(**{name: flags.FLAGS[name].value for name in _OPTION_FLAGS})
  try:  # the sweep folder holds the selected runs (one line if not)
    report.find_runs(options.sweep_dir, tasks=list(options.tasks), widths=list(options.widths))
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"error: {e}")
  command = "python -m ea_jax.study.analysis " + " ".join(shlex.quote(a) for a in sys.argv[1:])
  report.run(options, command=command)


if __name__ == "__main__":
  app.run(main)
