"""The allocator settings (`ea_jax.runtime.keep_freed_memory`) side by side with glibc's defaults.

  python benchmarks/allocator.py                          # the LM anchor (needs `make lm-data`)
  python benchmarks/allocator.py --config=configs/default.py --steps=200

Each measurement is a fresh process (the setting must be made before XLA's threads allocate)
that builds the config's training step, runs one step to compile it, then times --steps steps
and reads its own resource usage over them: wall time, user and system CPU time, minor page
faults. Two thread layouts: "pinned" (one core, single-threaded XLA: how the study and LM
workers run) and "threaded" (XLA's default thread pool on every core: how `train.py` runs).
Settings alternate within each round (ABAB...) so that load from other jobs hits both alike;
the table gives medians over --repeats rounds. "same loss" says whether the last step's loss
is bit-identical with and without the setting (it changes where memory comes from, not what is
computed).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys

import child

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
# glibc's defaults, keep_freed_memory(one_arena=True) (the workers), keep_freed_memory() (the rest)
SETTINGS = ("defaults", "one_arena", "thread_arenas")
LAYOUTS = ("pinned", "threaded")


def _load_config(spec: str):
  """'configs/NAME.py[:ARG]' -> configs.NAME.get_config(ARG)."""
  path, _, arg = spec.partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  return importlib.import_module(f"configs.{name}").get_config(arg or None)


def _child(args) -> None:
  """One measurement in this process; writes a JSON line to args.out."""
  sys.path.insert(0, REPO)
  if args.setting != "defaults":
    from ea_jax import runtime

    if not runtime.keep_freed_memory(one_arena=args.setting == "one_arena"):
      raise SystemExit("error: keep_freed_memory() did not apply (not glibc?)")
  if args.layout == "pinned" and hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
  import resource
  import time

  import jax

  from ea_jax import data as data_lib
  from ea_jax import train_lib

  config = _load_config(args.config)
  source = data_lib.make_source(config, splits=("train",))
  setup = train_lib.get_setup(config, vocab_size=source.vocab_size, max_len=source.seq_len)
  batch_size = config.train.batch_size
  with jax.set_mesh(setup.mesh):
    state, _ = setup.init_state(config.train.seed)
    step_fn = setup.train_step(batch_size, config.train)
    next_batch = source.train_batches(
      config.train.seed, batch_size, setup.batch_sharding(batch_size)
    )
    state, m = step_fn(state, next_batch(0))  # compile
    jax.block_until_ready(state)
    before, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for i in range(1, args.steps + 1):
      state, m = step_fn(state, next_batch(i))
    loss = float(m.compute()["loss"])
    jax.block_until_ready(state)
    wall, after = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
  with open(args.out, "w") as f:
    json.dump(
      dict(
        wall=wall,
        user=after.ru_utime - before.ru_utime,
        sys=after.ru_stime - before.ru_stime,
        minflt=after.ru_minflt - before.ru_minflt,
        loss=loss.hex(),
      ),
      f,
    )


def _measure(args, layout: str, setting: str) -> dict:
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  env.setdefault("JAX_PLATFORMS", "cpu")
  if layout == "pinned":
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
    env["OMP_NUM_THREADS"] = "1"
  flags = [f"--layout={layout}", f"--setting={setting}", f"--config={args.config}"]
  return child.measure(
    __file__, flags + [f"--steps={args.steps}"], env, f"{layout}/{setting}", REPO
  )


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--config", default="configs/lm.py:dpa", help="configs/NAME.py[:ARG]")
  p.add_argument("--steps", type=int, default=100, help="timed steps per measurement")
  p.add_argument("--repeats", type=int, default=3, help="rounds; the table shows medians")
  p.add_argument("--layouts", default=",".join(LAYOUTS), help="subset of pinned,threaded")
  p.add_argument("--settings", default=",".join(SETTINGS), help=f"subset of {SETTINGS}")
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--layout", default="pinned", help=argparse.SUPPRESS)
  p.add_argument("--setting", default="thread_arenas", help=argparse.SUPPRESS)
  p.add_argument("--out", default="", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    _child(args)
    return
  layouts = [x for x in args.layouts.split(",") if x]
  args.settings = [x for x in args.settings.split(",") if x]
  unknown = sorted(set(layouts) - set(LAYOUTS)) + sorted(set(args.settings) - set(SETTINGS))
  if unknown or args.steps < 1 or args.repeats < 1:
    raise SystemExit(
      f"error: --layouts / --settings must be subsets of {LAYOUTS} / {SETTINGS} (got {unknown}); "
      "--steps and --repeats must be >= 1"
    )
  print(
    f"config {args.config}, {args.steps} timed steps, {args.repeats} rounds, "
    f"{os.cpu_count()} cores",
    flush=True,
  )
  got = {(lay, s): [] for lay in layouts for s in args.settings}
  for r in range(args.repeats):
    for lay in layouts:
      order = args.settings if r % 2 == 0 else args.settings[::-1]
      for s in order:
        got[(lay, s)].append(_measure(args, lay, s))
        m = got[(lay, s)][-1]
        print(
          f"  round {r} {lay:8s} {s:8s} wall {m['wall']:.2f} s  sys {m['sys']:.2f} s", flush=True
        )
  print()
  print(
    "| layout | setting | ms/step | user s | sys s | sys / (user+sys) | minor faults/step "
    "| same loss |"
  )
  print("|---|---|---:|---:|---:|---:|---:|---|")
  for lay in layouts:
    losses = set().union(*({m["loss"] for m in got[(lay, s)]} for s in args.settings))
    same = "yes" if len(losses) == 1 else "no"
    for s in args.settings:
      ms = got[(lay, s)]
      med = lambda key, ms=ms: statistics.median(m[key] for m in ms)
      user, system = med("user"), med("sys")
      print(
        f"| {lay} | {s} | {1e3 * med('wall') / args.steps:.1f} | {user:.2f} | {system:.2f} "
        f"| {system / max(user + system, 1e-9):.1%} | {med('minflt') / args.steps:,.0f} | {same} |"
      )
  print()
  base = args.settings[0]
  wall = lambda lay, s: statistics.median(m["wall"] for m in got[(lay, s)])
  for s in args.settings[1:]:
    ratios = [f"{lay} {wall(lay, s) / wall(lay, base):.2f}" for lay in layouts]
    print(f"wall time {s} / {base}: " + ", ".join(ratios))


if __name__ == "__main__":
  main()
