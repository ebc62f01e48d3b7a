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
import math

import jax.numpy as jnp

from ea_jax.tasks import base, splits

FAMILY = "recall"


@dataclasses.dataclass(frozen=True)
class RecallTask(base.TaskBase):
  """Multi-query associative recall; see the module docstring."""

  num_keys: int = 16
  num_values: int = 16
  num_pairs: int = 8
  num_queries: int = 8
  conjunctive: bool = False
  split_fractions: tuple = base.split_fractions_field()

  family = FAMILY

  def __post_init__(self):
    f = FAMILY
    conjunctive = base.check_bool(f, "conjunctive", self.conjunctive)
    if conjunctive:
      pairs = base.check_int(f, "num_pairs", self.num_pairs, 4)
      if pairs % 2:
        raise ValueError(
          f"{f}.num_pairs={pairs}; allowed: an even integer >= 4 when conjunctive=True"
        )
      keys = base.check_int(f, "num_keys", self.num_keys, pairs // 2)
    else:
      pairs = base.check_int(f, "num_pairs", self.num_pairs, 2)
      keys = base.check_int(f, "num_keys", self.num_keys, pairs)
    values = base.check_int(f, "num_values", self.num_values, pairs)
    queries = base.check_int(f, "num_queries", self.num_queries, 1)
    base.finish(
      self, f, dict(num_keys=keys, num_values=values, num_pairs=pairs, num_queries=queries)
    )

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

  # Splits: the free digits are the queries, as the context position (0..P-1) of the
  # association each asks for; the first j are the split key's digits, the context and the
  # other queries are hashed.

  def _free_digits(self):
    return self.num_pairs, self.num_queries

  def _key_from(self, context_PI, chosen_Q):
    space = self.split_space
    j = space.digits
    rest = jnp.concatenate([context_PI.reshape(-1), chosen_Q[j:]])
    return space, j, splits.hash_values(rest)

  def _split_key(self, x_T):
    p, q, w = self.num_pairs, self.num_queries, self.key_width
    context_PI = x_T[: p * (w + 1)].reshape(p, w + 1)
    queries_QI = x_T[p * (w + 1) + 1 :].reshape(q, w + 1)
    same_QP = jnp.all(queries_QI[:, None, :w] == context_PI[None, :, :w], axis=2)
    chosen_Q = jnp.argmax(same_QP, axis=1).astype(jnp.int32)
    space, j, h = self._key_from(context_PI, chosen_Q)
    return space.key(space.from_digits(chosen_Q[:j]), h)

  def _num_bits(self):
    return self.key_width * self.num_keys + self.num_values + self.num_pairs + self.num_queries

  def _sequence(self, bits_W, s):
    p, q, w, nk, nv = (
      self.num_pairs,
      self.num_queries,
      self.key_width,
      self.num_keys,
      self.num_values,
    )
    bits_key, bits_val = bits_W[: w * nk], bits_W[w * nk : w * nk + nv]
    bits_order, bits_query = bits_W[w * nk + nv : w * nk + nv + p], bits_W[w * nk + nv + p :]
    if self.conjunctive:
      m = p // 2
      first_M = base.distinct_indices(bits_key[:nk], m)
      second_M = base.distinct_indices(bits_key[nk:], m)
      first_P = jnp.concatenate([first_M, first_M])
      second_P = jnp.concatenate([second_M, second_M[(jnp.arange(m) + 1) % m]])
      keys_PW = jnp.stack([first_P, second_P], axis=1)
    else:
      keys_PW = base.distinct_indices(bits_key, p)[:, None]
    values_P = nk + base.distinct_indices(bits_val, p)
    items_PI = jnp.concatenate([keys_PW, values_P[:, None]], axis=1)  # I = W + 1
    context_PI = items_PI[base.distinct_indices(bits_order, p)]
    chosen_Q = base.uniform_ints(bits_query, p)
    space, j, h = self._key_from(context_PI, chosen_Q)
    chosen_Q = chosen_Q.at[:j].set(space.to_digits(space.offset(s, h)))
    queries_QI = context_PI[chosen_Q]
    sep_1 = jnp.full((1,), self.sep_id, jnp.int32)
    x_T = jnp.concatenate([context_PI.reshape(-1), sep_1, queries_QI.reshape(-1)])
    # Targets are x_1..x_{T-1}; query i's value sits at x index p(w+1) + 1 + i(w+1) + w.
    answer_Q = p * (w + 1) + 1 + jnp.arange(q) * (w + 1) + w
    scored_L = jnp.zeros((self.seq_len,), bool).at[answer_Q - 1].set(True)
    return x_T, scored_L

  def num_contexts(self) -> int:
    """Distinct context listings (the P associations in listed order)."""
    p, k, v = self.num_pairs, self.num_keys, self.num_values
    values = math.perm(v, p)  # distinct values in listed order
    if not self.conjunctive:
      return math.perm(k, p) * values  # distinct keys in listed order
    m = p // 2
    # Key pairs: an m-set of first tokens, an m-set of second tokens and a Hamiltonian cycle of
    # the complete bipartite graph K_{m,m} on them ((m!)^2 / (2m) cycles); then listed in any
    # of P! orders.
    cycles = math.factorial(m) * math.factorial(m - 1) // 2
    return math.comb(k, m) ** 2 * cycles * math.factorial(p) * values

  def num_sequences(self, split):
    """Exact: contexts x queries; a split holds its share of the first j queries' values."""
    space = self.split_space
    return (
      self.num_contexts()
      * self.num_pairs ** (self.num_queries - space.digits)
      * space.num_keys(split)
    )
