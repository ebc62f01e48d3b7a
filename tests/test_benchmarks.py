"""The attention benchmark's goal arithmetic (its timings are measured, never asserted)."""

import importlib.util
import os

import pytest

_PATH = os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks", "attention.py")


@pytest.fixture(scope="module")
def bench():
  spec = importlib.util.spec_from_file_location("attention_benchmark", _PATH)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_goals_are_ratios_of_medians_with_their_round_by_round_spread(bench, capsys):
  B, N, H, peak_n = 8, 4, 32, 2048
  peak_s = [0.10, 0.20, 0.10]  # one 2048^3 matmul per round
  rounds = {
    (2048, "xla"): [4.0, 5.0, 5.0],
    (2048, "ea_auto"): [0.4, 0.5, 0.6],
    (2048, "ea_chunked"): [0.6, 0.6, 0.5],
    (2048, "matmul peak"): peak_s,
    (8192, "ea_sq_chunked"): [8.0],  # a slow row: timed once
    (8192, "ea_sq_linear"): [2.0, 2.2, 1.8],
  }
  walls = {key: sorted(v)[len(v) // 2] for key, v in rounds.items()}
  peaks = {2048: 2.0 * peak_n**3 / walls[(2048, "matmul peak")]}
  bench.print_goals(walls, peaks, rounds, B, N, H, peak_n)
  out = capsys.readouterr().out
  # Medians 0.5 / 5.0; round by round 0.4/4.0, 0.5/5.0, 0.6/5.0.
  assert "ea_auto / xla at T=2048: 0.100 (goal <= 0.10; rounds 0.100-0.120, n=3)" in out
  # Medians 2.0 / 8.0; only the first round has both rows.
  assert (
    "ea_sq_linear / ea_sq_chunked at T=8192: 0.250 (goal <= 0.25; rounds 0.250-0.250, n=1)" in out
  )
  # Useful FLOP of causal EA: 7 matmuls x 2H per allowed pair, T (T + 1) / 2 pairs per head.
  flop = 7 * 2 * H * (2048 * 2049 / 2) * B * N
  peak_flops = [2.0 * peak_n**3 / s for s in peak_s]
  frac = flop / 0.6 / peaks[2048]
  per_round = [flop / w / p for w, p in zip(rounds[(2048, "ea_chunked")], peak_flops)]
  assert (
    f"fraction of the matmul peak: {frac:.2f} (goal >= 0.50; "
    f"rounds {min(per_round):.3f}-{max(per_round):.3f}, n=3)"
  ) in out
