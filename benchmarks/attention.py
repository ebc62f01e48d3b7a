"""Attention benchmark: the machine's fp32 matmul peak, then forward+backward time, achieved
FLOP/s and fraction of that peak, compile time and XLA temp memory per implementation; decode.

  python benchmarks/attention.py --seq_lens=2048,8192 --small_seq_lens= --decode_contexts=
  python benchmarks/attention.py                 # full table (~10 min on a 2-core CPU)
  python benchmarks/attention.py --quick         # smoke run (seconds)
  python benchmarks/attention.py --profile       # where a chunked block's time goes

Peak: the median time of one jitted n x n x n float32 matmul (--peak_n), 2 n^3 FLOP, measured in
the same run, before the attention rows.
Training table: median wall time and process CPU time of jit(value_and_grad(sum(out^2))) w.r.t.
(q, k, v) after one warm-up call, causal, B x T x N x H inputs with K = N key/value heads; the
implementations of one T are timed round-robin, so that load from other jobs hits them alike.
"vs xla" is the ratio of wall times to jax.nn.dot_product_attention(implementation="xla") in the
same round. The goals at the end are ratios of medians, each with its spread within the run (the
same ratio taken round by round). "compile s" is lower+compile of the fwd+bwd program. "temp" is
XLA's temporary buffer size from compiled.memory_analysis(). Rows whose estimated temp memory exceeds --mem_limit_gb
are compiled but not run.
FLOP counts (useful work, written out in `useful_flops`): causal attention has
P = T (T + 1) / 2 allowed (query, key) pairs per head ("causal halving": the materialised forms
execute T^2 pairs and are still credited P). The quadratic forms do 2 matmuls forward (S = Q K^T,
O = W V) and 5 backward (S recomputed, dP = dO V^T, dQ, dK, dV): 7 * 2 H FLOP per pair and head.
The linear form (square kernel, chunk C, F = H (H + 1) / 2 features) does per token and head six
state matmuls of 2 F (H + 1) FLOP (forward: read the state, update it; backward: the cotangents of
phi(q), of the state read, of phi(k) and of v; the + 1 column is the denominator's z) and the
in-chunk quadratic part, 2 forward and 5 backward matmuls of 2 H (C + 1) / 2 (causal halving).
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
from ea_jax import runtime  # noqa: E402  pylint: disable=g-import-not-at-top

# name -> (kind label, function(q, k, v) -> out, temp-memory estimate in bytes per score element)
_IMPLS = {
  "xla": (
    "dpa",
    lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla"),
    5.0 * 4,
  ),
  "dpa_naive": (
    "dpa",
    lambda q, k, v: attn.dot_product_attention(q, k, v, is_causal=True, implementation="naive"),
    5.0 * 4,
  ),
  "dpa_chunked": (
    "dpa",
    lambda q, k, v: attn.dot_product_attention(q, k, v, is_causal=True, implementation="chunked"),
    0.0,
  ),
  "ea_naive": (
    "ea",
    lambda q, k, v: attn.expressive_attention(q, k, v, is_causal=True, implementation="naive"),
    8.0 * 4,
  ),
  "ea_chunked": (
    "ea",
    lambda q, k, v: attn.expressive_attention(q, k, v, is_causal=True, implementation="chunked"),
    0.0,
  ),
  "ea_sq_chunked": (
    "ea",
    lambda q, k, v: attn.expressive_attention(
      q, k, v, is_causal=True, kernel="square", implementation="chunked"
    ),
    0.0,
  ),
  "ea_sq_linear": (
    "ea",
    lambda q, k, v: attn.expressive_attention(
      q, k, v, is_causal=True, kernel="square", implementation="linear"
    ),
    0.0,
  ),
  "ea_auto": ("ea", lambda q, k, v: attn.expressive_attention(q, k, v, is_causal=True), 0.0),
}


def _traced_with(module, constants, **call):
  """An implementation traced with `module`'s constants set to `constants` (restored after
  tracing), e.g. another block or chunk size, to compare settings side by side."""

  def fn(q, k, v):
    saved = {name: getattr(module, name) for name in constants}
    for name, value in constants.items():
      setattr(module, name, value)
    try:
      return attn.expressive_attention(q, k, v, is_causal=True, **call)
    finally:
      for name, value in saved.items():
        setattr(module, name, value)

  return fn


# The square-kernel linear form with another LINEAR_CHUNK (the constant the tests also vary).
for _c in (32, 64, 256, 512):
  _IMPLS[f"ea_sq_linear_c{_c}"] = (
    "ea",
    _traced_with(attn.linear, {"LINEAR_CHUNK": _c}, kernel="square", implementation="linear"),
    0.0,
  )
# Chunked EA with other blocks: b256 = the setting before 512 (256 x 256 blocks, 4 heads per step
# on CPU); b512h1 = 512 x 512 blocks with one head per step.
for _name, _rows in (("ea_chunked_b256", 256), ("ea_chunked_b512h1", 512)):
  _IMPLS[_name] = (
    "ea",
    _traced_with(
      attn.chunked, {"CHUNK_ROWS": _rows, "_STEP_SCORES_CPU": 1 << 18}, implementation="chunked"
    ),
    0.0,
  )
# Chunked EA with its aligned diagonal blocks computed whole (the form before the halves).
_IMPLS["ea_chunked_whole"] = (
  "ea",
  _traced_with(attn.chunked, {"DIAGONAL_HALVES": False}, implementation="chunked"),
  0.0,
)
_DEFAULT_IMPLS = "xla,dpa_naive,dpa_chunked,ea_naive,ea_chunked,ea_sq_chunked,ea_sq_linear,ea_auto"


def useful_flops(name, B, T, N, H):
  """FLOP of one causal fwd+bwd call credited to `name` (see the module docstring)."""
  if name.startswith("ea_sq_linear"):
    chunk = int(name.rsplit("_c", 1)[1]) if "_c" in name else attn.linear.LINEAR_CHUNK
    C = min(chunk, T)
    F = attn.num_square_features(H)
    return B * N * T * (6 * 2 * F * (H + 1) + 7 * 2 * H * (C + 1) / 2)
  pairs = T * (T + 1) / 2  # causal halving
  return 7 * 2 * H * pairs * B * N


def _peak_matmul(n):
  """A compiled float32 n x n @ n x n and its operands (2 n^3 FLOP)."""
  rng = np.random.default_rng(0)
  a, b = (jnp.asarray(rng.normal(size=(n, n)), jnp.float32) for _ in range(2))
  return jax.jit(jnp.matmul).lower(a, b).compile(), a, b


def _inputs(batch, seq_len, heads, head_dim, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  return tuple(
    jnp.asarray(rng.normal(size=(batch, seq_len, heads, head_dim)), dtype) for _ in range(3)
  )


def _timed(fn):
  """(wall seconds, process CPU seconds) of one call."""
  w0, c0 = time.perf_counter(), time.process_time()
  fn()
  return time.perf_counter() - w0, time.process_time() - c0


def _race(fns, repeats, slow_s):
  """Warm up each fn, then time them round-robin (so that load from other jobs hits all alike).

  Returns ([(median wall s, median cpu s)], [[wall s of each round]]); fns slower than slow_s
  get a single timed call.
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
  medians = [tuple(float(np.median(x)) for x in zip(*s)) for s in samples]
  return medians, [[wall for wall, _ in s] for s in samples]


def bench_train(args, B, N, H, seq_lens):
  """Prints the fwd+bwd table.

  Returns ({(T, name): median wall s}, {T: peak FLOP/s}, {(T, name): [wall s of each round]},
  with name "matmul peak" for the peak's rounds).
  """
  print(
    f'\n## forward+backward, causal, float32, B={B} N=K={N} H={H}; "of peak" against the '
    f"{args.peak_n}^3 matmul timed in the same rounds"
  )
  print(
    f"{'T':>6} {'implementation':>17} {'wall ms':>9} {'cpu ms':>9} {'GFLOP':>7} "
    f"{'GFLOP/s':>8} {'of peak':>7} {'compile s':>9} {'temp GB':>8} {'vs xla':>7}"
  )
  walls, peaks, rounds = {}, {}, {}
  for T in seq_lens:
    q, k, v = _inputs(B, T, N, H)
    rows = []
    for name in args.impls:
      _, fn, bytes_per_score = _IMPLS[name]
      estimate = bytes_per_score * B * N * T * T / 2**30
      loss = lambda q, k, v, fn=fn: jnp.sum(jnp.square(fn(q, k, v)))
      t0 = time.perf_counter()
      compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
      compile_s = time.perf_counter() - t0
      if estimate > args.mem_limit_gb:
        rows.append((name, None, estimate, compile_s))
        continue
      temp = compiled.memory_analysis().temp_size_in_bytes / 2**30
      rows.append((name, lambda c=compiled: jax.block_until_ready(c(q, k, v)), temp, compile_s))
    # The peak matmul runs in the same rounds as the attention rows (same load).
    mm, a, b = _peak_matmul(args.peak_n)
    run_rows = [row for row in rows if row[1] is not None]
    timed, per_round = _race(
      [fn for _, fn, _, _ in run_rows] + [lambda: jax.block_until_ready(mm(a, b))],
      args.repeats,
      args.slow_s,
    )
    rounds[(T, "matmul peak")] = per_round[-1]
    rounds.update(((T, name), r) for (name, *_), r in zip(run_rows, per_round))
    peak = 2.0 * args.peak_n**3 / timed[-1][0]
    peaks[T] = peak
    print(
      f"{T:>6} {'matmul peak':>17} {timed[-1][0] * 1e3:>9.1f} {timed[-1][1] * 1e3:>9.1f} "
      f"{2.0 * args.peak_n**3 / 1e9:>7.1f} {peak / 1e9:>8.1f} {1.0:>7.2f}",
      flush=True,
    )
    medians = dict(zip([name for name, *_ in run_rows], timed))
    results = [(name, medians.get(name), mem, cs) for name, _, mem, cs in rows]
    base = medians.get("xla")
    for name, t, mem, compile_s in results:
      flop = useful_flops(name, B, T, N, H)
      if t is None:
        print(
          f"{T:>6} {name:>17} {'skipped':>9} {'':>9} {flop / 1e9:>7.1f} {'':>8} {'':>7} "
          f"{compile_s:>9.2f} {f'~{mem:.0f}':>8} {'':>7}",
          flush=True,
        )
        continue
      walls[(T, name)] = t[0]
      ratio = f"{t[0] / base[0]:.3f}" if base else ""
      rate = flop / t[0]
      peak = peaks[T]
      print(
        f"{T:>6} {name:>17} {t[0] * 1e3:>9.1f} {t[1] * 1e3:>9.1f} {flop / 1e9:>7.1f} "
        f"{rate / 1e9:>8.1f} {rate / peak:>7.2f} {compile_s:>9.2f} {mem:>8.3f} {ratio:>7}",
        flush=True,
      )
  return walls, peaks, rounds


def _spread(values):
  """'min-max over n rounds' of per-round values."""
  return f"rounds {min(values):.3f}-{max(values):.3f}, n={len(values)}"


def print_goals(walls, peaks, rounds, B, N, H, peak_n):
  """The goals of the attention roofline, from the rows of this run.

  Each ratio is the ratio of the two rows' medians; beside it, the spread of the ratio within
  the run: the same ratio taken round by round (the rows of one round ran back to back).
  """
  print("\n## goals (wall-time ratios from the same rounds)")

  def show(label, num, den, goal):
    if num in walls and den in walls:
      r = walls[num] / walls[den]
      paired = [a / b for a, b in zip(rounds[num], rounds[den])]
      print(f"{label}: {r:.3f} (goal {goal}; {_spread(paired)})")

  show("ea_auto / xla at T=2048", (2048, "ea_auto"), (2048, "xla"), "<= 0.10")
  show(
    "ea_sq_linear / ea_sq_chunked at T=8192",
    (8192, "ea_sq_linear"),
    (8192, "ea_sq_chunked"),
    "<= 0.25",
  )
  if (2048, "ea_chunked") in walls:
    flop = useful_flops("ea_chunked", B, 2048, N, H)
    frac = flop / walls[(2048, "ea_chunked")] / peaks[2048]
    peak_flop = 2.0 * peak_n**3
    paired = [
      (flop / w) / (peak_flop / p)
      for w, p in zip(rounds[(2048, "ea_chunked")], rounds[(2048, "matmul peak")])
    ]
    print(
      f"ea_chunked at T=2048, fraction of the matmul peak: {frac:.2f} (goal >= 0.50; "
      f"{_spread(paired)})"
    )


def _bwd_rows_by_keys(q, k, v, do):
  """dQ + dK + dV of one rational-EA block from a [h, R, C] score block (Z = 1, delta = 0)."""
  f, df = attn.reference.kernel_and_derivative(jnp.einsum("hrd,hcd->hrc", q, k), "rational")
  ds = df * jnp.einsum("hrd,hcd->hrc", do, v)
  dq = jnp.einsum("hrc,hcd->hrd", ds, k)
  return dq + jnp.einsum("hrc,hrd->hcd", ds, q) + jnp.einsum("hrc,hrd->hcd", f, do)


def _bwd_keys_by_rows(q, k, v, do):
  """The same from a [h, C, R] block, as chunked.py's backward lays it out."""
  f, df = attn.reference.kernel_and_derivative(jnp.einsum("hcd,hrd->hcr", k, q), "rational")
  ds = df * jnp.einsum("hcd,hrd->hcr", v, do)
  dq = jnp.einsum("hrc,hcd->hrd", jnp.swapaxes(ds, 1, 2), k)
  return dq + jnp.einsum("hcr,hrd->hcd", ds, q) + jnp.einsum("hcr,hrd->hcd", f, do)


def profile_block(args):
  """Where one chunked block step goes: the parts of an EA block, timed separately.

  One step is h heads x (R = C query rows) x (C keys) x H, as in chunked.py's loop bodies; each
  part runs --profile_iters times inside one jitted fori_loop (so dispatch is not counted).
  """
  C, H = attn.chunked.CHUNK_ROWS, args.head_dim
  h = max(1, attn.chunked._STEP_SCORES_CPU // (C * C))  # pylint: disable=protected-access
  iters = args.profile_iters
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(h, C, H)), jnp.float32) for _ in range(3))
  s0 = jnp.asarray(rng.normal(size=(h, C, C)), jnp.float32)
  allowed = jnp.arange(C)[None, :] <= jnp.arange(C)[:, None]
  # Each part maps the loop carry (s [h,C,C], o [h,C,H]) to a new carry whose inputs depend on
  # the old one (so XLA cannot hoist the work out of the loop: the small [h,C,H] adds `q + o`,
  # `v + o` are part of the matmul forms, and o changes in every iteration); the W V forms
  # accumulate into o, as the chunked forward does, never into a slice of s (a slice update
  # would be timed with them).
  ones = jnp.ones((h, C, 1), v.dtype)
  v1 = lambda o: jnp.concatenate([v + o, ones], axis=-1)  # V with a ones column
  ea_f = lambda s: jnp.where(allowed, attn.ea_kernel(s, "rational"), 0.0)
  both = lambda x: x[..., :H] + x[..., H:]  # uses O and z, so neither part is dead code
  parts = {
    "S = Q K^T (matmul)": lambda s, o: (s + jnp.einsum("hrd,hcd->hrc", q + o, k) * 1e-9, o + 1e-9),
    "O += W V (matmul)": lambda s, o: (s, o + 1e-9 * jnp.einsum("hrc,hcd->hrd", s, v + o)),
    "O^T += V^T W^T (matmul, transposed out)": lambda s, o: (
      s,
      o + 1e-9 * jnp.swapaxes(jnp.einsum("hcd,hrc->hdr", v + o, s), 1, 2),
    ),
    "[O|z] += W [V|1] (matmul + row sum)": lambda s, o: (
      s,
      o + 1e-9 * both(jnp.einsum("hrc,hcd->hrd", s, v1(o))),
    ),
    "f(s) rational (elementwise)": lambda s, o: (s + 1e-9 * attn.ea_kernel(s, "rational"), o),
    "f(s) square (elementwise)": lambda s, o: (s + 1e-9 * attn.ea_kernel(s, "square"), o),
    "causal where (mask)": lambda s, o: (jnp.where(allowed, s, 0.0) + 1e-9, o),
    "row sum (with an add)": lambda s, o: (
      s,
      o + 1e-9 * jnp.sum(s + o[..., :1], axis=-1, keepdims=True),
    ),
    "fwd block body, separate row sum": lambda s, o: (
      s,
      o
      + 1e-9
      * (
        jnp.einsum("hrc,hcd->hrd", f := ea_f(jnp.einsum("hrd,hcd->hrc", q + o, k)), v + o)
        + jnp.sum(f, axis=-1, keepdims=True)
      ),
    ),
    "fwd block body, ones column": lambda s, o: (
      s,
      o
      + 1e-9 * both(jnp.einsum("hrc,hcd->hrd", ea_f(jnp.einsum("hrd,hcd->hrc", q + o, k)), v1(o))),
    ),
    "transpose of a [h,C,C] block (layout)": lambda s, o: (jnp.swapaxes(s, 1, 2) + 1e-9, o),
    # The backward block (rational EA, no mask): S and dP recomputed, then dQ, dK, dV; the
    # block laid out rows by keys (dK, dV contract both operands' leading axis), or keys by rows
    # as chunked.py does (dK, dV plain matmuls, dQ reads the block transposed).
    "bwd block body, rows by keys": lambda s, o: (s, o + 1e-9 * _bwd_rows_by_keys(q + o, k, v, q)),
    "bwd block body, keys by rows": lambda s, o: (s, o + 1e-9 * _bwd_keys_by_rows(q + o, k, v, q)),
  }
  print(
    f"\n## profile of one chunked step: h={h} heads, C={C} rows x {C} keys, H={H} "
    f"(median of {args.repeats} runs of {iters} iterations)"
  )
  print(f"{'part':>42} {'us/step':>9} {'GFLOP/s':>8}")
  mm = 2 * h * C * C * H
  flops = {
    "S = Q K^T (matmul)": mm,
    "O += W V (matmul)": mm,
    "O^T += V^T W^T (matmul, transposed out)": mm,
    "[O|z] += W [V|1] (matmul + row sum)": mm,  # credited H columns, not H + 1
    "fwd block body, separate row sum": 2 * mm,
    "fwd block body, ones column": 2 * mm,
    "bwd block body, rows by keys": 5 * mm,
    "bwd block body, keys by rows": 5 * mm,
  }
  o0 = jnp.zeros((h, C, H), jnp.float32)
  for name, body in parts.items():
    fn = jax.jit(lambda s, o, body=body: jax.lax.fori_loop(0, iters, lambda i, c: body(*c), (s, o)))
    fn = fn.lower(s0, o0).compile()
    run = lambda: jax.block_until_ready(fn(s0, o0))
    run()
    t = float(np.median([_timed(run)[0] for _ in range(args.repeats)])) / iters
    rate = f"{flops[name] / t / 1e9:.1f}" if name in flops else ""
    print(f"{name:>42} {t * 1e6:>9.1f} {rate:>8}", flush=True)


def bench_decode(args):
  B, N, H, steps = args.batch, args.heads, args.head_dim, args.decode_steps
  print(
    f"\n## one-token decode, B={B} N=K={N} H={H}, wall ms per token "
    f"(jitted scan of {steps} steps, median of {args.repeats})"
  )
  print(f"{'context':>8} {'kv_cache ea':>12} {'kv_cache dpa':>13} {'recurrent ea²':>14}")
  rng = np.random.default_rng(1)
  for ctx in args.decode_contexts:
    q, k, v = (jnp.asarray(rng.normal(size=(steps, B, 1, N, H)), jnp.float32) for _ in range(3))
    fns = []
    for kind in ("ea", "dpa"):
      cache = attn.init_kv_cache(B, ctx + steps, N, H)
      filled = jnp.asarray(rng.normal(size=(B, ctx, N, H)), jnp.float32)
      cache = cache._replace(
        key=cache.key.at[:, :ctx].set(filled),
        value=cache.value.at[:, :ctx].set(filled),
        length=jnp.asarray(ctx, jnp.int32),
      )
      fns.append(functools.partial(_run_kv, cache, q, k, v, kind=kind))
    state = attn.init_recurrent_state(B, N, H)
    state = attn.RecurrentState(state.kv + 1.0, state.z + 1.0)  # contents do not change the cost
    fns.append(functools.partial(_run_recurrent, state, q, k, v))
    times, _ = _race(
      [lambda f=f: jax.block_until_ready(f()) for f in fns], args.repeats, args.slow_s
    )
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
  p.add_argument(
    "--impls",
    type=lambda s: s.split(","),
    default=_DEFAULT_IMPLS.split(","),
    help=f"comma list from {sorted(_IMPLS)}",
  )
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--head_dim", type=int, default=32)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument(
    "--small_seq_lens",
    type=_ints,
    default=_ints("64,128"),
    help="a first table at training-sized shapes (--small_batch, --small_head_dim)",
  )
  p.add_argument("--small_batch", type=int, default=32)
  p.add_argument("--small_head_dim", type=int, default=16)
  p.add_argument("--mem_limit_gb", type=float, default=12.0)
  p.add_argument(
    "--slow_s",
    type=float,
    default=5.0,
    help="calls whose warm-up takes longer than this are timed once",
  )
  p.add_argument("--decode_contexts", type=_ints, default=_ints("512,2048,8192,32768"))
  p.add_argument("--decode_steps", type=int, default=16)
  p.add_argument("--peak_n", type=int, default=2048, help="size of the peak-measuring matmul")
  p.add_argument("--profile", action="store_true", help="only the block profile")
  p.add_argument("--profile_iters", type=int, default=200)
  p.add_argument(
    "--malloc",
    choices=("thread_arenas", "one_arena", "glibc_defaults"),
    default="thread_arenas",
    help="ea_jax.runtime.keep_freed_memory() as train.py sets it, with one_arena=True as the "
    "study workers set it, or glibc's defaults",
  )
  args = p.parse_args(argv)
  for name in args.impls:
    if name not in _IMPLS:
      p.error(f"--impls: unknown {name!r}; allowed: {sorted(_IMPLS)}")
  if args.quick:
    args.seq_lens, args.small_seq_lens, args.repeats = [256], [64], 2
    args.decode_contexts, args.decode_steps = [256, 1024], 4
  kept = args.malloc != "glibc_defaults" and runtime.keep_freed_memory(
    one_arena=args.malloc == "one_arena"
  )
  # The CPUs this process may run on (`taskset -c 0 python ...` gives one: XLA sizes its thread
  # pools by this set), and any process-wide XLA flags: both change every row.
  usable = len(os.sched_getaffinity(0))
  print(
    f"# jax {jax.__version__}, backend {jax.default_backend()}, {os.cpu_count()} CPUs "
    f"({usable} usable), XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, "
    f"load average at start {os.getloadavg()[0]:.2f}, malloc: {args.malloc} (applied: {kept})"
  )
  if args.profile:
    profile_block(args)
    print(f"# load average at end {os.getloadavg()[0]:.2f}")
    return
  if args.small_seq_lens:
    bench_train(args, args.small_batch, args.heads, args.small_head_dim, args.small_seq_lens)
  if args.seq_lens:
    walls, peaks, rounds = bench_train(args, args.batch, args.heads, args.head_dim, args.seq_lens)
    print_goals(walls, peaks, rounds, args.batch, args.heads, args.head_dim, args.peak_n)
  if args.decode_contexts:
    bench_decode(args)
  print(f"# load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
  main()
