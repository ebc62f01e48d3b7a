"""Tiny: the default config shrunk to seconds, for tests and smoke runs (accuracy not meaningful).

  python train.py --config=configs/tiny.py --workdir=/tmp/ea_tiny
  python eval.py  --config=configs/tiny.py --workdir=/tmp/ea_tiny

Expected result: finishes 8 steps in a few seconds; loss falls below log(vocab_size).
"""

from configs import default


def get_config(arg=None):
  c = default.get_config(arg)
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
