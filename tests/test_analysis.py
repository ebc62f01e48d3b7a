"""The study's analyses (ea_jax.study.analysis): attention geometry on hand-built q/k and against
a NumPy reference from a real model's captured q/k, delay locking against plain loops and the
task's own sampler, the figures' contents, the report's reductions and options, and the whole
analysis of a tiny trained run."""

import json
import math
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import train_helpers

from ea_jax import files, tasks
from ea_jax import model as model_lib
from ea_jax.study import formatting, plots
from ea_jax.study.analysis import delays, geometry, lengthgen, report


def _unit(deg):
  r = math.radians(deg)
  return [math.cos(r), math.sin(r)]


def _np_weights(q_BTNH, k_BSKH, *, kind, kernel="rational", eps=1e-6, causal=True):
  """Attention weights in float64 NumPy, written from the definitions (scale 1/sqrt(H))."""
  q = np.asarray(q_BTNH, np.float64)
  k = np.asarray(k_BSKH, np.float64)
  _, T, N, H = q.shape
  S, K = k.shape[1], k.shape[2]
  k_BSNH = np.repeat(k, N // K, axis=2)  # query head n uses key head n // (N // K)
  s_BNTS = np.einsum("btnh,bsnh->bnts", q, k_BSNH) / np.sqrt(H)
  allowed_TS = np.tril(np.ones((T, S), bool)) if causal else np.ones((T, S), bool)
  if kind == "dpa":
    s_BNTS = np.where(allowed_TS, s_BNTS, -np.inf)
    e = np.exp(s_BNTS - s_BNTS.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)
  f = s_BNTS**2 / (1.0 + s_BNTS**2) if kernel == "rational" else s_BNTS**2
  f = np.where(allowed_TS, f, 0.0)
  return f / (eps + f.sum(axis=-1, keepdims=True))


def _np_histograms(q_BTNH, k_BSKH, w_BNTS, num_bins):
  """Per head, np.histogram of float64 cos(q, k) weighted by w, normalised: [N, Z]."""
  q = np.asarray(q_BTNH, np.float64)
  k = np.repeat(np.asarray(k_BSKH, np.float64), q.shape[2] // k_BSKH.shape[2], axis=2)
  q = q / np.linalg.norm(q, axis=-1, keepdims=True)
  k = k / np.linalg.norm(k, axis=-1, keepdims=True)
  cos_BNTS = np.einsum("btnh,bsnh->bnts", q, k)
  edges = np.linspace(-1.0, 1.0, num_bins + 1)
  w = np.asarray(w_BNTS, np.float64)
  hist_NZ = np.stack(
    [
      np.histogram(np.clip(cos_BNTS[:, n], -1, 1).ravel(), bins=edges, weights=w[:, n].ravel())[0]
      for n in range(q.shape[2])
    ]
  )
  return hist_NZ / hist_NZ.sum(axis=1, keepdims=True)


# ------------------------------------------------------------------------------------------------
# Attention geometry (geometry.py)
# ------------------------------------------------------------------------------------------------


def test_histogram_of_known_angles():
  # One query along x; keys at 20, 75, 100 and 160 degrees (cos .940, .259, -.174, -.940), with
  # different lengths (cos must not depend on them). 8 bins of width 0.25 over [-1, 1]:
  # .940 -> bin 7, .259 -> bin 5, -.174 -> bin 3, -.940 -> bin 0.
  q_BTNH = jnp.asarray([[[[3.0, 0.0]]]])  # [1, 1, 1, 2]
  keys = [np.multiply(r, _unit(d)) for r, d in ((1.0, 20), (0.2, 75), (5.0, 100), (2.0, 160))]
  k_BSKH = jnp.asarray(np.array(keys, np.float32)[None, :, None, :])  # [1, 4, 1, 2]
  w_BNTS = jnp.asarray([[[[0.4, 0.3, 0.2, 0.1]]]])
  edges, hist_NZ = geometry.weighted_cos_histogram(q_BTNH, k_BSKH, w_BNTS, num_bins=8)
  np.testing.assert_allclose(edges, np.arange(-1.0, 1.01, 0.25))
  expected = np.zeros(8)
  expected[[7, 5, 3, 0]] = [0.4, 0.3, 0.2, 0.1]
  np.testing.assert_allclose(hist_NZ, expected[None], atol=1e-6)
  stats = geometry.geometry_stats(edges, hist_NZ[0])
  centers = np.array([-0.875, 0.375, -0.125, 0.875])  # centres of bins 0, 5, 3, 7
  np.testing.assert_allclose(
    stats["mean_cos"],
    0.1 * centers[0] + 0.3 * centers[1] + 0.2 * centers[2] + 0.4 * centers[3],
    atol=1e-9,
  )
  assert stats["mass_negative"] == pytest.approx(0.3)
  assert stats["mass_aligned"] == pytest.approx(0.5)  # bins 0 and 7
  assert stats["mass_orthogonal"] == pytest.approx(0.5)


def test_grouped_query_heads_normalisation_and_masked_pairs():
  # N = 2 query heads share K = 1 key head; head 0 looks along x, head 1 along y. Two queries
  # per head whose weights each sum to 1, so each head's histogram is the mean of the two rows.
  k_BSKH = jnp.asarray(np.array([_unit(0), _unit(90), _unit(180)], np.float32)[None, :, None])
  q_BTNH = jnp.asarray(
    np.array([[_unit(0), _unit(90)], [_unit(0), _unit(90)]], np.float32)[None]
  )  # [1, 2, 2, 2]
  w_BNTS = jnp.asarray(
    [
      [
        [[1.0, 0.0, 0.0], [0.5, 0.0, 0.5]],  # head 0
        [[0.0, 1.0, 0.0], [0.25, 0.5, 0.25]],
      ]
    ]
  )  # head 1
  # 4 bins: cos -1 -> bin 0, cos 0 -> bin 2, cos 1 -> bin 3 (the top edge belongs to the last).
  # head 0 (along x): cos with the keys = 1, 0, -1; weight 1.5 at cos 1, 0.5 at cos -1.
  _, hist_NZ = geometry.weighted_cos_histogram(q_BTNH, k_BSKH, w_BNTS, num_bins=4)
  np.testing.assert_allclose(hist_NZ[0], [0.25, 0.0, 0.0, 0.75], atol=1e-6)
  # head 1 (along y): cos with the keys = 0, 1, 0; weight 1.5 at cos 1, 0.5 at cos 0.
  np.testing.assert_allclose(hist_NZ[1], [0.0, 0.0, 0.25, 0.75], atol=1e-6)
  # A head with no weight at all gives zeros, not NaN.
  _, zero_NZ = geometry.weighted_cos_histogram(q_BTNH, k_BSKH, jnp.zeros_like(w_BNTS), num_bins=4)
  assert np.all(zero_NZ == 0)


def test_ea_is_mirror_symmetric_and_dpa_matches_a_numpy_histogram():
  # Keys come in pairs (k, -k): EA weights depend on (q.k)^2 only, so its histogram over cos is
  # exactly mirror-symmetric. DPA's is checked against np.histogram of NumPy softmax weights;
  # in each pair the parallel key gets exp(2 |s|) times the weight of the antiparallel one.
  rng = np.random.default_rng(0)
  k = rng.normal(size=(1, 16, 1, 8)).astype(np.float32)
  k_BSKH = np.concatenate([k, -k], axis=1)
  q_BTNH = rng.normal(size=(1, 5, 2, 8)).astype(np.float32) * 2.0
  w_ea = _np_weights(q_BTNH, k_BSKH, kind="ea", causal=False)
  _, hist_NZ = geometry.weighted_cos_histogram(q_BTNH, k_BSKH, w_ea, num_bins=10)
  np.testing.assert_allclose(hist_NZ, hist_NZ[:, ::-1], atol=1e-5)
  np.testing.assert_allclose(hist_NZ, _np_histograms(q_BTNH, k_BSKH, w_ea, 10), atol=1e-5)
  w_dpa = _np_weights(q_BTNH, k_BSKH, kind="dpa", causal=False)
  edges, hist_NZ = geometry.weighted_cos_histogram(q_BTNH, k_BSKH, w_dpa, num_bins=10)
  np.testing.assert_allclose(hist_NZ, _np_histograms(q_BTNH, k_BSKH, w_dpa, 10), atol=1e-5)
  # Weight on cos < 0 = the antiparallel member of every pair, from the pair ratio alone.
  s_NTS = np.einsum("tnh,sh->nts", q_BTNH[0], k[0, :, 0]) / np.sqrt(8)  # the 16 "+k" keys
  anti_NTS = np.where(s_NTS > 0, np.exp(-s_NTS), np.exp(s_NTS))  # the smaller member
  par_NTS = np.where(s_NTS > 0, np.exp(s_NTS), np.exp(-s_NTS))
  per_row_NT = anti_NTS.sum(-1) / (anti_NTS + par_NTS).sum(-1)
  stats = geometry.geometry_stats(edges, hist_NZ.mean(axis=0))
  assert stats["mass_negative"] == pytest.approx(per_row_NT.mean(), abs=1e-5)


def test_bad_input_is_named():
  q = jnp.ones((1, 2, 3, 4))
  with pytest.raises(ValueError, match="N a multiple of K"):
    geometry.cosine_BNTS(q, jnp.ones((1, 2, 2, 4)))
  with pytest.raises(ValueError, match="w_BNTS"):
    geometry.weighted_cos_histogram(q, jnp.ones((1, 2, 3, 4)), jnp.ones((1, 3, 2, 3)))
  with pytest.raises(ValueError, match="num_bins"):
    geometry.bin_edges(0)


@pytest.mark.parametrize(
  "attention,kernel,qk_norm",
  [("ea", "square", True), ("ea", "rational", False), ("dpa", "rational", False)],
)
def test_captured_qk_are_what_the_model_scores(attention, kernel, qk_norm):
  # NumPy weights computed from the captured q, k must give the attention module's own output
  # (which the model computes through its attention implementation, not attention_weights), and
  # must equal the maps the analyses read (model_lib.attention_maps).
  cfg = model_lib.ModelConfig(
    vocab_size=7,
    max_len=12,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    embed_dim=16,
    mlp_dim=32,
    attention=attention,
    ea_kernel=kernel,
    qk_norm=qk_norm,
  )
  model = model_lib.Transformer(cfg)
  tokens_BL = jax.random.randint(jax.random.key(1), (2, 12), 0, 7)
  # Random parameters of the model's shapes (eval_shape: no compiled init, which costs seconds).
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens_BL)["params"])
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: jnp.asarray(0.5 * rng.normal(size=s.shape), s.dtype), shapes)

  def wanted(module, method_name):
    return isinstance(module, model_lib.Attention) and method_name in ("_project", "__call__")

  @jax.jit  # one compiled program instead of op-by-op dispatch; the values are the same
  def forward(params, tokens_BL):
    _, state = model.apply(
      {"params": params}, tokens_BL, capture_intermediates=wanted, mutable=["intermediates"]
    )
    return (
      geometry.capture_qk(model, params, tokens_BL),
      model_lib.attention_maps(model, params, tokens_BL),
      state,
    )

  captured, maps, state = forward(params, tokens_BL)
  assert len(captured) == 2
  for y, ((q_BLNH, k_BLKH), w_BNLL) in enumerate(zip(captured, maps)):
    assert q_BLNH.shape == (2, 12, 4, 4) and k_BLKH.shape == (2, 12, 2, 4)
    sown = state["intermediates"][f"block_{y}"]["attention"]
    _, _, v_BLKH = sown["_project"][0]
    w_np = _np_weights(q_BLNH, k_BLKH, kind=attention, kernel=kernel)
    o_BLNH = np.einsum(
      "bnts,bsnh->btnh", w_np, np.repeat(np.asarray(v_BLKH, np.float64), 2, axis=2)
    )
    out_BLD = np.einsum(
      "btnh,nhd->btd", o_BLNH, np.asarray(params[f"block_{y}"]["attention"]["out"], np.float64)
    )
    np.testing.assert_allclose(out_BLD, sown["__call__"][0], atol=2e-5)
    np.testing.assert_allclose(w_BNLL, w_np, atol=2e-6)
  # The histograms of attention_geometry: np.histogram of the NumPy weights over NumPy cos.
  geo = geometry.attention_geometry(model, params, tokens_BL, num_bins=6)
  expected_YNZ = np.stack(
    [_np_histograms(q, k, _np_weights(q, k, kind=attention, kernel=kernel), 6) for q, k in captured]
  )
  np.testing.assert_allclose(geo["hist_YNZ"], expected_YNZ, atol=1e-5)
  np.testing.assert_allclose(geo["hist_Z"], expected_YNZ.reshape(-1, 6).mean(axis=0), atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Delay locking (delays.py)
# ------------------------------------------------------------------------------------------------


def _recurrence(num_rules=2, seq_len=20, num_symbols=5):
  return tasks.make_task(
    ml_collections.ConfigDict(
      dict(
        name="recurrence",
        num_symbols=num_symbols,
        num_rules=num_rules,
        max_delay=6,
        num_delays=2,
        rule_seed=0,
        seq_len=seq_len,
      )
    )
  )


def test_delay_mass_of_a_hand_built_profile():
  # Rules (1, 4) and (3, 6) need offsets {0, 3} and {2, 5}. Head 0 follows the rule in use
  # (0.5 / 0.5 on its offsets), head 1 always looks at offsets 0 and 3 (0.4 / 0.4, 0.2 at
  # offset 7, needed by no rule).
  prof_RNO = np.zeros((2, 2, 8))
  prof_RNO[0, 0, [0, 3]] = 0.5
  prof_RNO[1, 0, [2, 5]] = 0.5
  prof_RNO[:, 1, [0, 3, 7]] = [0.4, 0.4, 0.2]
  own_RN, other_RN = delays.delay_mass(prof_RNO, [(1, 4), (3, 6)])
  np.testing.assert_allclose(own_RN, [[1.0, 0.8], [1.0, 0.0]])
  np.testing.assert_allclose(other_RN, [[0.0, 0.0], [0.0, 0.8]])
  # Rules sharing a delay: (1, 4) and (1, 5) -> offsets {0, 3} and {0, 4}; offset 0 is never
  # "other".
  own_RN, other_RN = delays.delay_mass(prof_RNO, [(1, 4), (1, 5)])
  np.testing.assert_allclose(own_RN[:, 1], [0.8, 0.4])
  np.testing.assert_allclose(other_RN[:, 1], [0.0, 0.4])
  with pytest.raises(ValueError, match="profile_RNO"):
    delays.delay_mass(prof_RNO, [(1, 4)])
  with pytest.raises(ValueError, match="offset 8"):  # 8 offsets: 0..7
    delays.delay_mass(prof_RNO, [(1, 9), (3, 6)])


def test_needed_offsets_match_the_tasks_own_targets():
  # Re-derive the index arithmetic from the sampler: for every scored target, the sum of the
  # inputs at offsets needed_offsets(rule) from the query reproduces it.
  task = _recurrence()
  batch = task.sample(jax.random.key(3), 64)
  inputs, targets = np.asarray(batch.inputs), np.asarray(batch.targets)
  x_BT1 = delays.symbols_BT1(inputs, targets)
  rule_B = delays.identify_rules_B(x_BT1, task.coefficients_RD(), task.num_symbols)
  scored = np.asarray(batch.weights) > 0
  checked = 0
  for b in np.nonzero(rule_B >= 0)[0]:
    offs = delays.needed_offsets(task.rule_delays[rule_B[b]])
    for t in np.nonzero(scored[b])[0]:
      assert sum(inputs[b, t - o] for o in offs) % task.num_symbols == targets[b, t]
      checked += 1
  assert checked > 500


def test_rule_identification_against_the_tasks_sampler():
  task = _recurrence(num_rules=3)  # rules (1, 4), (3, 6), (1, 5)
  transfer_RTD = task.transfer_RTD()  # the task's own generator of whole sequences
  rng = np.random.default_rng(0)
  prefix_BD = rng.integers(1, task.num_symbols, size=(40, task.max_delay))
  coef_RD = task.coefficients_RD()
  for r in range(task.num_rules):
    x_BT1 = np.einsum("td,bd->bt", transfer_RTD[r], prefix_BD) % task.num_symbols
    rule_B = delays.identify_rules_B(x_BT1, coef_RD, task.num_symbols)
    # Whatever the identification says must be the sequence's own rule, or "ambiguous" when
    # another rule reproduces it too (checked by plain loops below).
    assert np.all((rule_B == r) | (rule_B == delays.AMBIGUOUS)) and np.mean(rule_B == r) > 0.9
  # The all-zero sequence fits every rule: ambiguous (skipped).
  zero = np.zeros((1, task.seq_len + 1), np.int64)
  assert delays.identify_rules_B(zero, coef_RD, task.num_symbols)[0] == delays.AMBIGUOUS
  # A sequence that fits no rule.
  noise = zero.copy()
  noise[0, -1] = 1
  assert delays.identify_rules_B(noise, coef_RD, task.num_symbols)[0] == delays.NO_RULE
  # Samples of the task itself: every identified rule reproduces the sequence by plain loops.
  batch = task.sample(jax.random.key(5), 128)
  x_BT1 = delays.symbols_BT1(batch.inputs, batch.targets)
  rule_B = delays.identify_rules_B(x_BT1, coef_RD, task.num_symbols)
  assert np.all(rule_B != delays.NO_RULE)
  for b in range(len(rule_B)):
    fits = [
      r
      for r, dl in enumerate(task.rule_delays)
      if all(
        x_BT1[b, s] == sum(x_BT1[b, s - d] for d in dl) % task.num_symbols
        for s in range(task.max_delay, x_BT1.shape[1])
      )
    ]
    assert rule_B[b] == (fits[0] if len(fits) == 1 else delays.AMBIGUOUS)


def test_offset_profile_against_plain_loops():
  rng = np.random.default_rng(1)
  B, N, T, O, R = 5, 3, 7, 4, 2
  logits = rng.normal(size=(B, N, T, T))
  causal = np.tril(np.ones((T, T), bool))
  w = np.where(causal, np.exp(logits), 0.0)
  w_BNTS = w / w.sum(axis=-1, keepdims=True)
  mask_BT = rng.random((B, T)) < 0.6
  rule_B = np.array([0, 1, -1, 1, 0])  # sequence 2 is skipped
  prof_RNO, queries_R = delays.offset_profile_RNO(w_BNTS, mask_BT, rule_B, R, O)
  expected = np.zeros((R, N, O))
  count = np.zeros(R)
  for b in range(B):
    if rule_B[b] < 0:
      continue
    for t in range(T):
      if not mask_BT[b, t]:
        continue
      count[rule_B[b]] += 1
      for n in range(N):
        for o in range(O):
          if t - o >= 0:
            expected[rule_B[b], n, o] += w_BNTS[b, n, t, t - o]
  expected /= count[:, None, None]
  np.testing.assert_allclose(prof_RNO, expected, atol=1e-12)
  np.testing.assert_array_equal(queries_R, count)
  # With every offset the profile of each (rule, head) sums to 1 (rows of w sum to 1).
  full_RNO, _ = delays.offset_profile_RNO(w_BNTS, mask_BT, rule_B, R, T)
  np.testing.assert_allclose(full_RNO.sum(axis=-1), 1.0, atol=1e-12)
  # Focus, by plain loops: peak = mean row maximum, entropy = mean -sum w log w / log(t + 1).
  peak_RN, ent_RN = delays.focus_RN(w_BNTS, mask_BT, rule_B, R)
  for r in range(R):
    sel = [(b, t) for b in range(B) for t in range(T) if mask_BT[b, t] and rule_B[b] == r]
    for n in range(N):
      assert peak_RN[r, n] == pytest.approx(np.mean([w_BNTS[b, n, t].max() for b, t in sel]))
      ents = [
        -sum(p * math.log(p) for p in w_BNTS[b, n, t] if p > 0) / math.log(t + 1)
        for b, t in sel
        if t > 0
      ]
      assert ent_RN[r, n] == pytest.approx(np.mean(ents))
  # Uniform causal attention has normalised entropy 1 and peak 1 / (t + 1).
  uni_BNTS = delays.uniform_causal_BNTS(B, N, T)
  peak_RN, ent_RN = delays.focus_RN(uni_BNTS, mask_BT, rule_B, R)
  np.testing.assert_allclose(ent_RN, 1.0, atol=1e-12)
  t_BT = np.broadcast_to(np.arange(T), (B, T))
  for r in range(R):
    sel = mask_BT & (rule_B[:, None] == r)
    np.testing.assert_allclose(peak_RN[r], np.mean(1.0 / (t_BT[sel] + 1)), atol=1e-12)
  with pytest.raises(ValueError, match="rule_B"):
    delays.offset_profile_RNO(w_BNTS, mask_BT, np.array([0, 1, 2, 1, 0]), R, O)
  with pytest.raises(ValueError, match="query_mask_BT"):
    delays.offset_profile_RNO(w_BNTS, mask_BT[:, :3], rule_B, R, O)


def test_delay_figure_shows_the_profile_and_boxes_the_needed_offsets(tmp_path):
  from matplotlib.image import imread
  from matplotlib.patches import Rectangle

  prof_YRNO = np.random.default_rng(0).random((2, 2, 3, 10))
  rules = [(1, 4), (3, 9)]  # offsets {0, 3} and {2, 8}; 8 is not shown
  fig = plots.delay_profiles_figure(prof_YRNO, rules, num_offsets=8, title="t")
  for r, ax in enumerate(fig.axes[:2]):
    image = np.asarray(ax.images[0].get_array())
    expected = np.zeros((2 * 3, 8))
    for y in range(2):
      for n in range(3):
        expected[y * 3 + n] = prof_YRNO[y, r, n, :8]
    np.testing.assert_array_equal(image, expected)
    boxed = sorted(p.get_x() + 0.5 for p in ax.patches if isinstance(p, Rectangle))
    assert boxed == [[0, 3], [2]][r]
  path = plots.plot_delay_profiles(prof_YRNO, rules, str(tmp_path / "d.png"), num_offsets=8)
  pixels = imread(path)
  assert path.endswith("d.png") and pixels.ndim == 3 and pixels.std() > 0
  with pytest.raises(ValueError, match="profile_YRNO"):
    plots.delay_profiles_figure(prof_YRNO, [(1, 4)])


# ------------------------------------------------------------------------------------------------
# Reductions, formatting, options (lengthgen.py, report.py, formatting.py, __main__.py)
# ------------------------------------------------------------------------------------------------


def test_report_reductions():
  rows = [
    {"task": "a", "variant": "dpa", "token_accuracy": t, "sequence_accuracy": s}
    for t, s in ((1.0, 0.5), (0.8, 0.7), (0.9, 0.0))
  ]
  rows.append({"task": "b", "variant": "dpa", "token_accuracy": 0.1, "sequence_accuracy": 0.2})
  out = lengthgen.summarize(rows, ("task", "variant"), ("token_accuracy", "sequence_accuracy"))
  assert [(o["task"], o["n"]) for o in out] == [("a", 3), ("b", 1)]
  assert out[0]["token_accuracy_mean"] == pytest.approx(0.9)
  assert out[0]["sequence_accuracy_min"] == 0.0 and out[1]["token_accuracy_min"] == 0.1
  with pytest.raises(ValueError, match="lacks"):
    lengthgen.summarize([{"task": "a"}], ("task",), ("token_accuracy",))
  learned = {"task": {"seq_len": 48}, "model": {"pos_encoding": "learned"}}
  rope = {"task": {"seq_len": 48}, "model": {"pos_encoding": "rope"}}
  assert lengthgen.beyond_position_table(learned, 48) == ""
  assert "training length 48" in lengthgen.beyond_position_table(learned, 96)
  assert lengthgen.beyond_position_table(rope, 96) == ""
  seen, beyond = lengthgen.split_position_accuracy([None, 1.0, 0.5, None, 0.25, 0.75], 3)
  assert (seen, beyond) == (0.75, 0.5)
  assert np.isnan(lengthgen.split_position_accuracy([1.0, 0.0], 2)[1])
  with pytest.raises(ValueError, match="boundary"):
    lengthgen.split_position_accuracy([1.0], 2)
  # Layer summary: head 0 follows the rule (own 1, other 0), head 1 is fixed on rule 0's offsets.
  own_YRN = np.array([[[1.0, 0.8], [1.0, 0.0]]])
  other_YRN = np.array([[[0.0, 0.0], [0.0, 0.8]]])
  res = {
    "own_YRN": own_YRN,
    "other_YRN": other_YRN,
    "peak_YRN": np.full((1, 2, 2), 0.5),
    "entropy_YRN": np.full((1, 2, 2), 0.25),
    "chance_own_R": np.array([0.1, 0.1]),
    "chance_other_R": np.array([0.1, 0.1]),
  }
  (row,) = report.layer_summary(res)
  assert row["best_head"] == 0 and row["best_own"] == 1.0 and row["best_own_other"] == 0.0
  assert row["best_switch"] == 1.0 and row["best_union"] == 1.0
  assert row["chance_union"] == pytest.approx(0.2)


def test_formatting():
  assert formatting.fmt(0.12345) == "0.123" and formatting.fmt(2, 1) == "2.0"
  assert formatting.fmt(None) == formatting.fmt(float("nan")) == formatting.MISSING
  assert formatting.spread([0.5, None, 0.25, float("nan"), 1.0]) == "0.58 [0.25, 1.00]"
  assert formatting.spread([None]) == formatting.MISSING


def test_options_convert_and_name_bad_fields():
  opts = report.Options(
    sweep_dir="s",
    tasks=[" N=5 R=1", "", "N=5 R=2 "],
    widths=["16", "64"],
    length_factors=["1", "3"],
  )
  assert opts.tasks == ("N=5 R=1", "N=5 R=2") and opts.widths == (16, 64)
  assert opts.length_factors == (1, 3)
  for kwargs, field in (
    (dict(length_factors=["2", "1"]), "length_factors"),
    (dict(length_factors=["1", "x"]), "length_factors"),
    (dict(widths=["0"]), "widths"),
    (dict(tasks=[" "]), "tasks"),
    (dict(delay_examples=0), "delay_examples"),
    (dict(sweep_dir=""), "sweep_dir"),
  ):
    with pytest.raises(ValueError, match=field):
      report.Options(**{"sweep_dir": "s", **kwargs})


def test_cli_rejects_bad_flags_in_one_line(tmp_path):
  def cli(*args):
    return subprocess.run(
      [sys.executable, "-m", "ea_jax.study.analysis", *args],
      cwd=train_helpers.REPO,
      capture_output=True,
      text=True,
      timeout=120,
      env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=train_helpers.REPO),
    )

  bad = cli(f"--sweep_dir={tmp_path}", "--length_factors=2,1")
  assert bad.returncode == 1 and "Traceback" not in bad.stderr
  assert "flag --length_factors=['2', '1']: positive integers starting with 1" in bad.stderr
  empty = cli(f"--sweep_dir={tmp_path}")
  assert empty.returncode == 1 and "Traceback" not in empty.stderr
  assert f"error: no {tmp_path}/runs/*/result.json: is --sweep_dir a sweep workdir?" in empty.stderr


# ------------------------------------------------------------------------------------------------
# A tiny trained run, end to end
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory):
  """A sweep folder with one tiny trained recurrence run in the layout find_runs reads."""
  from ea_jax import train_lib

  sweep = tmp_path_factory.mktemp("sweep")
  workdir = sweep / "runs" / "r0"
  config = train_helpers.load_config(
    "tiny",
    {"train.num_steps": 4, "train.eval_every": 4, "train.checkpoint_every": 4, "task.seq_len": 16},
  )
  assert config.task.name == "recurrence"
  summary = train_lib.train_and_evaluate(config, str(workdir))
  result = {
    "run_id": "r0",
    "stage": "main",
    "status": "ok",
    "label": config.task.label,
    "width": config.model.embed_dim,
    "variant": "ea-rational",
    "seed": 0,
    "task": {"seq_len": config.task.seq_len},
    "summary": summary,  # as the study's runner stores it
  }
  with open(workdir / "result.json", "w") as f:
    json.dump(result, f)
  return str(sweep), str(workdir), config, summary


@pytest.mark.slow
def test_analysis_of_a_trained_run(tiny_sweep, tmp_path):
  sweep, workdir, config, summary = tiny_sweep
  L, width, layers = config.task.seq_len, config.model.embed_dim, config.model.num_layers
  opts = report.Options(
    sweep_dir=sweep,
    out=str(tmp_path / "out"),
    scratch=str(tmp_path / "s"),
    tasks=[config.task.label],
    widths=[width],
    length_factors=[1, 2],
    delay_examples=16,
    num_offsets=6,
  )
  readme = report.run(opts, command="python -m ea_jax.study.analysis ...")
  with open(readme) as f:
    text = f.read()
  # The validation split at the training length reproduces the training loop's final eval
  # (written to result.json by the fixture) exactly.
  assert (
    "reproduces the runs' validation numbers at their selected checkpoint (result.json): "
    "largest difference "
    "over 1 runs 0 (token"
  ) in text, [line for line in text.splitlines() if line.startswith("Check")]
  assert f"| {config.task.label} | ea-rational | {width} | 0 |" in text  # delay table, layer 0
  lengths = files.read_csv(os.path.join(opts.out, "lengthgen.csv"))
  assert [(int(r["seq_len"]), r["split"]) for r in lengths] == [(L, "test"), (2 * L, "test")]
  assert os.path.isfile(
    os.path.join(opts.out, f"delays_{report._slug(config.task.label)}_ea-rational_w{width}_s0.png")
  )
  models = files.read_csv(os.path.join(opts.out, "delay_models.csv"))
  assert [(int(r["length_factor"]), int(r["seq_len"])) for r in models] == (
    [(1, L)] * layers + [(2, 2 * L)] * layers
  )
  heads = files.read_csv(os.path.join(opts.out, "delay_heads.csv"))
  num_rules = len({r["rule"] for r in heads})
  assert num_rules == tasks.make_task(config.task).num_rules
  assert len(heads) == 2 * layers * num_rules * config.model.num_heads


def test_length_findings_leave_out_a_length_some_variant_cannot_be_evaluated_at():
  def row(variant, seq_len, acc):
    return {
      "task": "t",
      "variant": variant,
      "seq_len": seq_len,
      "token_accuracy_mean": acc,
      "token_accuracy_beyond_mean": acc,
      "sequence_accuracy_mean": acc,
    }

  nan = float("nan")  # ea's learned position table ends before 192
  length_summary = [row("dpa", 48, 1.0), row("dpa", 96, 0.5), row("dpa", 192, 0.25)]
  length_summary += [row("ea", 48, 1.0), row("ea", 96, 0.75), row("ea", 192, nan)]
  (text,) = report._findings([], [], length_summary, ["t"], [1])  # pylint: disable=protected-access
  assert "L=48 → 96" in text and "nan" not in text
  assert "dpa token 1.000 → 0.500" in text and "ea token 1.000 → 0.750" in text
  assert "no EA variant generalises worse than dpa and ea better" in text
  length_summary[-1] = row("ea", 192, 0.125)  # evaluable again: the longest length is used
  (text,) = report._findings([], [], length_summary, ["t"], [1])  # pylint: disable=protected-access
  assert "L=48 → 192" in text
