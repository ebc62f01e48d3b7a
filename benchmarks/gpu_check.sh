#!/usr/bin/env bash
# GPU check of the Pallas EA kernel (accuracy vs chunked XLA, then fwd+bwd timing table).
# One call, under 8 minutes on one GPU; needs only jax (with CUDA) and numpy:
#   benchmarks/gpu_check.sh             # on the GPU machine
#   benchmarks/gpu_check.sh --dry_run   # anywhere (CPU): tiny shapes, Pallas interpret mode
# Extra arguments go to benchmarks/gpu_check.py (e.g. --budget_seconds=300).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
# Hard stop at 470 s; the script itself stops starting new measurements at 420 s.
exec timeout --signal=INT --kill-after=10 470 "$PY" benchmarks/gpu_check.py "$@"
