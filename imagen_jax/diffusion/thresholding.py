"""Thresholding of the predicted x0 during sampling (Imagen, section 2.3)."""
import jax.numpy as jnp

THRESHOLD_MODES = ("none", "static", "dynamic")


def static_threshold(x0):
  """Clip to the data range [-1, 1]."""
  return jnp.clip(x0, -1.0, 1.0)


def dynamic_threshold(x0, percentile: float = 99.5):
  """Per sample: s = percentile of |x0| over non-batch dims, s = max(s, 1), clip(x0, -s, s) / s.

  Saturated pixels are pushed inwards instead of clipped, which keeps detail at large
  guidance weights. s >= 1 leaves samples already inside [-1, 1] untouched.
  """
  x0 = x0.astype(jnp.float32)
  flat = jnp.abs(x0).reshape(x0.shape[0], -1)
  s = jnp.maximum(jnp.percentile(flat, percentile, axis=1), 1.0)  # linear interpolation
  s = s.reshape((-1,) + (1,) * (x0.ndim - 1))
  return jnp.clip(x0, -s, s) / s


def apply_threshold(x0, mode: str, percentile: float = 99.5):
  """mode: 'none' | 'static' | 'dynamic' (a static Python string)."""
  if mode == "none":
    return x0
  if mode == "static":
    return static_threshold(x0)
  if mode == "dynamic":
    return dynamic_threshold(x0, percentile)
  raise ValueError(f"Unknown thresholding {mode!r}; choose one of {THRESHOLD_MODES}.")
