"""Tiny: the default config shrunk to seconds, for tests and smoke runs (accuracy not meaningful).

  python train.py --config=configs/tiny.py --workdir=/tmp/ea_tiny
  python eval.py  --config=configs/tiny.py --workdir=/tmp/ea_tiny

Expected result: finishes 8 steps in a few seconds; loss falls below log(vocab_size).
"""
import importlib.util
import os


def _default():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default.py")
  spec = importlib.util.spec_from_file_location("ea_jax_configs_default", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg=None):
  c = _default().get_config(arg)
  c.model.num_layers = 1
  c.model.num_heads = 2
  c.model.num_kv_heads = 2
  c.model.embed_dim = 16
  c.model.mlp_dim = 32
  c.train.num_steps = 8
  c.train.batch_size = 8
  c.train.warmup_steps = 2
  c.train.log_every = 2
  c.train.eval_every = 4
  c.train.checkpoint_every = 4
  c.eval.num_examples = 24
  c.eval.batch_size = 8
  return c
