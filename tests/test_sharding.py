"""Mesh/rules helpers, and a train step on 8 fake CPU devices (data x fsdp x tensor = 2x2x2)
that must equal the single-device step."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import train_helpers
from jax.sharding import PartitionSpec as P

from ea_jax import sharding

HELPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_helpers.py")


def test_mesh_shape_resolves_minus_one_and_rejects_bad_sizes():
  assert sharding.mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 2)
  assert sharding.mesh_shape({"data": 1, "fsdp": -1, "tensor": 1}, 4) == (1, 4, 1)
  with pytest.raises(ValueError, match="uses 4 devices but 8"):
    sharding.mesh_shape({"data": 2, "fsdp": 2, "tensor": 1}, 8)
  with pytest.raises(ValueError, match="at most one axis may be -1"):
    sharding.mesh_shape({"data": -1, "fsdp": -1, "tensor": 1}, 8)
  with pytest.raises(ValueError, match="not divisible"):
    sharding.mesh_shape({"data": -1, "fsdp": 3, "tensor": 1}, 8)
  with pytest.raises(ValueError, match="unknown axes"):
    sharding.mesh_shape({"data": -1, "model": 1}, 8)


def test_rules_override_and_unknown_names():
  rules = dict(sharding.logical_rules({"embed": "tensor", "batch": "", "mlp": "data,fsdp"}))
  assert rules["embed"] == "tensor"
  assert rules["batch"] is None
  assert rules["mlp"] == ("data", "fsdp")
  assert rules["heads"] == "tensor"  # untouched default
  with pytest.raises(ValueError, match="unknown logical axis"):
    sharding.logical_rules({"embedding": "fsdp"})
  with pytest.raises(ValueError, match="mesh axis 'model'"):
    sharding.logical_rules({"embed": "model"})


def test_config_rules_round_trip_to_default_table():
  assert sharding.logical_rules(sharding.default_rules_config()) == sharding.DEFAULT_RULES


def test_fit_spec_drops_axes_that_do_not_divide():
  mesh = jax.sharding.AbstractMesh((2, 1, 4), sharding.MESH_AXES)
  # 2 kv-heads cannot split 4 ways -> replicated; 8 divides.
  assert sharding._fit_spec(P("fsdp", "tensor", None), (16, 2, 8), mesh) == P("fsdp", None, None)
  assert sharding._fit_spec(
    P(
      ("data", "tensor"),
    ),
    (8,),
    mesh,
  ) == P(("data", "tensor"))
  assert sharding._fit_spec(
    P(
      ("data", "tensor"),
    ),
    (6,),
    mesh,
  ) == P("data")


def test_batch_sharding_spec():
  mesh = sharding.create_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  assert sharding.batch_sharding(mesh, sharding.logical_rules(), 8).spec == P(
    ("data", "fsdp"), None
  )


def _run_in_subprocess(tmp_path, overrides, num_steps, devices):
  out = str(tmp_path / f"run_{devices}.npz")
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
  env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
  args = json.dumps({"overrides": overrides, "num_steps": num_steps, "out": out})
  proc = subprocess.run(
    [sys.executable, HELPER, args], env=env, capture_output=True, text=True, timeout=240
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  with open(out + ".json") as f:
    info = json.load(f)
  with np.load(out) as z:
    return {k: z[k] for k in z.files}, info


def test_sharded_train_steps_match_single_device(tmp_path):
  steps = 3
  single = train_helpers.run_steps(train_helpers.load_config("tiny"), steps)
  assert single["num_devices"] == 1
  arrays, info = _run_in_subprocess(
    tmp_path, {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}, steps, devices=8
  )
  assert info["num_devices"] == 8
  # On 8 devices (data x fsdp = 4 batch shards): a batch of 9 is refused, naming the shards.
  assert "batch size 9 is not divisible by the 4 batch shards" in info["indivisible_error"]
  # host_to_global: every device holds exactly its rows of the host array, 4 distinct row blocks.
  assert info["host_to_global_shards_right"] and info["host_to_global_equal"]
  assert info["num_shards"] == 4
  # The layout is really split: attention and MLP matrices are sharded over fsdp/tensor.
  assert any("mlp" in k or "attention" in k for k in info["sharded"]), info["sharded"]
  np.testing.assert_allclose(arrays["losses"], single["losses"], rtol=2e-5)
  for name, value in single["params"].items():
    np.testing.assert_allclose(arrays["param:" + name], value, rtol=1e-4, atol=2e-6, err_msg=name)
