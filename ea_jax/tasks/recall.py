"""Associative recall, plain or conjunctive (multi-query).

Tokens: keys `0..K-1`, values `K..K+V-1`, separator `SEP = K+V`; vocab_size = K + V + 1
(K = `num_keys`, V = `num_values`). A sequence lists P = `num_pairs` associations, then `SEP`,
then Q = `num_queries` queries, each a key followed by its value:

  plain        (key_width 1): k v  k v ... SEP  k v  k v ...
  conjunctive  (key_width 2): a b v  a b v ... SEP  a b v ...

Values are distinct across the P associations. Keys are distinct (plain), or distinct pairs built
so that neither token alone fixes the value (conjunctive): with m = P/2 first tokens A_i and m
second tokens B_i (each set distinct), the pairs are (A_i, B_i) and (A_i, B_{(i+1) mod m}), so
every first token and every second token occurs in two pairs with two different values. The
context lists the pairs in random order; queries pick pairs uniformly (with replacement).
Scored: exactly the query answers (the targets whose input is a query's last key token).

Worked example (plain, K=4, V=4 -> values 4..7, SEP=8, P=2, Q=2):
  x       = 2 5 0 7 8 0 7 2 5
  inputs  = 2 5 0 7 8 0 7 2      targets = 5 0 7 8 0 7 2 5
  weights = 0 0 0 0 0 1 0 1

Complexity (ladders): log2(P * V) -- P associations, each one of V values; the conjunctive
variant adds 1 (a key is two tokens).

Letters: B batch, P pairs, Q queries, W key width (1 or 2), T = L + 1 tokens.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ea_jax.tasks import base

FAMILY = "recall"


@dataclasses.dataclass(frozen=True)
class RecallTask(base.TaskBase):
  """Multi-query associative recall; see the module docstring."""

  num_keys: int = 16
  num_values: int = 16
  num_pairs: int = 8
  num_queries: int = 8
  conjunctive: bool = False

  family = FAMILY

  def __post_init__(self):
    f = FAMILY
    conjunctive = base.check_bool(f, "conjunctive", self.conjunctive)
    if conjunctive:
      pairs = base.check_int(f, "num_pairs", self.num_pairs, 4)
      if pairs % 2:
        raise ValueError(f"{f}.num_pairs={pairs}; allowed: an even integer >= 4 when "
                         "conjunctive=True")
      keys = base.check_int(f, "num_keys", self.num_keys, pairs // 2)
    else:
      pairs = base.check_int(f, "num_pairs", self.num_pairs, 1)
      keys = base.check_int(f, "num_keys", self.num_keys, pairs)
    values = base.check_int(f, "num_values", self.num_values, pairs)
    queries = base.check_int(f, "num_queries", self.num_queries, 1)
    for name, value in (("num_keys", keys), ("num_values", values), ("num_pairs", pairs),
                        ("num_queries", queries)):
      object.__setattr__(self, name, value)

  @property
  def key_width(self) -> int:
    return 2 if self.conjunctive else 1

  @property
  def sep_id(self) -> int:
    return self.num_keys + self.num_values

  @property
  def vocab_size(self) -> int:
    return self.num_keys + self.num_values + 1

  @property
  def seq_len(self) -> int:
    return (self.num_pairs + self.num_queries) * (self.key_width + 1)  # T - 1

  def _sample(self, rng, batch_size):
    b, p, q, w = batch_size, self.num_pairs, self.num_queries, self.key_width
    k_key, k_key2, k_val, k_order, k_query = jax.random.split(rng, 5)
    if self.conjunctive:
      m = p // 2
      first_BM = base.distinct_indices(k_key, b, self.num_keys, m)
      second_BM = base.distinct_indices(k_key2, b, self.num_keys, m)
      idx_M = jnp.arange(m)
      first_BP = jnp.concatenate([first_BM, first_BM], axis=1)
      second_BP = jnp.concatenate([second_BM, second_BM[:, (idx_M + 1) % m]], axis=1)
      keys_BPW = jnp.stack([first_BP, second_BP], axis=2)
    else:
      keys_BPW = base.distinct_indices(k_key, b, self.num_keys, p)[:, :, None]
    values_BP = self.num_keys + base.distinct_indices(k_val, b, self.num_values, p)
    items_BPI = jnp.concatenate([keys_BPW, values_BP[:, :, None]], axis=2)  # I = W + 1
    order_BP = base.distinct_indices(k_order, b, p, p)
    context_BPI = jnp.take_along_axis(items_BPI, order_BP[:, :, None], axis=1)
    chosen_BQ = jax.random.randint(k_query, (b, q), 0, p)
    queries_BQI = jnp.take_along_axis(items_BPI, chosen_BQ[:, :, None], axis=1)
    sep_B1 = jnp.full((b, 1), self.sep_id, jnp.int32)
    x_BT = jnp.concatenate([context_BPI.reshape(b, p * (w + 1)), sep_B1,
                            queries_BQI.reshape(b, q * (w + 1))], axis=1)
    # Targets are x_1..x_{T-1}; query i's value sits at x index p(w+1) + 1 + i(w+1) + w.
    answer_Q = p * (w + 1) + 1 + jnp.arange(q) * (w + 1) + w
    scored_L = jnp.zeros((self.seq_len,), bool).at[answer_Q - 1].set(True)
    return base.next_token_batch(x_BT, jnp.broadcast_to(scored_L[None, :], (b, self.seq_len)))
