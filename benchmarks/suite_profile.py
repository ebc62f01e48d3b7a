"""Where the test suite's time goes: per test, JAX tracing, lowering and XLA compilation.

A pytest plugin that records `jax.monitoring` durations per test in every pytest process (the
xdist workers; not the subprocesses tests start) and writes one JSON file per process; run as a
script it prints the totals and the tests that spent most in JAX's compile path.

  PYTHONPATH=benchmarks SUITE_PROFILE_OUT=/tmp/suite make test PYTEST_ARGS="-p suite_profile"
  python benchmarks/suite_profile.py /tmp/suite
"""

from __future__ import annotations

import collections
import glob
import json
import os
import sys
import time

_EVENTS = ("jaxpr_trace_duration", "jaxpr_to_mlir_module_duration", "backend_compile_duration")
_current = ["(outside tests)"]
_totals: dict = collections.defaultdict(collections.Counter)


def _listener(event: str, duration: float, **kwargs) -> None:
  del kwargs
  _totals[_current[0]][event.rsplit("/", 1)[-1]] += duration


def pytest_configure(config) -> None:
  del config
  import jax

  jax.monitoring.register_event_duration_secs_listener(_listener)


def pytest_runtest_protocol(item, nextitem):
  del nextitem
  _current[0] = item.nodeid
  _totals[item.nodeid]["wall"] -= time.perf_counter()


def pytest_runtest_logfinish(nodeid, location) -> None:
  del location
  _totals[nodeid]["wall"] += time.perf_counter()
  _current[0] = "(outside tests)"


def pytest_sessionfinish(session) -> None:
  del session
  out = os.environ.get("SUITE_PROFILE_OUT", "suite_profile")
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, f"{os.getpid()}.json"), "w") as f:
    json.dump({k: dict(v) for k, v in _totals.items()}, f)


def main(directory: str, top: int = 15) -> None:
  per_test: dict = collections.defaultdict(collections.Counter)
  for path in glob.glob(os.path.join(directory, "*.json")):
    with open(path) as f:
      for test, values in json.load(f).items():
        per_test[test].update(values)
  total = collections.Counter()
  for values in per_test.values():
    total.update(values)
  print(
    f"{len(per_test)} tests; test wall {total['wall']:.0f} s (summed over processes); tracing "
    f"{total[_EVENTS[0]]:.0f} s, lowering {total[_EVENTS[1]]:.0f} s, XLA compile "
    f"{total[_EVENTS[2]]:.0f} s; cache hits saved {total['compile_time_saved_sec']:.0f} s"
  )
  print("| test | wall s | trace s | lower s | compile s |")
  print("|---|---:|---:|---:|---:|")
  jax_s = lambda v: sum(v[e] for e in _EVENTS)
  for test, v in sorted(per_test.items(), key=lambda kv: -jax_s(kv[1]))[:top]:
    print(f"| {test} | {v['wall']:.1f} | " + " | ".join(f"{v[e]:.1f}" for e in _EVENTS) + " |")


if __name__ == "__main__":
  main(sys.argv[1])
