"""Attention geometry (ea_jax.analysis): weighted cos(q, k) histograms on hand-built q/k with
known angles, grouped-query head mapping, symmetry of EA, and q/k capture from a real model."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ea_jax import analysis
from ea_jax import attention as attn


def _unit(deg):
  r = math.radians(deg)
  return [math.cos(r), math.sin(r)]


def test_histogram_of_known_angles():
  # One query along x; keys at 20, 75, 100 and 160 degrees (cos .940, .259, -.174, -.940), with
  # different lengths (cos must not depend on them). 8 bins of width 0.25 over [-1, 1]:
  # .940 -> bin 7, .259 -> bin 5, -.174 -> bin 3, -.940 -> bin 0.
  q_BTNH = jnp.asarray([[[[3.0, 0.0]]]])                                     # [1, 1, 1, 2]
  keys = [np.multiply(r, _unit(d)) for r, d in ((1.0, 20), (0.2, 75), (5.0, 100), (2.0, 160))]
  k_BSKH = jnp.asarray(np.array(keys, np.float32)[None, :, None, :])         # [1, 4, 1, 2]
  w_BNTS = jnp.asarray([[[[0.4, 0.3, 0.2, 0.1]]]])
  edges, hist_NZ = analysis.weighted_cos_histogram(q_BTNH, k_BSKH, w_BNTS, num_bins=8)
  np.testing.assert_allclose(edges, np.arange(-1.0, 1.01, 0.25))
  expected = np.zeros(8)
  expected[[7, 5, 3, 0]] = [0.4, 0.3, 0.2, 0.1]
  np.testing.assert_allclose(hist_NZ, expected[None], atol=1e-6)
  stats = analysis.geometry_stats(edges, hist_NZ[0])
  centers = np.array([-0.875, 0.375, -0.125, 0.875])   # centres of bins 0, 5, 3, 7
  np.testing.assert_allclose(stats["mean_cos"], 0.1 * centers[0] + 0.3 * centers[1]
                             + 0.2 * centers[2] + 0.4 * centers[3], atol=1e-9)
  assert stats["mass_negative"] == pytest.approx(0.3)
  assert stats["mass_aligned"] == pytest.approx(0.5)   # bins 0 and 7
  assert stats["mass_orthogonal"] == pytest.approx(0.5)


def test_grouped_query_heads_normalisation_and_masked_pairs():
  # N = 2 query heads share K = 1 key head; head 0 looks along x, head 1 along y. Two queries
  # per head whose weights each sum to 1, so each head's histogram is the mean of the two rows.
  k_BSKH = jnp.asarray(np.array([_unit(0), _unit(90), _unit(180)], np.float32)[None, :, None])
  q_BTNH = jnp.asarray(np.array([[_unit(0), _unit(90)], [_unit(0), _unit(90)]],
                                np.float32)[None])                          # [1, 2, 2, 2]
  w_BNTS = jnp.asarray([[[[1.0, 0.0, 0.0], [0.5, 0.0, 0.5]],                # head 0
                         [[0.0, 1.0, 0.0], [0.25, 0.5, 0.25]]]])            # head 1
  # 4 bins: cos -1 -> bin 0, cos 0 -> bin 2, cos 1 -> bin 3 (the top edge belongs to the last).
  # head 0 (along x): cos with the keys = 1, 0, -1; weight 1.5 at cos 1, 0.5 at cos -1.
  _, hist_NZ = analysis.weighted_cos_histogram(q_BTNH, k_BSKH, w_BNTS, num_bins=4)
  np.testing.assert_allclose(hist_NZ[0], [0.25, 0.0, 0.0, 0.75], atol=1e-6)
  # head 1 (along y): cos with the keys = 0, 1, 0; weight 1.5 at cos 1, 0.5 at cos 0.
  np.testing.assert_allclose(hist_NZ[1], [0.0, 0.0, 0.25, 0.75], atol=1e-6)
  # A head with no weight at all gives zeros, not NaN.
  _, zero_NZ = analysis.weighted_cos_histogram(q_BTNH, k_BSKH, jnp.zeros_like(w_BNTS), num_bins=4)
  assert np.all(zero_NZ == 0)


def test_ea_is_mirror_symmetric_and_dpa_prefers_parallel_keys():
  # Keys come in pairs (k, -k): EA weights depend on (q.k)^2 only, so its histogram over cos is
  # exactly mirror-symmetric; DPA's softmax puts more weight on the parallel side.
  rng = np.random.default_rng(0)
  k = rng.normal(size=(1, 16, 1, 8)).astype(np.float32)
  k_BSKH = jnp.asarray(np.concatenate([k, -k], axis=1))
  q_BTNH = jnp.asarray(rng.normal(size=(1, 5, 2, 8)).astype(np.float32) * 2.0)
  for kind, check in (("ea", "symmetric"), ("dpa", "parallel")):
    w_BNTS = attn.attention_weights(q_BTNH, jnp.repeat(k_BSKH, 2, axis=2), kind=kind)
    edges, hist_NZ = analysis.weighted_cos_histogram(q_BTNH, k_BSKH, w_BNTS, num_bins=10)
    np.testing.assert_allclose(hist_NZ.sum(axis=1), 1.0, atol=1e-6)
    stats = analysis.geometry_stats(edges, hist_NZ.mean(axis=0))
    if check == "symmetric":
      np.testing.assert_allclose(hist_NZ, hist_NZ[:, ::-1], atol=1e-5)
      assert stats["mass_negative"] == pytest.approx(0.5, abs=1e-5)
    else:
      assert stats["mean_cos"] > 0.2 and stats["mass_negative"] < 0.3


def test_bad_input_is_named():
  q = jnp.ones((1, 2, 3, 4))
  with pytest.raises(ValueError, match="N a multiple of K"):
    analysis.cosine_BNTS(q, jnp.ones((1, 2, 2, 4)))
  with pytest.raises(ValueError, match="w_BNTS"):
    analysis.weighted_cos_histogram(q, jnp.ones((1, 2, 3, 4)), jnp.ones((1, 3, 2, 3)))
  with pytest.raises(ValueError, match="num_bins"):
    analysis.bin_edges(0)


@pytest.mark.parametrize("attention,kernel,qk_norm", [("ea", "square", True),
                                                      ("dpa", "rational", False)])
def test_captured_qk_reproduce_the_models_attention(attention, kernel, qk_norm):
  from ea_jax import model as model_lib
  cfg = model_lib.ModelConfig(vocab_size=7, max_len=12, num_layers=2, num_heads=4,
                              num_kv_heads=2, embed_dim=16, mlp_dim=32, attention=attention,
                              ea_kernel=kernel, qk_norm=qk_norm)
  model = model_lib.Transformer(cfg)
  tokens_BL = jax.random.randint(jax.random.key(1), (2, 12), 0, 7)
  params = model.init(jax.random.key(0), tokens_BL)["params"]
  captured = analysis.capture_qk(model, params, tokens_BL)
  maps = model_lib.attention_maps(model, params, tokens_BL)
  assert len(captured) == 2
  for (q_BLNH, k_BLKH), w_BNLL in zip(captured, maps):
    assert q_BLNH.shape == (2, 12, 4, 4) and k_BLKH.shape == (2, 12, 2, 4)
    again = attn.attention_weights(q_BLNH, k_BLKH, kind=attention, is_causal=True,
                                   kernel=kernel)
    np.testing.assert_allclose(again, w_BNLL, atol=1e-5)
  geo = analysis.attention_geometry(model, params, tokens_BL, num_bins=6)
  assert geo["hist_YNZ"].shape == (2, 4, 6)
  np.testing.assert_allclose(geo["hist_YNZ"].sum(axis=-1), 1.0, atol=1e-6)
  np.testing.assert_allclose(geo["hist_Z"].sum(), 1.0, atol=1e-6)
