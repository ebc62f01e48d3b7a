"""Delay locking: does a head of a trained recurrence model attend to the delays of the rule in use?

Recurrence task (ea_jax.tasks.recurrence): symbols x_0..x_L, `inputs[t] = x_t`,
`targets[t] = x_{t+1}`, and under rule (d_1, ..., d_k) `x_s = sum_i x_{s - d_i} mod N`. The
prediction at input position t (target x_{t+1}) therefore needs the inputs at positions
t + 1 - d_i, i.e. keys at *offset* o = t - j = d_i - 1 from the query (`needed_offsets`).

Pipeline (pure functions, numpy in and out):
  identify_rules_B    the hidden rule of each sequence, re-derived from the sequence itself
                      (-1 if several rules reproduce it: such sequences are skipped and counted)
  offset_weights_BNTO attention weight at offset o = t - j, per query position
  offset_profile_RNO  mean weight per (rule, head, offset) over the scored query positions of the
                      sequences of that rule
  delay_mass          per (rule, head): weight on the current rule's needed offsets ("own") and on
                      the other rules' needed offsets that the current rule does not need ("other")
`delay_analysis(model, params, config)` applies them to every layer of a trained model, on
sequences of its task's test split; `run_delays(workdir)` loads a run and does the same.

Letters: B batch, L sequence length, T queries (= L), S keys (= L), T1 = L + 1 symbols, N heads,
O offsets, R rules, D max_delay, Y layers.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import numpy as np

from ea_jax import model as model_lib
from ea_jax import tasks
from ea_jax.study.analysis import loading

AMBIGUOUS = -1  # identify_rules_B: more than one rule reproduces the sequence
NO_RULE = -2  # identify_rules_B: no rule reproduces it (not a sequence of this task)


def symbols_BT1(inputs_BL, targets_BL) -> np.ndarray:
  """The drawn symbols x_0..x_L, int64 [B, L + 1], from the next-token layout."""
  inputs_BL, targets_BL = np.asarray(inputs_BL), np.asarray(targets_BL)
  if inputs_BL.ndim != 2 or inputs_BL.shape != targets_BL.shape:
    raise ValueError(
      f"inputs_BL {inputs_BL.shape} and targets_BL {targets_BL.shape}: need two "
      "[B, L] arrays of the same shape"
    )
  if not np.array_equal(inputs_BL[:, 1:], targets_BL[:, :-1]):
    raise ValueError(
      "inputs_BL/targets_BL are not in the next-token layout "
      "(inputs[:, 1:] must equal targets[:, :-1])"
    )
  return np.concatenate([inputs_BL[:, :1], targets_BL], axis=1).astype(np.int64)


def consistent_BR(x_BT1, coef_RD, num_symbols: int) -> np.ndarray:
  """bool [B, R]: rule r reproduces every x_s, D <= s <= L, as sum_d coef[r, d-1] x_{s-d} mod N."""
  x_BT1, coef_RD = np.asarray(x_BT1, np.int64), np.asarray(coef_RD, np.int64)
  if x_BT1.ndim != 2 or coef_RD.ndim != 2:
    raise ValueError(f"x_BT1 {x_BT1.shape} must be [B, L + 1] and coef_RD {coef_RD.shape} [R, D]")
  big_t, big_d = x_BT1.shape[1], coef_RD.shape[1]
  if big_d >= big_t:
    raise ValueError(f"coef_RD has D={big_d} delays but sequences have only {big_t} symbols")
  # lagged_BDS[b, d - 1, s - D] = x_{s - d} for s in [D, T1)
  lagged_BDS = np.stack([x_BT1[:, big_d - d : big_t - d] for d in range(1, big_d + 1)], axis=1)
  pred_BRS = np.einsum("rd,bds->brs", coef_RD, lagged_BDS) % num_symbols
  return np.all(pred_BRS == x_BT1[:, None, big_d:], axis=2)


def identify_rules_B(x_BT1, coef_RD, num_symbols: int) -> np.ndarray:
  """int64 [B]: index of the one rule reproducing each sequence; AMBIGUOUS (-1) if several do,
  NO_RULE (-2) if none does."""
  ok_BR = consistent_BR(x_BT1, coef_RD, num_symbols)
  n_B = ok_BR.sum(axis=1)
  return np.where(n_B == 1, np.argmax(ok_BR, axis=1), np.where(n_B == 0, NO_RULE, AMBIGUOUS))


def needed_offsets(delays: Sequence[int]) -> tuple[int, ...]:
  """Key offsets o = t - j the prediction at input position t needs under a rule: d - 1."""
  return tuple(sorted(int(d) - 1 for d in delays))


def offset_weights_BNTO(w_BNTS, num_offsets: int) -> np.ndarray:
  """out[b, n, t, o] = w[b, n, t, t - o] (0 where t - o < 0), float64 [B, N, T, O].

  Needs T == S (self-attention over one sequence).
  """
  w_BNTS = np.asarray(w_BNTS, np.float64)
  if w_BNTS.ndim != 4 or w_BNTS.shape[2] != w_BNTS.shape[3]:
    raise ValueError(f"w_BNTS {w_BNTS.shape}: need [B, N, T, S] with T == S")
  if not (isinstance(num_offsets, int) and num_offsets >= 1):
    raise ValueError(f"num_offsets={num_offsets!r}: must be a positive integer")
  big_t = w_BNTS.shape[2]
  t_TO = np.arange(big_t)[:, None]
  j_TO = t_TO - np.arange(num_offsets)[None, :]
  valid_TO = j_TO >= 0
  gathered = np.take_along_axis(
    w_BNTS,
    np.broadcast_to(np.maximum(j_TO, 0)[None, None], w_BNTS.shape[:3] + (num_offsets,)),
    axis=3,
  )
  return np.where(valid_TO[None, None], gathered, 0.0)


def offset_profile_RNO(
  w_BNTS, query_mask_BT, rule_B, num_rules: int, num_offsets: int
) -> tuple[np.ndarray, np.ndarray]:
  """Mean attention weight per (rule, head, offset) over the selected queries of each rule.

  Args:
    w_BNTS: attention weights of one layer.
    query_mask_BT: which query positions count (e.g. the scored ones).
    rule_B: each sequence's rule index; sequences with a negative index are left out.
    num_rules, num_offsets: R and O of the output.
  Returns:
    (profile_RNO float64 [R, N, O], queries_R int64 [R]: how many queries were averaged). A
    rule with no query gets a zero profile. With O = T, every row of a profile whose weights
    sum to 1 per query sums to 1.
  """
  w_BNTO = offset_weights_BNTO(w_BNTS, num_offsets)
  big_b, _, big_t, _ = w_BNTO.shape
  query_mask_BT = np.asarray(query_mask_BT, bool)
  rule_B = np.asarray(rule_B, np.int64)
  if query_mask_BT.shape != (big_b, big_t) or rule_B.shape != (big_b,):
    raise ValueError(
      f"query_mask_BT {query_mask_BT.shape} must be [B, T] = {(big_b, big_t)} and "
      f"rule_B {rule_B.shape} must be [B] = ({big_b},)"
    )
  if np.any(rule_B >= num_rules):
    raise ValueError(
      f"rule_B holds {int(rule_B.max())}; allowed: < num_rules={num_rules} (negative = skip)"
    )
  onehot_BR = (rule_B[:, None] == np.arange(num_rules)[None, :]).astype(np.float64)
  sel_BRT = onehot_BR[:, :, None] * query_mask_BT[:, None, :].astype(np.float64)
  sums_RNO = np.einsum("brt,bnto->rno", sel_BRT, w_BNTO)
  queries_R = sel_BRT.sum(axis=(0, 2)).astype(np.int64)
  denom_R11 = np.maximum(queries_R, 1)[:, None, None].astype(np.float64)
  return sums_RNO / denom_R11, queries_R


def focus_RN(w_BNTS, query_mask_BT, rule_B, num_rules: int) -> tuple[np.ndarray, np.ndarray]:
  """How concentrated each head's attention is, per rule: (peak_RN, entropy_RN).

  peak = mean over the selected queries of the largest weight of the query's row; entropy = mean
  of the row's entropy divided by log(number of keys it may see, t + 1) (1 = uniform over the
  causal keys, 0 = one key; queries at t = 0 are left out of the entropy). Selection as in
  `offset_profile_RNO`.
  """
  w_BNTS = np.asarray(w_BNTS, np.float64)
  if w_BNTS.ndim != 4 or w_BNTS.shape[2] != w_BNTS.shape[3]:
    raise ValueError(f"w_BNTS {w_BNTS.shape}: need [B, N, T, S] with T == S")
  big_b, _, big_t, _ = w_BNTS.shape
  query_mask_BT = np.asarray(query_mask_BT, bool)
  rule_B = np.asarray(rule_B, np.int64)
  if query_mask_BT.shape != (big_b, big_t) or rule_B.shape != (big_b,):
    raise ValueError(
      f"query_mask_BT {query_mask_BT.shape} must be [B, T] = {(big_b, big_t)} and "
      f"rule_B {rule_B.shape} must be [B] = ({big_b},)"
    )
  onehot_BR = (rule_B[:, None] == np.arange(num_rules)[None, :]).astype(np.float64)
  sel_BRT = onehot_BR[:, :, None] * query_mask_BT[:, None, :].astype(np.float64)
  log_keys_T = np.log(np.arange(1, big_t + 1, dtype=np.float64))
  ent_sel_BRT = sel_BRT * (log_keys_T > 0)[None, None, :]
  plogp_BNTS = w_BNTS * np.log(np.where(w_BNTS > 0, w_BNTS, 1.0))
  ent_BNT = -plogp_BNTS.sum(axis=3) / np.where(log_keys_T > 0, log_keys_T, 1.0)[None, None, :]
  peak_RN = np.einsum("brt,bnt->rn", sel_BRT, w_BNTS.max(axis=3))
  entropy_RN = np.einsum("brt,bnt->rn", ent_sel_BRT, ent_BNT)
  peak_RN /= np.maximum(sel_BRT.sum(axis=(0, 2)), 1)[:, None]
  entropy_RN /= np.maximum(ent_sel_BRT.sum(axis=(0, 2)), 1)[:, None]
  return peak_RN, entropy_RN


def offset_sets(rule_delays: Sequence[Sequence[int]]) -> tuple[list[set], list[set]]:
  """(own, other): own[r] = needed offsets of rule r; other[r] = offsets that some other rule
  needs and rule r does not."""
  own = [set(needed_offsets(d)) for d in rule_delays]
  union = set().union(*own) if own else set()
  return own, [union - o for o in own]


def delay_mass(profile_RNO, rule_delays: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
  """(own_RN, other_RN): per rule and head, the profile's weight on the rule's needed offsets and
  on the offsets only the other rules need (see `offset_sets`). A head locked onto the delays of
  the rule in use has own near 1 and other near 0 under *every* rule; a head fixed on one rule's
  offsets has own high under that rule and other high under the others."""
  profile_RNO = np.asarray(profile_RNO, np.float64)
  if profile_RNO.ndim != 3 or profile_RNO.shape[0] != len(rule_delays):
    raise ValueError(
      f"profile_RNO {profile_RNO.shape} must be [R, N, O] with R = "
      f"len(rule_delays) = {len(rule_delays)}"
    )
  big_o = profile_RNO.shape[2]
  own, other = offset_sets(rule_delays)
  if max(set().union(*own), default=0) >= big_o:
    raise ValueError(
      f"profile has {big_o} offsets but a rule needs offset {max(set().union(*own))}"
    )

  def mass(sets):
    mask_RO = np.zeros((len(sets), big_o))
    for r, s in enumerate(sets):
      mask_RO[r, sorted(s)] = 1.0
    return np.einsum("rno,ro->rn", profile_RNO, mask_RO)

  return mass(own), mass(other)


def uniform_causal_BNTS(batch: int, heads: int, length: int) -> np.ndarray:
  """Uniform causal attention (each query spreads weight 1 over keys 0..t): the chance level of
  the delay mass."""
  tril_TS = np.tril(np.ones((length, length)))
  w_TS = tril_TS / tril_TS.sum(axis=1, keepdims=True)
  return np.broadcast_to(w_TS[None, None], (batch, heads, length, length))


# ------------------------------------------------------------------------------------------------
# A trained run
# ------------------------------------------------------------------------------------------------


def run_delays(workdir: str, **kwargs) -> dict:
  """`delay_analysis` of the latest checkpoint of the training workdir `workdir` (keyword
  arguments as there)."""
  return delay_analysis(*loading.load_run(workdir), **kwargs)


def delay_analysis(
  model,
  params,
  config,
  *,
  num_examples: int = 512,
  seq_len: int | None = None,
  seed: int = 7,
  batch_size: int = 128,
) -> dict:
  """Offset profiles and delay mass of every layer and head of a trained recurrence model.

  Sequences are draws from the test split of the run's task (key `seed`), at the training
  length unless `seq_len` is given; queries = the scored positions.

  Args:
    model, params, config: a trained run (loading.load_run).
    num_examples: sequences to draw.
    seq_len: sequence length (default: the training length).
    seed: sampling key.
    batch_size: sequences per forward pass.
  Returns:
    A dict: rules (delay tuples), offsets (needed offsets per rule), profile_YRNO
    [layers, rules, heads, O = seq_len], own_YRN / other_YRN (delay_mass per layer), peak_YRN /
    entropy_YRN (focus_RN per layer), chance_own_R / chance_other_R (the same masses under
    uniform causal attention), queries_R, sequences, skipped (ambiguous sequences), seq_len,
    attention, kernel.
  """
  if config.task.name != "recurrence":
    raise ValueError(f"task {config.task.name!r}: delay locking needs a 'recurrence' task")
  task_cfg = config.task.copy_and_resolve_references()
  if seq_len is not None:
    task_cfg.seq_len = seq_len
  task = tasks.make_task(task_cfg)
  batch = task.sample(jax.random.key(seed), num_examples, split="test")
  inputs_BL = np.asarray(batch.inputs)
  x_BT1 = symbols_BT1(inputs_BL, np.asarray(batch.targets))
  rule_B = identify_rules_B(x_BT1, task.coefficients_RD(), task.num_symbols)
  if np.any(rule_B == NO_RULE):
    raise RuntimeError(
      f"{int(np.sum(rule_B == NO_RULE))} sampled sequences fit no rule of the "
      "task: the rule identification and the task disagree"
    )
  scored_BT = np.asarray(batch.weights) > 0
  big_l, big_r = inputs_BL.shape[1], task.num_rules
  sums_YRNO, peak_YRN, entropy_YRN, queries_R = 0.0, 0.0, 0.0, np.zeros(big_r, np.int64)
  maps_fn = jax.jit(functools.partial(model_lib.attention_maps, model))
  for start in range(0, num_examples, batch_size):
    sl = slice(start, start + batch_size)
    maps = [np.asarray(w) for w in maps_fn(params, inputs_BL[sl])]
    profs, counts = zip(
      *(offset_profile_RNO(w, scored_BT[sl], rule_B[sl], big_r, big_l) for w in maps)
    )
    peaks, entropies = zip(*(focus_RN(w, scored_BT[sl], rule_B[sl], big_r) for w in maps))
    weight_1R1 = counts[0][None, :, None].astype(np.float64)  # same queries in every layer
    sums_YRNO = sums_YRNO + np.stack(profs) * weight_1R1[..., None]
    peak_YRN = peak_YRN + np.stack(peaks) * weight_1R1
    entropy_YRN = entropy_YRN + np.stack(entropies) * weight_1R1
    queries_R = queries_R + counts[0]
  denom_1R1 = np.maximum(queries_R, 1)[None, :, None].astype(np.float64)
  profile_YRNO = sums_YRNO / denom_1R1[..., None]
  own, other = zip(*(delay_mass(p, task.rule_delays) for p in profile_YRNO))
  uniform_RNO, _ = offset_profile_RNO(
    uniform_causal_BNTS(num_examples, 1, big_l), scored_BT, rule_B, big_r, big_l
  )
  chance_own_RN, chance_other_RN = delay_mass(uniform_RNO, task.rule_delays)
  return {
    "rules": [tuple(r) for r in task.rule_delays],
    "offsets": [needed_offsets(r) for r in task.rule_delays],
    "profile_YRNO": profile_YRNO,
    "own_YRN": np.stack(own),
    "other_YRN": np.stack(other),
    "chance_own_R": chance_own_RN[:, 0],
    "chance_other_R": chance_other_RN[:, 0],
    "peak_YRN": peak_YRN / denom_1R1,
    "entropy_YRN": entropy_YRN / denom_1R1,
    "queries_R": queries_R,
    "sequences": int(num_examples),
    "skipped": int(np.sum(rule_B == AMBIGUOUS)),
    "seq_len": big_l,
    "attention": config.model.attention,
    "kernel": config.model.ea_kernel if config.model.attention == "ea" else "softmax",
  }
