"""Pallas kernels for expressive attention (imports jax, numpy and the kernel names of
ea_jax.attention; import submodules explicitly).

  pallas_attention  expressive_attention_pallas(...): the entry point (validation, padding,
                    backend choice, custom_vjp); used by ea_jax.attention's implementation="pallas"
  pallas_gpu        Triton kernels: forward, dQ, dK/dV
  pallas_tpu        Mosaic kernels: forward, dQ, dK/dV (block-sparse causal grid)
  scores            f(s), f'(s) and the causal block arithmetic shared by both
  mesh_map          shard_map over batch/heads under an active device mesh
  config            KernelConfig, the static settings of one call
"""
