"""Exactness of every attention implementation against a float64 NumPy reference.

  python benchmarks/attention_exactness.py                  # the table in docs/attention/README.md
  python benchmarks/attention_exactness.py --quick          # T=2048, H=32 only (seconds)

Construction (ill-conditioning of the square-kernel feature form): keys lie in a random
--subspace-dimensional subspace of R^H; each query has a fraction f of its norm inside that
subspace and the rest orthogonal to it, so q . k is a small number computed from large terms.
Queries and keys have norm sqrt(H) (the norm of a standard normal vector), values are standard
normal; B=1, N=K=2, causal, scale 1/sqrt(H), eps=1e-6. The reference is computed in float64 from
the float32-rounded inputs, so the rounding of the inputs is not counted as an error.

Error: max |out - ref| / max |ref| over the whole output [B,T,N,H] (normwise, per implementation).
Columns: naive / chunked / linear / auto (implementation=None) of expressive_attention, and the
one-token decode paths run over the whole sequence: kv_cache (kv_cache_step) and recurrent
(recurrent_step, square kernel only). naive is skipped above --naive_max_len (its [B,N,T,S]
scores do not fit), kv_cache above --decode_max_len (T steps over a T-long cache cost O(T^2 H)).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from ea_jax import attention as attn  # noqa: E402  pylint: disable=g-import-not-at-top

COLUMNS = ("naive", "chunked", "linear", "auto", "kv_cache", "recurrent")


def conditioned_inputs(T, H, f, *, N=2, subspace=8, seed=0):
  """q [1,T,N,H] with a fraction f of its norm in the keys' subspace; k, v [1,T,N,H] (float32)."""
  rng = np.random.default_rng(seed)
  out = []
  basis_NHD = []
  for _ in range(N):
    basis, _ = np.linalg.qr(rng.normal(size=(H, H)))
    basis_NHD.append(basis)
  basis_NHD = np.stack(basis_NHD)  # per head: first `subspace` columns span the keys
  inside_NHD = basis_NHD[:, :, :subspace]
  outside_NHD = basis_NHD[:, :, subspace:]

  def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)

  a_TNH = unit(np.einsum("nhd,tnd->tnh", inside_NHD, rng.normal(size=(T, N, subspace))))
  b_TNH = unit(np.einsum("nhd,tnd->tnh", outside_NHD, rng.normal(size=(T, N, H - subspace))))
  q_TNH = np.sqrt(H) * (f * a_TNH + np.sqrt(1.0 - f * f) * b_TNH)
  k_TNH = np.sqrt(H) * unit(
    np.einsum("nhd,tnd->tnh", inside_NHD, rng.normal(size=(T, N, subspace)))
  )
  v_TNH = rng.normal(size=(T, N, H))
  for x in (q_TNH, k_TNH, v_TNH):
    out.append(np.asarray(x[None], np.float32))
  return tuple(out)


def reference_causal(q, k, v, *, kernel, eps=1e-6, rows=1024):
  """Causal EA in float64, one head and one block of query rows at a time: [1,T,N,H]."""
  q, k, v = (np.asarray(x, np.float64)[0] for x in (q, k, v))
  T, N, H = q.shape
  scale = 1.0 / np.sqrt(H)
  out = np.zeros((T, N, H))
  for n in range(N):
    for r0 in range(0, T, rows):
      r1 = min(T, r0 + rows)
      s = (scale * q[r0:r1, n]) @ k[:r1, n].T
      f = s * s if kernel == "square" else s * s / (1.0 + s * s)
      f *= np.arange(r1)[None, :] <= np.arange(r0, r1)[:, None]
      out[r0:r1, n] = (f @ v[:r1, n]) / (eps + f.sum(-1, keepdims=True))
  return out[None]


def _decode(step, state, q, k, v):
  """Runs a one-token decode step over the whole sequence (jitted scan) -> [1,T,N,H]."""

  def body(s, x):
    o, s = step(s, *x)
    return s, o

  xs = tuple(jnp.swapaxes(x, 0, 1)[:, :, None] for x in (q, k, v))  # [T,B,1,N,H]
  _, o = jax.jit(lambda s, xs: jax.lax.scan(body, s, xs))(state, xs)
  return jnp.swapaxes(o[:, :, 0], 0, 1)


def run_column(column, q, k, v, kernel):
  """Output of one column, or None where it does not apply."""
  B, T, N, H = q.shape
  if column in ("naive", "chunked", "linear", "auto"):
    if column == "linear" and kernel != "square":
      return None
    impl = None if column == "auto" else column
    fn = jax.jit(
      lambda q, k, v: attn.expressive_attention(
        q, k, v, is_causal=True, kernel=kernel, implementation=impl
      )
    )
    return fn(q, k, v)
  if column == "kv_cache":
    cache = attn.init_kv_cache(B, T, N, H)
    step = lambda c, qq, kk, vv: attn.kv_cache_step(c, qq, kk, vv, kind="ea", kernel=kernel)[:2]
    return _decode(step, cache, q, k, v)
  if kernel != "square":
    return None
  return _decode(attn.recurrent_step, attn.init_recurrent_state(B, N, H), q, k, v)


def rel_err(out, ref):
  return float(np.max(np.abs(np.asarray(out, np.float64) - ref)) / np.max(np.abs(ref)))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--quick", action="store_true")
  p.add_argument(
    "--cases", default="2048:32,2048:128,8192:32,8192:128,32768:32", help="comma list of T:H"
  )
  p.add_argument("--fractions", default="1,0.1,0.01,0.001")
  p.add_argument("--kernel", default="square", choices=attn.KERNELS)
  p.add_argument("--naive_max_len", type=int, default=8192)
  p.add_argument("--decode_max_len", type=int, default=8192)
  p.add_argument("--columns", default=",".join(COLUMNS))
  args = p.parse_args(argv)
  if args.quick:
    args.cases = "2048:32"
  columns = args.columns.split(",")
  for c in columns:
    if c not in COLUMNS:
      p.error(f"--columns: unknown {c!r}; allowed: {COLUMNS}")
  cases = [tuple(int(x) for x in c.split(":")) for c in args.cases.split(",")]
  fractions = [float(x) for x in args.fractions.split(",")]
  print(
    f"# jax {jax.__version__}, backend {jax.default_backend()}, kernel={args.kernel}, "
    f"B=1 N=K=2 causal, load average at start {os.getloadavg()[0]:.2f}"
  )
  print("| T | H | f | " + " | ".join(columns) + " |")
  print("|---|---|---|" + "---|" * len(columns))
  t0 = time.time()
  for T, H in cases:
    for f in fractions:
      q, k, v = (jnp.asarray(x) for x in conditioned_inputs(T, H, f))
      ref = reference_causal(q, k, v, kernel=args.kernel)
      cells = []
      for c in columns:
        skip = (c == "naive" and T > args.naive_max_len) or (
          c == "kv_cache" and T > args.decode_max_len
        )
        out = None if skip else run_column(c, q, k, v, args.kernel)
        cells.append("—" if out is None else f"{rel_err(out, ref):.1e}")
      print(f"| {T} | {H} | {f:g} | " + " | ".join(cells) + " |", flush=True)
  print(f"# {time.time() - t0:.0f} s, load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
  main()
