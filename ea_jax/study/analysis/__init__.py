"""Analyses of trained runs: where attention goes and how far the models extrapolate.

Modules, each importing only those above it in this list:
  loading.py    load_run(workdir): model, parameters and config of a run's latest checkpoint
  geometry.py   attention weight over cos(q, k) (weighted histograms; run_geometry)
  delays.py     delay locking of recurrence models (offset profiles, delay mass; run_delays)
  lengthgen.py  evaluation at other sequence lengths (eval_at_lengths, summarize)
  report.py     a finished sweep's analysis: CSVs, figures, README.md (Options, run)
  __main__.py   the CLI: python -m ea_jax.study.analysis --sweep_dir=SWEEP --out=docs/analysis

Held-out behaviour is measured on the test split of each run's task.
"""
