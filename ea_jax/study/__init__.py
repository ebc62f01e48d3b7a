"""The experiments: does EA, at a given model size, reach 100% at complexity levels DPA cannot?

  plan.py      the grid: variants, levels, widths, seeds, tuning runs
  runner.py    running it: worker processes, resume, shards, collect
  results.py   result rows, CSV I/O, tuning selection (learning-rate bracketing)
  stats.py     paired seeds: means, bootstrap intervals, verdicts
  report.py    summary.md, figures, the README's results table
  plots.py     matplotlib figures
  analysis/    attention geometry, delay locking, length generalisation of trained runs

`python -m ea_jax.study --config=configs/sweep.py --workdir=DIR` runs the study.
"""
