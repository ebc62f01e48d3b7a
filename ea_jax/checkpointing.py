"""orbax checkpoints of the train state: save every N steps, keep the last k (and the steps a run
still needs, e.g. its selected checkpoint), restore onto any mesh.

Restoring takes an *abstract* state (ShapeDtypeStructs carrying the current NamedShardings), so
a checkpoint written on one mesh restores onto another. Before restoring, the stored parameter
shapes are compared with the abstract ones and a mismatch names the parameter.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Collection, Sequence

import jax
import orbax.checkpoint as ocp
from absl import logging
from flax import traverse_util


class CheckpointError(RuntimeError):
  """A checkpoint cannot be used with the current configuration or cannot be read."""


def _brief(e: Exception) -> str:
  """A library exception in a few words: its type and the first line of its message (orbax's
  messages can hold a long dump of the storage layer)."""
  first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
  return f"{type(e).__name__}: {first[:160]}"


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with sharding) of a tree of jax.Arrays."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _flat_shapes(tree) -> dict[str, tuple]:
  flat = traverse_util.flatten_dict(tree, sep="/") if isinstance(tree, dict) else {"": tree}
  return {k: tuple(v.shape) for k, v in flat.items() if hasattr(v, "shape")}


def compare_param_shapes(stored: dict, wanted: dict, where: str) -> None:
  """Raises CheckpointError naming every parameter whose stored shape differs from the model's."""
  have, want = _flat_shapes(stored), _flat_shapes(wanted)
  problems = []
  for name in sorted(set(have) | set(want)):
    if name not in have:
      problems.append(f"  {name}: missing in checkpoint (model wants {want[name]})")
    elif name not in want:
      problems.append(f"  {name}: in checkpoint {have[name]} but not in the model")
    elif have[name] != want[name]:
      problems.append(f"  {name}: checkpoint {have[name]} != model {want[name]}")
  if problems:
    raise CheckpointError(
      f"the checkpoint in {where} does not match the config's model; differing parameters:\n"
      + "\n".join(problems)
      + "\nUse a fresh --workdir, or the config the checkpoint was trained with."
    )


@dataclasses.dataclass
class KeepSteps(ocp.checkpoint_managers.PreservationPolicy):
  """Preserves the steps `steps_fn()` names at clean-up time.

  orbax's `CustomSteps` fixes its steps when built; a run's selected checkpoint moves as
  validation evals arrive, so this policy asks for the current set each time orbax cleans up.
  """

  steps_fn: Callable[[], Collection[int]]

  def should_preserve(self, checkpoints: Sequence[Any], *, context: Any) -> Sequence[bool]:
    del context
    keep = set(self.steps_fn())
    return [c.step in keep for c in checkpoints]


class Checkpoints:
  """Thin wrapper over `ocp.CheckpointManager` for one TrainState pytree.

  Args:
    directory: where step directories go (made absolute).
    keep: how many of the most recent checkpoints to keep.
    keep_steps: optional callable returning further steps to keep (e.g. the selected one).
  """

  def __init__(
    self, directory: str, keep: int, keep_steps: Callable[[], Collection[int]] | None = None
  ):
    if keep < 1:
      raise ValueError(f"config.train.keep_checkpoints={keep}: must be >= 1")
    self.directory = os.path.abspath(directory)
    self._closed = False
    self._last_saved = None
    policies = [ocp.checkpoint_managers.LatestN(n=keep)]
    if keep_steps is not None:
      policies.append(KeepSteps(keep_steps))
    options = ocp.CheckpointManagerOptions(
      create=True, preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies)
    )
    try:
      self.manager = ocp.CheckpointManager(
        self.directory, options=options, item_handlers=ocp.StandardCheckpointHandler()
      )
    except Exception as e:  # unreadable step metadata etc.
      raise CheckpointError(
        f"cannot open checkpoints in {self.directory} ({_brief(e)}); delete "
        f"the damaged step directory to fall back to an earlier step"
      ) from e

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any) -> None:
    """Saves asynchronously (atomic: a partial save is never visible as a step)."""
    if step in self.manager.all_steps() or step == self._last_saved:
      return
    self._last_saved = step
    self.manager.save(step, args=ocp.args.StandardSave(state), force=True)
    logging.info("checkpoint: saving step %d to %s", step, self.directory)

  def restore(self, step: int, abstract_state: Any) -> Any:
    """Restores `step` onto the shardings of `abstract_state` (a tree of ShapeDtypeStructs)."""
    where = os.path.join(self.directory, str(step))
    try:
      meta = self.manager.item_metadata(step)
      tree = getattr(meta, "tree", meta)
    except Exception as e:
      raise CheckpointError(
        f"checkpoint {where} is unreadable or corrupt ({_brief(e)}); delete "
        f"it to fall back to an earlier step"
      ) from e
    if not isinstance(tree, dict) or "params" not in tree:
      raise CheckpointError(
        f"checkpoint {where} does not hold a train state (no 'params', "
        f"found {type(tree).__name__}: its metadata is missing or damaged); "
        f"delete it to fall back to an earlier step"
      )
    compare_param_shapes(tree["params"], abstract_state.params, where)
    try:
      return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
    except Exception as e:
      raise CheckpointError(
        f"checkpoint {where} could not be restored ({_brief(e)}); delete "
        f"it to fall back to an earlier step"
      ) from e

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk (before restoring one of them)."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager (idempotent)."""
    if self._closed:
      return
    self._closed = True
    self.manager.wait_until_finished()
    self.manager.close()
