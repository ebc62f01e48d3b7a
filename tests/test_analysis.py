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


# ------------------------------------------------------------------------------------------------
# Delay locking (ea_jax.delays)
# ------------------------------------------------------------------------------------------------

from ea_jax import delays  # noqa: E402
from ea_jax import tasks  # noqa: E402


def _recurrence(num_rules=2, seq_len=20, num_symbols=5):
  import ml_collections
  return tasks.make_task(ml_collections.ConfigDict(dict(
      name="recurrence", num_symbols=num_symbols, num_rules=num_rules, max_delay=6,
      num_delays=2, rule_seed=0, seq_len=seq_len)))


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
  with pytest.raises(ValueError, match="offset 8"):     # 8 offsets: 0..7
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
  task = _recurrence(num_rules=3)              # rules (1, 4), (3, 6), (1, 5)
  transfer_RTD = task.transfer_RTD()           # the task's own generator of whole sequences
  rng = np.random.default_rng(0)
  prefix_BD = rng.integers(1, task.num_symbols, size=(40, task.max_delay))
  coef_RD = task.coefficients_RD()
  for r in range(task.num_rules):
    x_BT1 = np.einsum("td,bd->bt", transfer_RTD[r], prefix_BD) % task.num_symbols
    rule_B = delays.identify_rules_B(x_BT1, coef_RD, task.num_symbols)
    # A nonzero random prefix of length 6 continued for 15 steps fits only its own rule here;
    # whatever the identification says must also be what an explicit check says.
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
    fits = [r for r, dl in enumerate(task.rule_delays)
            if all(x_BT1[b, s] == sum(x_BT1[b, s - d] for d in dl) % task.num_symbols
                   for s in range(task.max_delay, x_BT1.shape[1]))]
    assert rule_B[b] == (fits[0] if len(fits) == 1 else delays.AMBIGUOUS)


def test_offset_profile_against_plain_loops():
  rng = np.random.default_rng(1)
  B, N, T, O, R = 5, 3, 7, 4, 2
  logits = rng.normal(size=(B, N, T, T))
  causal = np.tril(np.ones((T, T), bool))
  w = np.where(causal, np.exp(logits), 0.0)
  w_BNTS = w / w.sum(axis=-1, keepdims=True)
  mask_BT = rng.random((B, T)) < 0.6
  rule_B = np.array([0, 1, -1, 1, 0])           # sequence 2 is skipped
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
  # Focus: uniform causal attention has normalised entropy 1 and peak 1 / (t + 1).
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


def test_delay_figure(tmp_path):
  from ea_jax.study import plots
  prof_YRNO = np.random.default_rng(0).random((2, 2, 4, 10))
  path = plots.plot_delay_profiles(prof_YRNO, [(1, 4), (3, 6)], str(tmp_path / "d.png"),
                                   num_offsets=8, title="t")
  assert (tmp_path / "d.png").stat().st_size > 1000 and path.endswith("d.png")
  with pytest.raises(ValueError, match="profile_YRNO"):
    plots.plot_delay_profiles(prof_YRNO, [(1, 4)], str(tmp_path / "e.png"))


def test_report_reductions():
  from ea_jax import analysis_report
  from ea_jax import lengthgen
  rows = [{"task": "a", "variant": "dpa", "token_accuracy": t, "sequence_accuracy": s}
          for t, s in ((1.0, 0.5), (0.8, 0.7), (0.9, 0.0))]
  rows.append({"task": "b", "variant": "dpa", "token_accuracy": 0.1, "sequence_accuracy": 0.2})
  out = lengthgen.summarize(rows, ("task", "variant"), ("token_accuracy", "sequence_accuracy"))
  assert [(o["task"], o["n"]) for o in out] == [("a", 3), ("b", 1)]
  assert out[0]["token_accuracy_mean"] == pytest.approx(0.9)
  assert out[0]["sequence_accuracy_min"] == 0.0 and out[1]["token_accuracy_min"] == 0.1
  with pytest.raises(ValueError, match="lacks"):
    lengthgen.summarize([{"task": "a"}], ("task",), ("token_accuracy",))
  seen, beyond = lengthgen.split_position_accuracy([None, 1.0, 0.5, None, 0.25, 0.75], 3)
  assert (seen, beyond) == (0.75, 0.5)
  assert np.isnan(lengthgen.split_position_accuracy([1.0, 0.0], 2)[1])
  with pytest.raises(ValueError, match="boundary"):
    lengthgen.split_position_accuracy([1.0], 2)
  # Layer summary: head 0 follows the rule (own 1, other 0), head 1 is fixed on rule 0's offsets.
  own_YRN = np.array([[[1.0, 0.8], [1.0, 0.0]]])
  other_YRN = np.array([[[0.0, 0.0], [0.0, 0.8]]])
  res = {"own_YRN": own_YRN, "other_YRN": other_YRN, "peak_YRN": np.full((1, 2, 2), 0.5),
         "entropy_YRN": np.full((1, 2, 2), 0.25), "chance_own_R": np.array([0.1, 0.1]),
         "chance_other_R": np.array([0.1, 0.1])}
  (row,) = analysis_report.layer_summary(res)
  assert row["best_head"] == 0 and row["best_own"] == 1.0 and row["best_own_other"] == 0.0
  assert row["best_switch"] == 1.0 and row["best_union"] == 1.0
  assert row["chance_union"] == pytest.approx(0.2)
  with pytest.raises(SystemExit):
    analysis_report.parse_args(["--sweep_dir=x", "--length_factors=2,1"])
