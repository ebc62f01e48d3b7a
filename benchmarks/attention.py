"""Attention benchmark: forward+backward time and XLA temp memory per implementation, and decode.

  python benchmarks/attention.py                 # full table (~10 min on a 2-core CPU)
  python benchmarks/attention.py --quick         # smoke run (seconds)
  python benchmarks/attention.py --seq_lens=512,2048 --repeats=3 --small_seq_lens= --decode_contexts=

Training table: median wall time and process CPU time of jit(value_and_grad(sum(out^2))) w.r.t.
(q, k, v) after one warm-up call, causal, B x T x N x H inputs with K = N key/value heads; the
implementations of one T are timed round-robin, so that load from other jobs hits them alike, and
"vs xla" is the ratio of CPU times (the robust one on a shared machine). "temp" is XLA's temporary
buffer size from compiled.memory_analysis(). Rows whose estimated temp memory exceeds --mem_limit_gb
are skipped before compiling. "xla" is jax.nn.dot_product_attention(implementation="xla").
Decode table: time per generated token (a jitted scan of --decode_steps one-token steps) at a given
context length (median wall time), for the KV cache (EA and DPA) and the square-kernel EA
recurrent state.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from ea_jax import attention as attn  # noqa: E402  pylint: disable=g-import-not-at-top

# name -> (kind label, function(q, k, v) -> out, temp-memory estimate in bytes per score element)
_IMPLS = {
    "xla": ("dpa", lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation="xla"), 5.0 * 4),
    "dpa_naive": ("dpa", lambda q, k, v: attn.dot_product_attention(
        q, k, v, is_causal=True, implementation="naive"), 5.0 * 4),
    "dpa_chunked": ("dpa", lambda q, k, v: attn.dot_product_attention(
        q, k, v, is_causal=True, implementation="chunked"), 0.0),
    "ea_naive": ("ea", lambda q, k, v: attn.expressive_attention(
        q, k, v, is_causal=True, implementation="naive"), 8.0 * 4),
    "ea_chunked": ("ea", lambda q, k, v: attn.expressive_attention(
        q, k, v, is_causal=True, implementation="chunked"), 0.0),
    "ea_sq_chunked": ("ea", lambda q, k, v: attn.expressive_attention(
        q, k, v, is_causal=True, kernel="square", implementation="chunked"), 0.0),
    "ea_sq_linear": ("ea", lambda q, k, v: attn.expressive_attention(
        q, k, v, is_causal=True, kernel="square", implementation="linear"), 0.0),
}
_DEFAULT_IMPLS = "xla,dpa_naive,dpa_chunked,ea_naive,ea_chunked,ea_sq_chunked,ea_sq_linear"


def _inputs(batch, seq_len, heads, head_dim, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.normal(size=(batch, seq_len, heads, head_dim)), dtype)
               for _ in range(3))


def _timed(fn):
  """(wall seconds, process CPU seconds) of one call."""
  w0, c0 = time.perf_counter(), time.process_time()
  fn()
  return time.perf_counter() - w0, time.process_time() - c0


def _race(fns, repeats, slow_s):
  """Warm up each fn, then time them round-robin (so that load from other jobs hits all alike).

  Returns [(median wall s, median cpu s)]; fns slower than slow_s get a single timed call.
  """
  counts = []
  for fn in fns:
    wall, _ = _timed(fn)  # warm-up
    counts.append(repeats if wall < slow_s else 1)
  samples = [[] for _ in fns]
  for r in range(max(counts, default=0)):
    for i, fn in enumerate(fns):
      if r < counts[i]:
        samples[i].append(_timed(fn))
  return [tuple(float(np.median(x)) for x in zip(*s)) for s in samples]


def bench_train(args, B, N, H, seq_lens):
  print(f"\n## forward+backward, causal, float32, B={B} N=K={N} H={H}")
  print(f"{'T':>6} {'implementation':>14} {'wall ms':>9} {'cpu ms':>9} {'temp GB':>8} {'vs xla':>7}")
  for T in seq_lens:
    q, k, v = _inputs(B, T, N, H)
    rows = []
    for name in args.impls:
      _, fn, bytes_per_score = _IMPLS[name]
      estimate = bytes_per_score * B * N * T * T / 2**30
      if estimate > args.mem_limit_gb:
        rows.append((name, None, estimate))
        continue
      loss = lambda q, k, v, fn=fn: jnp.sum(jnp.square(fn(q, k, v)))
      compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
      temp = compiled.memory_analysis().temp_size_in_bytes / 2**30
      rows.append((name, lambda c=compiled: jax.block_until_ready(c(q, k, v)), temp))
    timed = iter(_race([fn for _, fn, _ in rows if fn is not None], args.repeats, args.slow_s))
    results = [(name, next(timed) if fn is not None else None, mem) for name, fn, mem in rows]
    base = dict((name, t) for name, t, _ in results if t is not None).get("xla")
    for name, t, mem in results:
      if t is None:
        print(f"{T:>6} {name:>14} {'skipped':>9} {'':>9} {f'~{mem:.0f}':>8} {'':>7}", flush=True)
        continue
      ratio = f"{base[1] / t[1]:.1f}x" if base else ""
      print(f"{T:>6} {name:>14} {t[0] * 1e3:>9.1f} {t[1] * 1e3:>9.1f} {mem:>8.3f} {ratio:>7}",
            flush=True)


def bench_decode(args):
  B, N, H, steps = args.batch, args.heads, args.head_dim, args.decode_steps
  print(f"\n## one-token decode, B={B} N=K={N} H={H}, wall ms per token "
        f"(jitted scan of {steps} steps, median of {args.repeats})")
  print(f"{'context':>8} {'kv_cache ea':>12} {'kv_cache dpa':>13} {'recurrent ea²':>14}")
  rng = np.random.default_rng(1)
  for ctx in args.decode_contexts:
    q, k, v = (jnp.asarray(rng.normal(size=(steps, B, 1, N, H)), jnp.float32) for _ in range(3))
    fns = []
    for kind in ("ea", "dpa"):
      cache = attn.init_kv_cache(B, ctx + steps, N, H)
      filled = jnp.asarray(rng.normal(size=(B, ctx, N, H)), jnp.float32)
      cache = attn.KVCache(cache.key.at[:, :ctx].set(filled), cache.value.at[:, :ctx].set(filled),
                           jnp.asarray(ctx, jnp.int32))
      fns.append(functools.partial(_run_kv, cache, q, k, v, kind=kind))
    state = attn.init_recurrent_state(B, N, H)
    state = attn.RecurrentState(state.kv + 1.0, state.z + 1.0)  # contents do not change the cost
    fns.append(functools.partial(_run_recurrent, state, q, k, v))
    times = _race([lambda f=f: jax.block_until_ready(f()) for f in fns], args.repeats, args.slow_s)
    ms = [t[0] / steps * 1e3 for t in times]
    print(f"{ctx:>8} {ms[0]:>12.3f} {ms[1]:>13.3f} {ms[2]:>14.3f}", flush=True)


@functools.partial(jax.jit, static_argnames=("kind",))
def _run_kv(cache, q, k, v, *, kind):
  def step(c, x):
    out, c = attn.kv_cache_step(c, *x, kind=kind)
    return c, out
  return jax.lax.scan(step, cache, (q, k, v))[1]


@jax.jit
def _run_recurrent(state, q, k, v):
  def step(s, x):
    out, s = attn.recurrent_step(s, *x)
    return s, out
  return jax.lax.scan(step, state, (q, k, v))[1]


def _ints(text):
  return [int(x) for x in text.split(",") if x]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--quick", action="store_true", help="tiny sizes, 2 repeats: a smoke run")
  p.add_argument("--seq_lens", type=_ints, default=_ints("256,512,2048,4096,8192"))
  p.add_argument("--impls", type=lambda s: s.split(","), default=_DEFAULT_IMPLS.split(","),
                 help=f"comma list from {sorted(_IMPLS)}")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--head_dim", type=int, default=32)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--small_seq_lens", type=_ints, default=_ints("64,128"),
                 help="a first table at training-sized shapes (--small_batch, --small_head_dim)")
  p.add_argument("--small_batch", type=int, default=32)
  p.add_argument("--small_head_dim", type=int, default=16)
  p.add_argument("--mem_limit_gb", type=float, default=12.0)
  p.add_argument("--slow_s", type=float, default=5.0,
                 help="calls whose warm-up takes longer than this are timed once")
  p.add_argument("--decode_contexts", type=_ints, default=_ints("512,2048,8192,32768"))
  p.add_argument("--decode_steps", type=int, default=16)
  args = p.parse_args(argv)
  for name in args.impls:
    if name not in _IMPLS:
      p.error(f"--impls: unknown {name!r}; allowed: {sorted(_IMPLS)}")
  if args.quick:
    args.seq_lens, args.small_seq_lens, args.repeats = [256], [64], 2
    args.decode_contexts, args.decode_steps = [256, 1024], 4
  print(f"# jax {jax.__version__}, backend {jax.default_backend()}, "
        f"load average at start {os.getloadavg()[0]:.2f}")
  if args.small_seq_lens:
    bench_train(args, args.small_batch, args.heads, args.small_head_dim, args.small_seq_lens)
  if args.seq_lens:
    bench_train(args, args.batch, args.heads, args.head_dim, args.seq_lens)
  if args.decode_contexts:
    bench_decode(args)
  print(f"# load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
  main()
