"""ea_jax: expressive attention (EA) vs dot-product attention (DPA) in JAX/Flax.

Import submodules explicitly (``from ea_jax import attention``); this package
file stays light so that ``ea_jax.attention`` and ``ea_jax.kernels`` import with
nothing but jax and numpy installed.
"""

__version__ = "0.1.0"
