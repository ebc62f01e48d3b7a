"""Device mesh, logical-axis rules and helpers that place train state and batches on the mesh.

The mesh has three axes:
  data    pure data parallelism (batch split, parameters replicated)
  fsdp    batch split *and* parameters/optimizer state split along their "embed" dimension
  tensor  model parallelism over heads / mlp / vocab

Parameters and activations carry *logical* axis names ("batch", "embed", "heads", ...); the table
`DEFAULT_RULES` maps each to mesh axes. A config overrides single entries through
`config.logical_axis_rules` (strings: a mesh axis, several joined by ",", or "" for replicated).

State is sharded at creation: `jax.eval_shape` of the init function gives boxed abstract
parameters, `nn.get_partition_spec` their logical specs, `logical_to_mesh_shardings` the
`NamedSharding`s, and the init function is jitted with those as `out_shardings`.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis name -> mesh axes (in precedence order; flax skips a mesh axis already used
# by an earlier dimension of the same array).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
  ("batch", ("data", "fsdp")),
  ("length", None),
  ("vocab", "tensor"),
  ("embed", "fsdp"),
  ("mlp", "tensor"),
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("head_dim", None),
  ("norm", None),
)

BATCH_AXES = ("batch", "length")


def rule_to_string(mesh_axes) -> str:
  """Mesh axes of one rule as the config string: None -> "", ("a","b") -> "a,b"."""
  if mesh_axes is None:
    return ""
  if isinstance(mesh_axes, str):
    return mesh_axes
  return ",".join(mesh_axes)


def _rule_from_string(logical: str, text: str):
  text = text.strip()
  if text.lower() in ("", "none"):
    return None
  axes = tuple(a.strip() for a in text.split(","))
  for a in axes:
    if a not in MESH_AXES:
      raise ValueError(
        f"logical_axis_rules.{logical}={text!r}: mesh axis {a!r} is not one of "
        f"{MESH_AXES} (use '' for replicated)"
      )
  return axes[0] if len(axes) == 1 else axes


def default_rules_config() -> dict[str, str]:
  """`DEFAULT_RULES` as a flat {logical name: mesh-axes string} dict for `config.logical_axis_rules`."""
  return {name: rule_to_string(axes) for name, axes in DEFAULT_RULES}


def logical_rules(overrides: Mapping[str, str] | None = None) -> tuple[tuple[str, Any], ...]:
  """The rules table with `overrides` ({logical name: "axis[,axis]" or ""}) applied."""
  overrides = dict(overrides or {})
  known = {name for name, _ in DEFAULT_RULES}
  unknown = sorted(set(overrides) - known)
  if unknown:
    raise ValueError(f"logical_axis_rules: unknown logical axis {unknown}; known: {sorted(known)}")
  return tuple(
    (name, _rule_from_string(name, overrides[name]) if name in overrides else axes)
    for name, axes in DEFAULT_RULES
  )


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> tuple[int, int, int]:
  """Resolves config.mesh ({data, fsdp, tensor}, at most one -1 = remaining devices)."""
  unknown = sorted(set(mesh_config) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"config.mesh has unknown axes {unknown}; allowed: {MESH_AXES}")
  sizes = [int(mesh_config.get(a, 1)) for a in MESH_AXES]
  for a, s in zip(MESH_AXES, sizes):
    if s == 0 or s < -1:
      raise ValueError(f"config.mesh.{a}={s}: must be a positive size or -1 (remaining devices)")
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh={dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(
        f"config.mesh={dict(zip(MESH_AXES, sizes))}: {num_devices} devices are not "
        f"divisible by the fixed axes' product {known}"
      )
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(
      f"config.mesh={dict(zip(MESH_AXES, sizes))} uses {math.prod(sizes)} devices "
      f"but {num_devices} are available; set one axis to -1"
    )
  return tuple(sizes)


def create_mesh(
  mesh_config: Mapping[str, int], devices: Sequence[jax.Device] | None = None
) -> jax.sharding.Mesh:
  """A ("data", "fsdp", "tensor") mesh with Auto axis types over all (or the given) devices."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_config, len(devices))
  return jax.make_mesh(
    shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
  )


def _fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: jax.sharding.Mesh) -> PartitionSpec:
  """Drops mesh axes from dimensions they do not divide (such dims stay replicated)."""
  dims = list(spec) + [None] * (len(shape) - len(spec))
  fitted = []
  for size, axes in zip(shape, dims):
    if axes is None:
      fitted.append(None)
      continue
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    kept, prod = [], 1
    for name in names:
      if size % (prod * mesh.shape[name]) == 0:
        kept.append(name)
        prod *= mesh.shape[name]
    fitted.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return PartitionSpec(*fitted)


def logical_to_mesh_shardings(
  logical_specs: Any, abstract_tree: Any, mesh: jax.sharding.Mesh, rules
) -> Any:
  """NamedShardings for `abstract_tree` (unboxed ShapeDtypeStructs) from its logical specs.

  `logical_specs` is `nn.get_partition_spec(boxed_abstract_tree)`: PartitionSpecs of logical
  names, one per leaf of `abstract_tree`. A mesh axis that does not divide a dimension is
  dropped for that array (e.g. 1 kv-head on a tensor axis of 2 is replicated).
  """
  mesh_specs = nn.logical_to_mesh(logical_specs, rules)
  is_spec = lambda x: isinstance(x, PartitionSpec)
  return jax.tree.map(
    lambda spec, leaf: NamedSharding(mesh, _fit_spec(spec, leaf.shape, mesh)),
    mesh_specs,
    abstract_tree,
    is_leaf=is_spec,
  )


def batch_sharding(mesh: jax.sharding.Mesh, rules, global_batch_size: int) -> NamedSharding:
  """Sharding of a [B, L] batch array; B must divide evenly over the batch's mesh axes."""
  spec = nn.logical_to_mesh_axes(BATCH_AXES, rules)
  axes = spec[0]
  names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
  ways = math.prod(mesh.shape[n] for n in names)
  if global_batch_size % ways:
    raise ValueError(
      f"batch size {global_batch_size} is not divisible by the {ways} batch shards "
      f"(mesh axes {names} of sizes {[mesh.shape[n] for n in names]})"
    )
  return NamedSharding(mesh, spec)


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def host_to_global(array_np: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A global array from a host array every process holds in full; each process fills the
  shards on its own devices (`jax.make_array_from_callback`)."""
  return jax.make_array_from_callback(array_np.shape, sharding, lambda index: array_np[index])
