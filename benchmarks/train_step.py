"""Time of one training step of the study's runs, and where it goes, under XLA flag sets.

  python benchmarks/train_step.py                            # the CPU study's tuning task
  python benchmarks/train_step.py --variants=dpa,ea-square --widths=8,16 --top_ops=12
  python benchmarks/train_step.py --flag_sets="|--xla_cpu_use_xnnpack=false"

Each measurement is a fresh process pinned to one core with single-threaded XLA, as the study's
workers run (`ea_jax.study.runner.worker_environment`), plus one extra flag set; it builds the
run config the study would train (`plan.run_config` of a tuning run of configs/sweep.py: the
tuning task, the variant, the width, the first learning rate, rope positions unless the variant
names its own), compiles the train step, and
times --steps steps on pre-drawn batches (median of --repeats blocks). Flag sets alternate
within each round (ABAB...) so that load from other jobs hits them alike. "fwd" is the loss
alone, "fwd+bwd" jax.value_and_grad of it, "step" the whole jitted train step (optimizer,
metrics). "loss" is the last step's loss in hex: equal across flag sets means the flags did not
change what is computed, bit for bit. With --top_ops the child also records a profile of 20
fwd+bwd calls (jax.profiler) and prints the XLA ops that took longest, with their shapes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

import child

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
WORKER_FLAGS = "--xla_cpu_multi_thread_eigen=false"


def _child(args) -> None:
  sys.path.insert(0, REPO)
  from ea_jax import runtime

  runtime.keep_freed_memory()
  if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
  import time

  import jax
  import numpy as np
  from flax import linen as nn

  from configs import sweep
  from ea_jax import data as data_lib
  from ea_jax import metrics as metrics_lib
  from ea_jax import train_lib
  from ea_jax.study import plan

  study = sweep.get_config(args.preset or None)
  run = plan.tuning_run(study, args.variant, args.width, study.tune.lr_grid[0], "rope")
  config = plan.run_config(study, run)
  config.model.attention_impl = None if args.impl == "auto" else args.impl
  source = data_lib.make_source(config, splits=("train",))
  setup = train_lib.Setup(config, vocab_size=source.vocab_size, max_len=source.seq_len)
  bs = config.train.batch_size
  out = {}

  def timed(fn, *a):
    jax.block_until_ready(fn(*a))
    blocks = []
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      for _ in range(args.steps):
        r = fn(*a)
      jax.block_until_ready(r)
      blocks.append((time.perf_counter() - t0) / args.steps)
    return statistics.median(blocks), r

  with jax.set_mesh(setup.mesh):
    state, _ = setup.init_state(config.train.seed)
    next_batch = source.train_batches(config.train.seed, bs, setup.batch_sharding(bs))
    batch = next_batch(0)
    with nn.logical_axis_rules(setup.rules):

      def loss(params, b):
        logits = setup.model.apply({"params": params}, b.inputs)
        return metrics_lib.mean_loss(logits, b.targets, b.weights)

      fwd = jax.jit(loss)
      fwd_bwd = jax.jit(jax.value_and_grad(loss))
      out["fwd"], _ = timed(fwd, state.params, batch)
      out["fwd_bwd"], _ = timed(fwd_bwd, state.params, batch)
    step = setup.train_step(bs, config.train)
    batches = [next_batch(i) for i in range(1, args.steps + 1)]
    jax.block_until_ready(batches)
    state, m = step(state, batches[0])  # compile
    jax.block_until_ready(state)
    blocks = []
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      for b in batches:
        state, m = step(state, b)
      jax.block_until_ready(state)
      blocks.append((time.perf_counter() - t0) / len(batches))
    out["step"] = statistics.median(blocks)
    out["loss"] = float(m.compute()["loss"]).hex()
    out["params"] = int(sum(np.size(x) for x in jax.tree.leaves(state.params)))
    if args.top_ops:
      out["ops"] = _top_ops(fwd_bwd, (state.params, batch), args.top_ops)
  with open(args.out, "w") as f:
    json.dump(out, f)


def _top_ops(fn, fn_args, n):
  """[(name, us per call, HLO line)] of the n XLA ops that took longest over 20 calls."""
  import collections
  import glob
  import re

  import jax

  calls = 20
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d):
      for _ in range(calls):
        r = fn(*fn_args)
      jax.block_until_ready(r)
    data = jax.profiler.ProfileData.from_file(glob.glob(f"{d}/**/*.xplane.pb", recursive=True)[0])
  total = collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      if "XLA" not in line.name or "Client" in line.name:  # the compute threads' op events
        continue
      for ev in line.events:
        if not ev.name.startswith("ThunkExecutor"):
          total[ev.name] += ev.duration_ns
  hlo = fn.lower(*fn_args).compile().as_text()
  rows = []
  for name, ns in total.most_common(n):
    m = re.search(r"%" + re.escape(name) + r" = ([^ ]+) ([\w-]+)\(", hlo)
    op = re.search(r'op_name="([^"]+)"', hlo[m.start() : hlo.find("\n", m.start())]) if m else None
    desc = f"{m.group(1)} {m.group(2)}" if m else "?"
    rows.append((name, ns / calls / 1e3, desc, op.group(1)[-70:] if op else ""))
  return rows


def _measure(args, variant, width, impl, flags) -> dict:
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", OMP_NUM_THREADS="1")
  env["XLA_FLAGS"] = f"{WORKER_FLAGS} {flags}".strip()
  argv = [f"--variant={variant}", f"--width={width}", f"--impl={impl}", f"--steps={args.steps}"]
  argv += [f"--repeats={args.repeats}", f"--preset={args.preset}", f"--top_ops={args.top_ops}"]
  return child.measure(__file__, argv, env, f"{variant} w{width} {impl} flags {flags!r}", REPO)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--preset", default="", help="configs/sweep.py preset (default: the CPU study)")
  p.add_argument("--variants", default="dpa,ea-rational,ea-square")
  p.add_argument("--widths", default="16")
  p.add_argument("--flag_sets", default="", help="'|'-separated extra XLA flag sets")
  p.add_argument("--impls", default="auto", help="model.attention_impl values (auto = None)")
  p.add_argument("--steps", type=int, default=50)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--rounds", type=int, default=1, help="processes per (variant, width, flags)")
  p.add_argument("--top_ops", type=int, default=0)
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--variant", default="dpa", help=argparse.SUPPRESS)
  p.add_argument("--width", type=int, default=16, help=argparse.SUPPRESS)
  p.add_argument("--impl", default="auto", help=argparse.SUPPRESS)
  p.add_argument("--out", default="", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    _child(args)
    return
  flag_sets = args.flag_sets.split("|")
  impls = [x for x in args.impls.split(",") if x]
  cases = [(impl, flags) for impl in impls for flags in flag_sets]
  variants = [v for v in args.variants.split(",") if v]
  widths = [int(w) for w in args.widths.split(",") if w]
  print(
    f"# {os.cpu_count()} cores, load average at start {os.getloadavg()[0]:.2f}; every process "
    f"pinned, XLA_FLAGS={WORKER_FLAGS} + the set; {args.steps} steps x {args.repeats} blocks"
  )
  profiles = []
  print(
    "| variant | width | attention_impl | extra XLA flags | params | fwd ms | fwd+bwd ms "
    "| step ms | loss |"
  )
  print("|---|---:|---|---|---:|---:|---:|---:|---|")
  for variant in variants:
    for width in widths:
      got = {case: [] for case in cases}
      for r in range(args.rounds):
        for case in cases if r % 2 == 0 else cases[::-1]:
          got[case].append(_measure(args, variant, width, *case))
      for impl, flags in cases:
        ms = got[(impl, flags)]
        med = lambda key, ms=ms: 1e3 * statistics.median(m[key] for m in ms)
        print(
          f"| {variant} | {width} | {impl} | {flags or '(none)'} | {ms[0]['params']:,} "
          f"| {med('fwd'):.2f} "
          f"| {med('fwd_bwd'):.2f} | {med('step'):.2f} | {ms[0]['loss']} |",
          flush=True,
        )
        if ms[0].get("ops"):
          title = f"{variant} w{width} {impl} {flags or '(no extra flags)'}"
          profiles.append((title, ms[0]["ops"]))
  for title, ops in profiles:
    print(f"\n## slowest XLA ops of fwd+bwd: {title} (us per call, of 20 profiled calls)")
    print("| op | us | result and kind | from |")
    print("|---|---:|---|---|")
    for name, us, desc, op in ops:
      print(f"| {name} | {us:.0f} | {desc} | {op} |")
  print(f"# load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
  main()
