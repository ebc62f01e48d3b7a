"""GPU check of the Pallas EA kernel: correctness vs the chunked XLA implementation, then timing.

    benchmarks/gpu_check.sh              # on a GPU machine; one call, < 8 minutes
    benchmarks/gpu_check.sh --dry_run    # anywhere: tiny shapes, Pallas in interpret mode

1. Accuracy: random bf16 inputs, causal and not, GQA, T not a multiple of the tile, both EA
   kernels; Pallas forward and gradients vs `expressive_attention(implementation="chunked")`
   (relative error max|a - b| / max|b| <= 1e-2, no NaN/Inf).
2. Timing: median fwd+bwd (jax.grad of sum(o * do)) wall time at B=4, N=16, H=128, causal,
   T in {2k, 8k, 32k}, bf16, for EA pallas, EA chunked (XLA), and
   jax.nn.dot_product_attention with implementation="cudnn" and "xla". Configurations that run
   out of memory (or are unavailable) are reported as such and skipped.
3. If time is left: a tile-size sweep of the Pallas kernel at T = 8k.

Imports only jax, numpy and ea_jax.attention / ea_jax.kernels (the GPU machine has nothing else).
Rows are printed as soon as they are measured, so a run cut short still reports what it did.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from ea_jax import attention
from ea_jax.kernels import pallas_attention

_OOM_MARKERS = ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "OOM")


def _print(*args):
  print(*args, flush=True)


def _rel_err(got, want):
  got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
  want = np.asarray(jnp.asarray(want, jnp.float32), np.float64)
  return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def _inputs(key, b, t, n, kh, h, dtype):
  kq, kk, kv, kd = jax.random.split(key, 4)
  q = jax.random.normal(kq, (b, t, n, h), jnp.float32).astype(dtype)
  k = jax.random.normal(kk, (b, t, kh, h), jnp.float32).astype(dtype)
  v = jax.random.normal(kv, (b, t, kh, h), jnp.float32).astype(dtype)
  do = jax.random.normal(kd, (b, t, n, h), jnp.float32).astype(dtype)
  return q, k, v, do


def _fwd_bwd(attend):
  """jit of (q, k, v, do) -> (o, (dq, dk, dv)) for the loss sum(o * do)."""

  def loss(q, k, v, do):
    o = attend(q, k, v)
    return jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32)), o

  grad = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)

  def run(q, k, v, do):
    (_, o), grads = grad(q, k, v, do)
    return o, grads

  return jax.jit(run)


def _implementations(
  interpret: bool, causal: bool = True, kernel: str = "rational", block_q=None, block_k=None
):
  def ea_pallas(q, k, v):
    return pallas_attention.expressive_attention_pallas(
      q,
      k,
      v,
      is_causal=causal,
      kernel=kernel,
      block_q=block_q,
      block_k=block_k,
      backend="gpu",
      interpret=interpret,
    )

  def ea_chunked(q, k, v):
    return attention.expressive_attention(
      q, k, v, is_causal=causal, kernel=kernel, implementation="chunked"
    )

  def dpa(impl):
    def run(q, k, v):
      return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=impl)

    return run

  return {
    "EA pallas": ea_pallas,
    "EA chunked (XLA)": ea_chunked,
    "DPA cudnn": dpa("cudnn"),
    "DPA xla": dpa("xla"),
  }


def _describe_failure(err: Exception) -> str:
  text = f"{type(err).__name__}: {err}"
  if any(m in text for m in _OOM_MARKERS):
    return "OOM"
  return "failed (" + text.splitlines()[0][:100] + ")"


# ---------------------------------------------------------------------------------------------
# 1. Accuracy
# ---------------------------------------------------------------------------------------------
def check_accuracy(shapes, interpret: bool, tol: float = 1e-2) -> bool:
  _print(
    "\n## Accuracy: EA pallas vs EA chunked (XLA), bf16 inputs, relative error "
    f"max|a-b|/max|b| (limit {tol:g})"
  )
  _print(
    f"{'B':>3} {'T':>6} {'N':>3} {'K':>3} {'H':>4} {'causal':>6} {'kernel':>8} "
    f"{'out':>9} {'dq':>9} {'dk':>9} {'dv':>9}  ok"
  )
  all_ok = True
  for i, (b, t, n, kh, h, causal, kernel) in enumerate(shapes):
    q, k, v, do = _inputs(jax.random.PRNGKey(i), b, t, n, kh, h, jnp.bfloat16)
    impls = _implementations(interpret, causal=causal, kernel=kernel)
    o_p, g_p = _fwd_bwd(impls["EA pallas"])(q, k, v, do)
    o_c, g_c = _fwd_bwd(impls["EA chunked (XLA)"])(q, k, v, do)
    errs = [_rel_err(o_p, o_c)] + [_rel_err(a, b_) for a, b_ in zip(g_p, g_c)]
    finite = all(bool(jnp.all(jnp.isfinite(x.astype(jnp.float32)))) for x in (o_p, *g_p))
    ok = finite and max(errs) <= tol
    all_ok &= ok
    _print(
      f"{b:>3} {t:>6} {n:>3} {kh:>3} {h:>4} {str(causal):>6} {kernel:>8} "
      + " ".join(f"{e:>9.2e}" for e in errs)
      + ("  yes" if ok else ("  NO (NaN/Inf)" if not finite else "  NO"))
    )
  _print("accuracy: " + ("PASS" if all_ok else "FAIL"))
  return all_ok


# ---------------------------------------------------------------------------------------------
# 2. Timing
# ---------------------------------------------------------------------------------------------
def time_fwd_bwd(fn, args, *, min_reps: int, max_seconds: float):
  """Median wall time (s) of fn(*args) after one warm-up (compile) call."""
  jax.block_until_ready(fn(*args))
  times = []
  start = time.perf_counter()
  while len(times) < min_reps or (time.perf_counter() - start < max_seconds and len(times) < 50):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
    if time.perf_counter() - start > max_seconds and len(times) >= 3:
      break
  return float(np.median(times)), len(times)


def _causal_fwd_bwd_flops(b, t, n, h):
  # QK^T and PV: 2 matmuls of 2*T*T*H each per head, halved by causality; bwd = 2.5 x fwd.
  return 3.5 * (4.0 * b * n * t * t * h) / 2.0


def run_timing(b, n, h, lengths, interpret: bool, deadline: float, reps: int):
  _print(f"\n## fwd+bwd median time, B={b} N={n} K={n} H={h}, causal, bf16")
  names = list(_implementations(interpret))
  header = f"{'T':>6} " + " ".join(f"{name:>18}" for name in names) + f" {'pallas/cudnn':>13}"
  _print(header)
  results = {}
  for t in lengths:
    q, k, v, do = _inputs(jax.random.PRNGKey(t), b, t, n, n, h, jnp.bfloat16)
    cells = []
    for name, attend in _implementations(interpret).items():
      if time.perf_counter() > deadline:
        cells.append("skipped (time)")
        continue
      try:
        sec, count = time_fwd_bwd(_fwd_bwd(attend), (q, k, v, do), min_reps=reps, max_seconds=3.0)
        results[(t, name)] = sec
        tflops = _causal_fwd_bwd_flops(b, t, n, h) / sec / 1e12
        cells.append(f"{sec * 1e3:.2f}ms {tflops:.0f}TF")
      except Exception as err:  # noqa: BLE001 -- report and go on (OOM, no cuDNN, ...)
        cells.append(_describe_failure(err))
      jax.clear_caches()
    ratio = ""
    if (t, "EA pallas") in results and (t, "DPA cudnn") in results:
      ratio = f"{results[(t, 'EA pallas')] / results[(t, 'DPA cudnn')]:.2f}x"
    _print(f"{t:>6} " + " ".join(f"{c[:18]:>18}" for c in cells) + f" {ratio:>13}")
    del q, k, v, do
  return results


def run_tile_sweep(b, n, h, t, tiles, interpret: bool, deadline: float, reps: int):
  _print(f"\n## EA pallas tile sweep, fwd+bwd, B={b} N={n} H={h} T={t}, causal, bf16")
  _print(f"{'block_q':>8} {'block_k':>8} {'time':>12}")
  q, k, v, do = _inputs(jax.random.PRNGKey(0), b, t, n, n, h, jnp.bfloat16)
  for bq, bk in tiles:
    if time.perf_counter() > deadline:
      _print(f"{bq:>8} {bk:>8} {'skipped (time)':>12}")
      continue
    attend = _implementations(interpret, block_q=bq, block_k=bk)["EA pallas"]
    try:
      sec, _ = time_fwd_bwd(_fwd_bwd(attend), (q, k, v, do), min_reps=reps, max_seconds=2.0)
      _print(f"{bq:>8} {bk:>8} {sec * 1e3:>10.2f}ms")
    except Exception as err:  # noqa: BLE001
      _print(f"{bq:>8} {bk:>8} {_describe_failure(err)}")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--dry_run", action="store_true", help="tiny shapes, Pallas in interpret mode (runs on CPU)"
  )
  parser.add_argument(
    "--budget_seconds",
    type=float,
    default=420.0,
    help="stop starting new measurements after this many seconds",
  )
  args = parser.parse_args(argv)
  start = time.perf_counter()
  deadline = start + args.budget_seconds
  dev = jax.devices()[0]
  _print(
    f"# ea_jax GPU check: jax {jax.__version__}, backend {jax.default_backend()}, "
    f"device {dev.device_kind} x{jax.device_count()}"
    + (" [dry run: interpret mode, tiny shapes]" if args.dry_run else "")
  )
  if not args.dry_run and jax.default_backend() != "gpu":
    _print("no GPU backend: run with --dry_run to exercise the script on CPU")
    return 2

  if args.dry_run:
    acc_shapes = [(1, 40, 4, 2, 16, True, "rational"), (1, 33, 2, 2, 16, False, "square")]
    b, n, h, lengths, reps = 1, 2, 16, (64, 128), 2
    sweep_t, tiles = 128, ((32, 16), (16, 32))
  else:
    acc_shapes = [
      (2, 2048, 8, 4, 128, True, "rational"),
      (2, 1000, 8, 8, 128, True, "square"),
      (1, 1536, 4, 2, 64, False, "rational"),
      (4, 2048, 16, 16, 128, True, "square"),
    ]
    b, n, h, lengths, reps = 4, 16, 128, (2048, 8192, 32768), 5
    sweep_t, tiles = 8192, ((128, 64), (128, 128), (64, 64), (64, 128), (128, 32))

  ok = check_accuracy(acc_shapes, interpret=args.dry_run)
  run_timing(b, n, h, lengths, interpret=args.dry_run, deadline=deadline, reps=reps)
  run_tile_sweep(b, n, h, sweep_t, tiles, interpret=args.dry_run, deadline=deadline, reps=reps)
  _print(f"\ntotal {time.perf_counter() - start:.0f}s; accuracy {'PASS' if ok else 'FAIL'}")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
