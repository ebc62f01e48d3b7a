"""A workdir's identity: which config fields may differ from its `train_config.json`.

A run's stored config is the record of what its checkpoints are. Two lists say what a later
command may change:

- `RESUME_MAY_CHANGE`, for `train.py` on an existing workdir: the step budget (`num_steps`, to
  extend a run; the cosine schedule then stretches to the new end), logging, eval and
  checkpoint cadence, the stopping rule's dials, profiling, the eval batch and the execution
  layout (attention implementation, mesh, sharding rules). Anything else -- model, task, data,
  optimizer, seed, the validation set (`eval.seed`, `eval.num_examples`) -- changes the
  experiment and is refused.
- `EVAL_MAY_CHANGE`, for `eval.py`: the split, the number of examples, the sequence length
  (length generalisation) and the execution layout. A differing model, task, data or eval-set
  field is an error. Training-loop fields (`EVAL_IGNORES`, all of `config.train`) do not affect
  an evaluation and are ignored, so the training command's own `--config` and flags still work.

Patterns are `fnmatch` patterns over dotted field names.
"""

from __future__ import annotations

import fnmatch
import json
from typing import Any, Mapping, Sequence

from flax import traverse_util

_LAYOUT = ("model.attention_impl", "mesh.*", "logical_axis_rules.*")
RESUME_MAY_CHANGE = (
  "train.num_steps",
  "train.log_every",
  "train.eval_every",
  "train.checkpoint_every",
  "train.keep_checkpoints",
  "train.early_stop",
  "train.patience",
  "train.plateau_rel",
  "train.min_steps",
  "train.peak_flops",
  "train.profile_steps",
  "eval.split",
  "eval.batch_size",
) + _LAYOUT
EVAL_MAY_CHANGE = ("eval.split", "eval.num_examples", "eval.batch_size", "task.seq_len") + _LAYOUT
EVAL_IGNORES = ("train.*",)
# Derived from other task fields (e.g. complexity is a function of the dials): never compared.
_DERIVED = ("task.label", "task.complexity")


class ProvenanceError(ValueError):
  """A config differs from a workdir's run in a field that may not change."""


def as_dict(config) -> dict:
  """A ConfigDict (or a stored train_config.json "config" entry) as plain JSON values."""
  if isinstance(config, Mapping):
    return json.loads(json.dumps(dict(config), default=str))
  return json.loads(config.to_json_best_effort())


def flatten(config) -> dict[str, Any]:
  return traverse_util.flatten_dict(as_dict(config), sep=".")


def matches(name: str, patterns: Sequence[str]) -> bool:
  return any(fnmatch.fnmatchcase(name, p) for p in patterns)


_MISSING = "<absent>"


def differences(
  stored, given, allowed: Sequence[str] = (), ignored: Sequence[str] = ()
) -> list[tuple[str, Any, Any]]:
  """(field, stored value, given value) for every field that differs and is not allowed."""
  a, b = flatten(stored), flatten(given)
  out = []
  for name in sorted(set(a) | set(b)):
    if matches(name, tuple(allowed) + tuple(ignored) + _DERIVED):
      continue
    va, vb = a.get(name, _MISSING), b.get(name, _MISSING)
    if va != vb:
      out.append((name, va, vb))
  return out


def _listing(diffs) -> str:
  return "; ".join(f"{n}: run {va!r}, given {vb!r}" for n, va, vb in diffs)


def check_resume(stored, given, workdir: str) -> None:
  """Raises ProvenanceError naming every field that differs outside `RESUME_MAY_CHANGE`."""
  diffs = differences(stored, given, RESUME_MAY_CHANGE)
  if diffs:
    raise ProvenanceError(
      f"{workdir} holds a different experiment ({_listing(diffs)}); use a new --workdir, or "
      f"the run's own config ({workdir}/train_config.json). May change on resume: "
      f"{', '.join(RESUME_MAY_CHANGE)}"
    )


def check_eval(stored, given, workdir: str) -> None:
  """Raises ProvenanceError naming every model / task / data / eval-set field that differs."""
  diffs = differences(stored, given, EVAL_MAY_CHANGE, EVAL_IGNORES)
  if diffs:
    raise ProvenanceError(
      f"the config differs from the run in {workdir} ({_listing(diffs)}); evaluation uses "
      f"the run's model, task and data: drop those overrides. May change: "
      f"{', '.join(EVAL_MAY_CHANGE)}"
    )
