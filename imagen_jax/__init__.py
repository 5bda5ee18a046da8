"""imagen-jax: Imagen (cascaded text-to-image diffusion) in JAX/Flax.

Entry points: `python -m imagen_jax.train` and `python -m imagen_jax.sample`.
"""
__version__ = "0.1.0"
