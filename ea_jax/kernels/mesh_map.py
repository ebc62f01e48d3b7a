"""Run the Pallas EA kernels shard by shard when a device mesh is active.

A pallas_call is opaque to XLA's SPMD partitioner: inside a jit over a multi-device mesh its
operands would be gathered and the whole attention computed on every device. Attention is
independent across batch rows and heads, so under `jax.set_mesh(mesh)` the kernels are mapped
with `jax.shard_map`: batch over the mesh axes "data" and "fsdp", heads over "tensor" (the axis
names of ea_jax.sharding), each only where it divides the array. Inside an existing shard_map
(manual axes) or without a mesh, the kernels run as they are.
"""

from __future__ import annotations

import math

import jax
from jax.sharding import PartitionSpec as P

BATCH_MESH_AXES = ("data", "fsdp")
HEAD_MESH_AXES = ("tensor",)


def _dividing_axes(candidates, sizes, dim):
  """Longest prefix of `candidates` (mesh axes of size > 1) whose product divides `dim`."""
  axes = [a for a in candidates if sizes.get(a, 1) > 1]
  while axes and dim % math.prod(sizes[a] for a in axes):
    axes.pop()
  return tuple(axes)


def _entry(axes):
  if not axes:
    return None
  return axes[0] if len(axes) == 1 else axes


def map_over_mesh(fn, q_BTNH, k_BSKH, v_BSKH, mask):
  """fn(q, k, v, mask) -> o_BTNH, applied per (batch, head) shard of the active mesh.

  mask is None or [Bm, Nm, T, S] with Bm in {1, B}, Nm in {1, N}.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1 or mesh.manual_axes:
    return fn(q_BTNH, k_BSKH, v_BSKH, mask)
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  b, _, n, _ = q_BTNH.shape
  kh = k_BSKH.shape[2]
  batch = _dividing_axes(BATCH_MESH_AXES, sizes, b)
  heads = _dividing_axes(HEAD_MESH_AXES, sizes, math.gcd(n, kh))
  if not batch and not heads:
    return fn(q_BTNH, k_BSKH, v_BSKH, mask)
  seq_spec = P(_entry(batch), None, _entry(heads), None)
  mask_spec = P()
  if mask is not None:
    mask_spec = P(
      _entry(batch) if mask.shape[0] > 1 else None,
      _entry(heads) if mask.shape[1] > 1 else None,
      None,
      None,
    )
  # Query head n uses kv head n // (N / K): splitting N and K into the same number of
  # contiguous chunks keeps every query head with its kv head.
  mapped = jax.shard_map(
    fn, in_specs=(seq_spec, seq_spec, seq_spec, mask_spec), out_specs=seq_spec, check_vma=False
  )
  return mapped(q_BTNH, k_BSKH, v_BSKH, mask)
