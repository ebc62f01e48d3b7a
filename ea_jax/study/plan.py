"""The study's grid: variants, levels, widths, seeds, and the runs that tune them.

A *run* is one ordinary training run (`train_lib.train_and_evaluate`) of `config.base` with the
task set to one ladder level, the model width set, and the variant's model fields applied. Its
settings (learning rate, position encoding) are either fixed in the config or chosen by the
tuning stage (`ea_jax.study.results.choose_settings`).

Tuning (per variant and width, the same procedure for every variant):
  1. position encoding: at width `tune.pos_width`, every (pos, lr) of `tune.pos_encodings` x
     `tune.lr_grid`; the variant's position encoding is the one of its best run there.
  2. learning rate: at every width, `tune.lr_grid` with the chosen position encoding (width
     `tune.pos_width` reuses step 1's runs); if the best learning rate is at an edge of the grid
     tried so far, the grid grows by one point x3 beyond that edge and the choice is made again,
     at most `tune.max_extensions` times per (variant, width).
"Best" = lowest validation loss at the run's selected checkpoint. Tuning runs train on
`tune.task` (a ladder level with a `rule_seed` of its own, so its rules are not those of any
reported level) with seed `tune.seed`; it is never reported.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from typing import Any, Sequence

# Variant base names -> model fields. Modifiers: "+scale=X" (attention_scale), "+eps=X"
# (ea_eps), "+qknorm" (qk_norm=True), "+pos=NAME" (pos_encoding).
BASE_VARIANTS = {
  "dpa": {"attention": "dpa"},
  "ea-rational": {"attention": "ea", "ea_kernel": "rational"},
  "ea-square": {"attention": "ea", "ea_kernel": "square"},
}
MODIFIERS = {
  "scale": "attention_scale",
  "eps": "ea_eps",
  "qknorm": "qk_norm",
  "pos": "pos_encoding",
}
STAGES = ("all", "tune", "main")


def _pos_encodings() -> tuple[str, ...]:
  from ea_jax import model  # the list is defined once, with the model

  return tuple(model.POS_ENCODINGS)


def parse_variant(spec: str) -> dict:
  """Model-field overrides of a variant name, e.g. "ea-square+scale=1+qknorm"."""
  parts = spec.split("+")
  if parts[0] not in BASE_VARIANTS:
    raise ValueError(
      f"variant {spec!r}: base name {parts[0]!r} unknown; allowed: "
      f"{sorted(BASE_VARIANTS)} with modifiers +scale=X, +eps=X, +qknorm, "
      f"+pos={'|'.join(_pos_encodings())}"
    )
  fields = dict(BASE_VARIANTS[parts[0]])
  for part in parts[1:]:
    name, _, value = part.partition("=")
    if name not in MODIFIERS:
      raise ValueError(f"variant {spec!r}: modifier {name!r} unknown; allowed: {sorted(MODIFIERS)}")
    if name == "qknorm":
      if value:
        raise ValueError(f"variant {spec!r}: +qknorm takes no value")
      fields["qk_norm"] = True
    elif name == "pos":
      if value not in _pos_encodings():
        raise ValueError(
          f"variant {spec!r}: +pos= must be one of {_pos_encodings()}, got {value!r}"
        )
      fields["pos_encoding"] = value
    else:
      try:
        fields[MODIFIERS[name]] = float(value)
      except ValueError:
        raise ValueError(f"variant {spec!r}: +{name}= needs a number, got {value!r}") from None
  return fields


def kernel_name(variant: str) -> str:
  """The attention kernel of a variant: "softmax" (DPA), "rational" or "square" (EA)."""
  fields = parse_variant(variant)
  return "softmax" if fields["attention"] == "dpa" else fields["ea_kernel"]


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run. `levels` lists every (ladder, level index) that this task config is.

  `learning_rate` / `pos_encoding` are None in a study run whose settings the tuning stage
  chooses; `with_settings` fills them in.
  """

  stage: str  # "tune" or "main"
  task: tuple  # sorted (field, value) pairs of the task config
  label: str
  complexity: float
  levels: tuple  # ((ladder, level), ...); () for the tuning task
  variant: str
  width: int
  seed: int
  learning_rate: float | None
  pos_encoding: str | None

  def with_settings(self, learning_rate: float, pos_encoding: str) -> "Run":
    return dataclasses.replace(self, learning_rate=float(learning_rate), pos_encoding=pos_encoding)

  @property
  def key(self) -> str:
    """Directory name: readable, unique for (stage, task, variant, width, seed, lr, pos)."""
    if self.learning_rate is None or self.pos_encoding is None:
      raise ValueError(f"run {self.label} {self.variant} w{self.width}: settings not chosen yet")
    digest = hashlib.sha1(repr(self.task).encode()).hexdigest()[:6]
    label = re.sub(r"[^A-Za-z0-9]+", "", self.label) or "task"
    variant = re.sub(r"[^A-Za-z0-9.-]+", "_", self.variant)
    return (
      f"{self.stage}-{label}-{digest}-{variant}-{self.pos_encoding}-w{self.width}"
      f"-lr{self.learning_rate:g}-s{self.seed}"
    )

  def describe(self) -> dict:
    """The JSON-ready identity of the run (stored in its result.json)."""
    return {
      "stage": self.stage,
      "task": dict(self.task),
      "label": self.label,
      "complexity": self.complexity,
      "levels": [list(x) for x in self.levels],
      "variant": self.variant,
      "width": self.width,
      "seed": self.seed,
      "learning_rate": self.learning_rate,
      "pos_encoding": self.pos_encoding,
      "run_id": self.key,
    }


def task_items(task_cfg) -> tuple:
  """The identity of a task config: its sorted fields without `complexity` and `label`."""
  d = task_cfg.to_dict() if hasattr(task_cfg, "to_dict") else dict(task_cfg)
  return tuple(
    sorted(
      (k, v if not isinstance(v, list) else tuple(v))
      for k, v in d.items()
      if k not in ("complexity", "label")
    )
  )


def levels_of(config) -> list[tuple[str, int, Any]]:
  """(ladder, level index, task config) for every requested level, in config order."""
  from ea_jax import tasks

  out = []
  for name in config.ladders:
    levels = tasks.ladder(name)
    wanted = config.levels.get(name) if name in config.levels else None
    for i in range(len(levels)) if wanted is None else wanted:
      if not 0 <= i < len(levels):
        raise ValueError(
          f"config.levels.{name}: level {i} out of range; the ladder has "
          f"{len(levels)} levels (0..{len(levels) - 1})"
        )
      out.append((name, int(i), levels[i]))
  return out


def tuning_task(config):
  """The tuning task: `tune.ladder` level `tune.level` with `rule_seed = tune.rule_seed`."""
  from ea_jax import tasks

  levels = tasks.ladder(config.tune.ladder)
  if not 0 <= config.tune.level < len(levels):
    raise ValueError(
      f"config.tune.level={config.tune.level} out of range for ladder "
      f"{config.tune.ladder!r} ({len(levels)} levels)"
    )
  cfg = levels[config.tune.level]
  if "rule_seed" in cfg:
    cfg.rule_seed = int(config.tune.rule_seed)
  return cfg


def validate(config) -> None:
  """Raises ValueError (naming the field) on a config the study cannot run."""
  for field in ("variants", "widths", "seeds", "ladders"):
    if len(config[field]) == 0:
      raise ValueError(f"config.{field} is empty: give at least one value")
  if len(set(config.variants)) != len(config.variants):
    raise ValueError(f"config.variants has duplicates: {tuple(config.variants)}")
  for v in config.variants:
    parse_variant(v)
  heads = config.base.model.num_heads
  for w in config.widths:
    if w % heads or (w // heads) % 2:
      raise ValueError(
        f"config.widths: width {w} must be a multiple of 2 * num_heads "
        f"(= {2 * heads}) so that head_dim is even (rope)"
      )
  t = config.tune
  if len(t.lr_grid) == 0 or any(not lr > 0 for lr in t.lr_grid):
    raise ValueError(f"config.tune.lr_grid={tuple(t.lr_grid)}: needs >= 1 learning rate, all > 0")
  if sorted(set(t.lr_grid)) != list(t.lr_grid):
    raise ValueError(f"config.tune.lr_grid={tuple(t.lr_grid)}: must be increasing, no repeats")
  if len(t.pos_encodings) == 0 or any(p not in _pos_encodings() for p in t.pos_encodings):
    raise ValueError(
      f"config.tune.pos_encodings={tuple(t.pos_encodings)}: allowed {_pos_encodings()}"
    )
  if t.pos_width not in config.widths:
    raise ValueError(
      f"config.tune.pos_width={t.pos_width} must be one of config.widths {tuple(config.widths)}"
    )
  if t.max_extensions < 0:
    raise ValueError(f"config.tune.max_extensions={t.max_extensions}: must be >= 0")
  if t.seed in config.seeds:
    raise ValueError(f"config.tune.seed={t.seed} is also a study seed; tuning must use its own")
  reported = {task_items(cfg) for _, _, cfg in levels_of(config)}
  if task_items(tuning_task(config)) in reported:
    raise ValueError(
      "config.tune: the tuning task is also a reported level; give it another config.tune.rule_seed"
    )
  if any("rule_seed" in cfg and cfg.rule_seed == t.rule_seed for _, _, cfg in levels_of(config)):
    raise ValueError(
      f"config.tune.rule_seed={t.rule_seed} is the rule seed of a reported "
      "level: its hidden rules would be seen in tuning"
    )


def needs_tuning(config) -> bool:
  return len(config.tune.lr_grid) > 1 or len(config.tune.pos_encodings) > 1


def study_runs(config) -> list[Run]:
  """Every study run (settings unset when tuned). A task config that is a level of two ladders
  is one run per (variant, width, seed), reported under both ladders, counted once."""
  validate(config)
  by_task: dict[tuple, list] = {}
  for ladder, level, cfg in levels_of(config):
    entry = by_task.setdefault(task_items(cfg), [cfg, []])
    entry[1].append((ladder, level))
  fixed_lr = None if needs_tuning(config) else float(config.tune.lr_grid[0])
  fixed_pos = None if needs_tuning(config) else config.tune.pos_encodings[0]
  return [
    Run(
      "main",
      items,
      cfg.label,
      float(cfg.complexity),
      tuple(levels),
      variant,
      int(w),
      int(seed),
      fixed_lr,
      fixed_pos,
    )
    for items, (cfg, levels) in by_task.items()
    for variant in config.variants
    for w in config.widths
    for seed in config.seeds
  ]


def tuning_run(config, variant: str, width: int, lr: float, pos: str) -> Run:
  cfg = tuning_task(config)
  return Run(
    "tune",
    task_items(cfg),
    cfg.label,
    float(cfg.complexity),
    (),
    variant,
    int(width),
    int(config.tune.seed),
    float(lr),
    pos,
  )


def shard(runs: Sequence[Run], shard_index: int, num_shards: int) -> list[Run]:
  """Round-robin share of `runs` for shard `shard_index` of `num_shards`."""
  if num_shards < 1 or not 0 <= shard_index < num_shards:
    raise ValueError(
      f"--shard_index={shard_index} --num_shards={num_shards}: need "
      "num_shards >= 1 and 0 <= shard_index < num_shards"
    )
  return [r for i, r in enumerate(runs) if i % num_shards == shard_index]


def run_config(config, run: Run):
  """The training config of one run: `config.base` with task, width, variant, seed, settings."""
  import ml_collections

  c = ml_collections.ConfigDict(config.base.to_dict())
  c.task = ml_collections.ConfigDict(dict(run.task))
  for name, value in parse_variant(run.variant).items():
    c.model[name] = value
  if "+pos=" not in run.variant:
    c.model.pos_encoding = run.pos_encoding
  c.model.embed_dim = run.width
  c.model.mlp_dim = config.mlp_ratio * run.width
  c.train.seed = run.seed
  c.train.learning_rate = float(run.learning_rate)
  # A level whose validation or test split is smaller than eval.num_examples is evaluated on
  # the whole split (every sequence once) instead of being refused.
  from ea_jax import tasks

  task = tasks.make_task(c.task)
  c.eval.num_examples = int(
    min(c.eval.num_examples, task.num_sequences("validation"), task.num_sequences("test"))
  )
  if run.stage == "tune":
    c.eval.seed = int(config.tune.eval_seed)
  return c
