"""Alias: `python -m ea_jax.sweep ...` is `python -m ea_jax.study ...` (see ea_jax/study/)."""

import sys

from ea_jax.study.__main__ import main

if __name__ == "__main__":
  sys.exit(main())
