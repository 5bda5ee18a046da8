"""Test setup: 8 simulated CPU devices and a persistent compilation cache.

Both must be set before jax is imported anywhere, which is why they live here.
"""
import os

# Level 0 of XLA's CPU backend optimisation compiles ~4x faster; test shapes are tiny, so
# compile time, not run time, is what the suite spends.
os.environ.setdefault(
    "XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "imagen_jax_jit"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402  (after the environment is set)

jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
