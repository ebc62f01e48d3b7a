"""Attention-space geometry: where attention weight falls as a function of cos(q, k).

DPA gives most weight to keys parallel to the query (cos near +1); EA weighs (q.k)^2, so keys
parallel *and* antiparallel to the query (cos near +1 and -1) get weight and orthogonal ones
none. `weighted_cos_histogram` measures that for given q, k and weights; `attention_geometry`
does it per layer and head of a trained model (q, k captured from the attention module's
projections, after rope / q-k norm, i.e. exactly the vectors whose dot product is scored);
`run_geometry` applies it to a training workdir, on sequences of the task's test split.

Letters: B batch, T queries, S keys, L sequence length, N query heads, K key/value heads
(query head n uses key/value head n // (N // K)), H head_dim, Y layers, Z histogram bins.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ea_jax import model as model_lib
from ea_jax import tasks
from ea_jax.study.analysis import loading

COS_EPS = 1e-12  # guards |q| |k| = 0 (such pairs get cos 0)


def bin_edges(num_bins: int) -> np.ndarray:
  """`num_bins + 1` equal-width bin edges over [-1, 1]."""
  if not (isinstance(num_bins, int) and num_bins >= 1):
    raise ValueError(f"num_bins={num_bins!r}: must be a positive integer")
  return np.linspace(-1.0, 1.0, num_bins + 1)


def cosine_BNTS(q_BTNH, k_BSKH) -> jax.Array:
  """cos(q_i, k_j) per query head: float32 [B, N, T, S] (grouped-query heads share keys)."""
  B, T, N, H = q_BTNH.shape
  Bk, S, K, Hk = k_BSKH.shape
  if (Bk, Hk) != (B, H) or N % K:
    raise ValueError(
      f"q_BTNH {q_BTNH.shape} and k_BSKH {k_BSKH.shape}: need the same B and H "
      "and N a multiple of K"
    )
  q = q_BTNH.astype(jnp.float32)
  k = k_BSKH.astype(jnp.float32)
  q = q / jnp.maximum(jnp.linalg.norm(q, axis=-1, keepdims=True), COS_EPS)
  k = k / jnp.maximum(jnp.linalg.norm(k, axis=-1, keepdims=True), COS_EPS)
  q_BTKGH = q.reshape(B, T, K, N // K, H)
  cos_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k)
  return jnp.clip(cos_BKGTS.reshape(B, N, T, S), -1.0, 1.0)


def weighted_cos_histogram(
  q_BTNH, k_BSKH, w_BNTS, *, num_bins: int = 20
) -> tuple[np.ndarray, np.ndarray]:
  """Distribution of attention weight over cos(q, k), per head.

  Args:
    q_BTNH: queries; k_BSKH: keys (grouped-query layout as in ea_jax.attention).
    w_BNTS: attention weights (masked pairs carry weight 0).
    num_bins: equal-width bins over [-1, 1]; cos = 1 falls in the last bin.
  Returns:
    (edges [Z + 1], hist_NZ) with hist_NZ[n, z] = (sum of weights of head n over pairs whose
    cos falls in bin z) / (total weight of head n); rows sum to 1 (all zeros if a head has no
    weight at all).
  """
  edges = bin_edges(num_bins)
  cos_BNTS = cosine_BNTS(q_BTNH, k_BSKH)
  if w_BNTS.shape != cos_BNTS.shape:
    raise ValueError(f"w_BNTS shape {w_BNTS.shape} != [B, N, T, S] = {cos_BNTS.shape}")
  N = cos_BNTS.shape[1]
  bin_BNTS = jnp.clip(jnp.floor((cos_BNTS + 1.0) * (num_bins / 2.0)), 0, num_bins - 1)
  segment_BNTS = jnp.arange(N, dtype=jnp.int32)[None, :, None, None] * num_bins + bin_BNTS.astype(
    jnp.int32
  )
  sums = jax.ops.segment_sum(
    w_BNTS.astype(jnp.float32).ravel(), segment_BNTS.ravel(), num_segments=N * num_bins
  )
  hist_NZ = np.asarray(sums, np.float64).reshape(N, num_bins)
  total_N1 = hist_NZ.sum(axis=1, keepdims=True)
  return edges, np.divide(hist_NZ, total_N1, out=np.zeros_like(hist_NZ), where=total_N1 > 0)


def geometry_stats(edges, hist_Z) -> dict:
  """Summary numbers of one normalised histogram: mean cos, weight at cos < 0 (antiparallel
  side), weight at |cos| >= 0.5 (aligned either way) and at |cos| < 0.5."""
  centers = 0.5 * (edges[1:] + edges[:-1])
  hist_Z = np.asarray(hist_Z, np.float64)
  return {
    "mean_cos": float(np.sum(hist_Z * centers)),
    "mass_negative": float(np.sum(hist_Z[centers < 0])),
    "mass_aligned": float(np.sum(hist_Z[np.abs(centers) >= 0.5])),
    "mass_orthogonal": float(np.sum(hist_Z[np.abs(centers) < 0.5])),
  }


def capture_qkv(model, params, tokens_BL) -> list[tuple[jax.Array, jax.Array, jax.Array]]:
  """(q_BLNH, k_BLKH, v_BLKH) per layer, as the model's attention layers use them.

  Captures the output of each attention module's projection step (`Attention._project` in
  ea_jax.model: q, k after q/k-norm and rope) with Flax `capture_intermediates`.
  """

  def wanted(module, method_name):
    return isinstance(module, model_lib.Attention) and method_name == "_project"

  _, state = model.apply(
    {"params": params}, tokens_BL, capture_intermediates=wanted, mutable=["intermediates"]
  )
  sown = state["intermediates"]
  out = []
  for i in range(model.cfg.num_layers):
    try:
      q_BLNH, k_BLKH, v_BLKH = sown[f"block_{i}"]["attention"]["_project"][0]
    except KeyError:
      raise RuntimeError(
        "could not capture q/k/v: ea_jax.model.Attention no longer has a "
        "`_project` step returning (q, k, v); update capture_qkv"
      ) from None
    out.append((q_BLNH, k_BLKH, v_BLKH))
  return out


def capture_qk(model, params, tokens_BL) -> list[tuple[jax.Array, jax.Array]]:
  """(q_BLNH, k_BLKH) per layer (see `capture_qkv`)."""
  return [(q, k) for q, k, _ in capture_qkv(model, params, tokens_BL)]


def attention_geometry(model, params, tokens_BL, *, num_bins: int = 20) -> dict:
  """Per layer and head weighted cos(q, k) histograms of `model` on `tokens_BL`.

  Returns {"edges": [Z + 1], "hist_YNZ": [layers, heads, Z], "hist_Z": all heads pooled
  (mean over layers x heads), "stats": geometry_stats of the pooled histogram}.
  """

  @jax.jit
  def qk_and_weights(params, tokens_BL):  # one compiled forward each, not op by op
    return capture_qk(model, params, tokens_BL), model_lib.attention_maps(model, params, tokens_BL)

  qk, weights = qk_and_weights(params, tokens_BL)
  hists = []
  for (q_BLNH, k_BLKH), w_BNLL in zip(qk, weights):
    edges, hist_NZ = weighted_cos_histogram(q_BLNH, k_BLKH, w_BNLL, num_bins=num_bins)
    hists.append(hist_NZ)
  hist_YNZ = np.stack(hists)
  pooled = hist_YNZ.reshape(-1, num_bins).mean(axis=0)
  return {
    "edges": edges,
    "hist_YNZ": hist_YNZ,
    "hist_Z": pooled,
    "stats": geometry_stats(edges, pooled),
  }


def run_geometry(
  workdir: str, *, num_examples: int = 32, num_bins: int = 20, seed: int = 0
) -> dict:
  """`attention_geometry` of a trained run on `num_examples` sequences of its task's test split.

  Args:
    workdir: a training workdir (latest checkpoint).
    num_examples: sequences drawn from the test split with key `seed`.
    num_bins: histogram bins over cos in [-1, 1].
    seed: sampling key.
  Returns:
    `attention_geometry`'s dict plus "attention" ("ea" / "dpa") and "kernel" (the EA kernel,
    or "softmax").
  """
  model, params, config = loading.load_run(workdir)
  task = tasks.make_task(config.task)
  batch = task.sample(jax.random.key(seed), num_examples, split="test")
  out = attention_geometry(model, params, batch.inputs, num_bins=num_bins)
  out["attention"] = config.model.attention
  out["kernel"] = config.model.ea_kernel if config.model.attention == "ea" else "softmax"
  return out
