"""`make_task(task_config)`: the task family named by `task_config.name`, built from its dials."""

from __future__ import annotations

from typing import Any, Mapping

from ea_jax.tasks import base, dyck, induction, modular, recall, recurrence, selective_copy, text

# Family name -> task dataclass. Each family module documents its layout and dials.
FAMILIES = {
  recurrence.FAMILY: recurrence.RecurrenceTask,
  recall.FAMILY: recall.RecallTask,
  induction.FAMILY: induction.InductionTask,
  selective_copy.FAMILY: selective_copy.SelectiveCopyTask,
  modular.FAMILY: modular.ModularTask,
  dyck.FAMILY: dyck.DyckTask,
  text.FAMILY: text.TextTask,
}
# Fields every task config may carry that describe the config rather than the task.
DESCRIPTIVE_FIELDS = ("complexity", "label")


def family_names() -> list[str]:
  return sorted(FAMILIES)


def _as_dict(task_config: Any) -> dict:
  if hasattr(task_config, "to_dict"):  # ml_collections ConfigDict / FrozenConfigDict
    return dict(task_config.to_dict())
  if isinstance(task_config, Mapping):
    return dict(task_config)
  raise ValueError(
    f"task_config must be a ConfigDict or mapping with a 'name' field; got "
    f"{type(task_config).__name__}"
  )


def make_task(task_config: Any):
  """Builds a task from `task_config` (ConfigDict or mapping): `name` picks the family, the other
  fields are that family's dials; `complexity` and `label` are ignored. Unknown family or field
  -> ValueError naming it and what is allowed."""
  fields = _as_dict(task_config)
  if "name" not in fields:
    raise ValueError(f"task config has no 'name' field; allowed names: {family_names()}")
  name = fields.pop("name")
  for key in DESCRIPTIVE_FIELDS:
    fields.pop(key, None)
  if name not in FAMILIES:
    raise ValueError(f"task.name={name!r} is not a known task family; allowed: {family_names()}")
  return base.build(FAMILIES[name], name, fields)
