"""Loss and exact accuracy metrics as clu `metrics.Collection`s.

Letters: B batch, L sequence length, V vocabulary.

- loss: cross-entropy averaged over scored positions (weights > 0), weighted by `weights`.
- token_accuracy: argmax == target, over scored positions.
- sequence_accuracy: a sequence counts as right only if every scored position is right; rows with
  no scored position (e.g. padding of the last eval batch) are not counted.
All are kept as (total, count) sums, so merging batches and steps is exact.
"""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from clu import metrics


def masked_cross_entropy(
  logits_BLV: jax.Array, targets_BL: jax.Array, weights_BL: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Returns (sum of weighted cross-entropy, sum of weights); logits are upcast to float32."""
  ce_BL = optax.softmax_cross_entropy_with_integer_labels(
    logits_BLV.astype(jnp.float32), targets_BL
  )
  w_BL = weights_BL.astype(jnp.float32)
  return jnp.sum(ce_BL * w_BL), jnp.sum(w_BL)


def mean_loss(logits_BLV, targets_BL, weights_BL) -> jax.Array:
  """Cross-entropy averaged over scored positions (0 if nothing is scored)."""
  total, count = masked_cross_entropy(logits_BLV, targets_BL, weights_BL)
  return total / jnp.maximum(count, 1.0)


@flax.struct.dataclass
class PerPosition(metrics.Metric):
  """Token accuracy at each position: totals/counts over the batch, shape [L]."""

  total: jax.Array
  count: jax.Array

  @classmethod
  def from_model_output(cls, correct_BL, scored_BL, **_) -> "PerPosition":
    return cls(
      total=jnp.sum(correct_BL & scored_BL, axis=0, dtype=jnp.int32),
      count=jnp.sum(scored_BL, axis=0, dtype=jnp.int32),
    )

  def merge(self, other: "PerPosition") -> "PerPosition":
    return type(self)(total=self.total + other.total, count=self.count + other.count)

  def compute(self) -> np.ndarray:
    total, count = np.asarray(self.total, np.float64), np.asarray(self.count, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
      return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def model_outputs(logits_BLV, targets_BL, weights_BL) -> dict[str, jax.Array]:
  """Sums the metrics below are built from: loss, and exact counts of right tokens/sequences."""
  scored_BL = weights_BL > 0
  correct_BL = jnp.argmax(logits_BLV, axis=-1).astype(targets_BL.dtype) == targets_BL
  seq_scored_B = jnp.any(scored_BL, axis=1)
  seq_correct_B = seq_scored_B & jnp.all(correct_BL | ~scored_BL, axis=1)
  loss_sum, weight_sum = masked_cross_entropy(logits_BLV, targets_BL, weights_BL)
  return dict(
    loss_sum=loss_sum,
    weight_sum=weight_sum,
    correct_BL=correct_BL,
    scored_BL=scored_BL,
    correct_tokens=jnp.sum(correct_BL & scored_BL, dtype=jnp.int32),
    scored_tokens=jnp.sum(scored_BL, dtype=jnp.int32),
    correct_sequences=jnp.sum(seq_correct_B, dtype=jnp.int32),
    scored_sequences=jnp.sum(seq_scored_B, dtype=jnp.int32),
  )


@flax.struct.dataclass
class Loss(metrics.Average):
  """Cross-entropy per scored position."""

  @classmethod
  def from_model_output(cls, loss_sum, weight_sum, **_) -> "Loss":
    return cls(total=loss_sum, count=weight_sum)


class _ExactRatio(metrics.Average):
  """Average of integer counts whose `compute()` (host side) divides in float64."""

  def compute(self) -> np.float64:
    count = np.float64(np.asarray(self.count))
    return np.float64(np.asarray(self.total)) / count if count else np.float64(np.nan)


@flax.struct.dataclass
class TokenAccuracy(_ExactRatio):
  """Right / scored positions."""

  @classmethod
  def from_model_output(cls, correct_tokens, scored_tokens, **_) -> "TokenAccuracy":
    return cls(total=correct_tokens, count=scored_tokens)


@flax.struct.dataclass
class SequenceAccuracy(_ExactRatio):
  """Sequences with every scored position right / sequences with a scored position."""

  @classmethod
  def from_model_output(cls, correct_sequences, scored_sequences, **_) -> "SequenceAccuracy":
    return cls(total=correct_sequences, count=scored_sequences)


@flax.struct.dataclass
class GradNorm(metrics.Average):
  """Global gradient norm, averaged over steps."""

  @classmethod
  def from_model_output(cls, grad_norm, **_) -> "GradNorm":
    return cls(total=grad_norm, count=jnp.ones((), jnp.int32))


@flax.struct.dataclass
class UpdateNorm(metrics.Average):
  """Global norm of the parameter update, averaged over steps."""

  @classmethod
  def from_model_output(cls, update_norm, **_) -> "UpdateNorm":
    return cls(total=update_norm, count=jnp.ones((), jnp.int32))


@flax.struct.dataclass
class LearningRate(metrics.LastValue):
  @classmethod
  def from_model_output(cls, learning_rate, **_) -> "LearningRate":
    return super().from_model_output(jnp.asarray(learning_rate, jnp.float32)[None])


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
  loss: Loss
  token_accuracy: TokenAccuracy
  sequence_accuracy: SequenceAccuracy
  grad_norm: GradNorm
  update_norm: UpdateNorm
  learning_rate: LearningRate

  @classmethod
  def make(
    cls, logits_BLV, targets_BL, weights_BL, *, grad_norm, update_norm, learning_rate
  ) -> "TrainMetrics":
    return cls.single_from_model_output(
      **model_outputs(logits_BLV, targets_BL, weights_BL),
      grad_norm=grad_norm,
      update_norm=update_norm,
      learning_rate=learning_rate,
    )


@flax.struct.dataclass
class EvalMetrics(metrics.Collection):
  loss: Loss
  token_accuracy: TokenAccuracy
  sequence_accuracy: SequenceAccuracy
  per_position_accuracy: PerPosition

  @classmethod
  def make(cls, logits_BLV, targets_BL, weights_BL) -> "EvalMetrics":
    return cls.single_from_model_output(**model_outputs(logits_BLV, targets_BL, weights_BL))


def to_python(computed: dict) -> dict:
  """Computed metrics as JSON-ready Python values (NaN -> None, arrays -> lists)."""
  out = {}
  for k, v in computed.items():
    a = np.asarray(v)
    if a.ndim == 0:
      f = float(a)
      out[k] = f if np.isfinite(f) else None
    else:
      out[k] = [float(x) if np.isfinite(x) else None for x in a.tolist()]
  return out
