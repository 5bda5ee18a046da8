"""Continuous-time noise schedules, written as log-SNR functions of t in [0, 1].

t = 0 is (almost) clean data, t = 1 is (almost) pure noise. A schedule maps t to
logsnr(t) = log(alpha_t^2 / sigma_t^2), decreasing in t, with the variance-preserving
alpha_t^2 + sigma_t^2 = 1. Formulas follow imagen-pytorch's `alpha_cosine_log_snr` and
`beta_linear_log_snr`, so checkpoints trained with either framework see the same noise
levels for the same t.
"""
import dataclasses
import math

import jax
import jax.numpy as jnp

# Clipping keeps alpha and sigma >= exp(-10) ~ 4.5e-5 in float32: the conversions
# x0 = (x_t - sigma * eps) / alpha and eps = (x_t - alpha * x0) / sigma never divide by
# zero, and sigmoid(+-20) is still exactly representable. Only the last ~3e-5 of the
# cosine schedule (which heads to -inf at t = 1) is affected.
LOGSNR_MIN = -20.0
LOGSNR_MAX = 20.0


def cosine_logsnr(t, s: float = 0.008):
  """Cosine schedule (Nichol & Dhariwal): alpha_t^2 = cos^2((t + s) / (1 + s) * pi / 2).

  logsnr = -log(cos(theta)^-2 - 1) = -log(tan(theta)^2); the tan form is the same value
  without the float32 cancellation of cos^-2 - 1 near t = 0.
  """
  theta = (jnp.asarray(t, jnp.float32) + s) / (1.0 + s) * (math.pi / 2)
  return -jnp.log(jnp.maximum(jnp.tan(theta) ** 2, 1e-20))


def linear_logsnr(t):
  """Continuous version of the DDPM linear beta schedule: -log(expm1(1e-4 + 10 t^2))."""
  t = jnp.asarray(t, jnp.float32)
  return -jnp.log(jnp.expm1(1e-4 + 10.0 * t**2))


def cosine_t_from_logsnr(logsnr, s: float = 0.008):
  """Inverse of `cosine_logsnr`: theta = atan(exp(-logsnr / 2))."""
  theta = jnp.arctan(jnp.exp(-0.5 * jnp.asarray(logsnr, jnp.float32)))
  return theta * (2 / math.pi) * (1.0 + s) - s


def linear_t_from_logsnr(logsnr):
  """Inverse of `linear_logsnr`: 1e-4 + 10 t^2 = log(1 + exp(-logsnr))."""
  t_sq = (jax.nn.softplus(-jnp.asarray(logsnr, jnp.float32)) - 1e-4) / 10.0
  return jnp.sqrt(jnp.maximum(t_sq, 0.0))


def alpha_sigma(logsnr):
  """(alpha, sigma) with alpha^2 = sigmoid(logsnr), sigma^2 = sigmoid(-logsnr)."""
  return jnp.sqrt(jax.nn.sigmoid(logsnr)), jnp.sqrt(jax.nn.sigmoid(-logsnr))


_LOGSNR_FNS = {"cosine": cosine_logsnr, "linear": linear_logsnr}
_INVERSE_FNS = {"cosine": cosine_t_from_logsnr, "linear": linear_t_from_logsnr}


@dataclasses.dataclass(frozen=True)
class Schedule:
  """A named log-SNR schedule, clipped to [logsnr_min, logsnr_max].

  Frozen and hashable, so it can be a static argument of a jitted function.
  """
  name: str = "cosine"
  logsnr_min: float = LOGSNR_MIN
  logsnr_max: float = LOGSNR_MAX

  def __post_init__(self):
    if self.name not in _LOGSNR_FNS:
      raise ValueError(f"Unknown schedule {self.name!r}; choose one of {sorted(_LOGSNR_FNS)}.")
    if not self.logsnr_min < self.logsnr_max:
      raise ValueError(f"Need logsnr_min < logsnr_max, got {self.logsnr_min}, {self.logsnr_max}.")

  def logsnr(self, t):
    return jnp.clip(_LOGSNR_FNS[self.name](t), self.logsnr_min, self.logsnr_max)

  __call__ = logsnr

  def t_from_logsnr(self, logsnr):
    """The t in [0, 1] with logsnr(t) = `logsnr` (the ends of the clipped range map to 0 / 1)."""
    return jnp.clip(_INVERSE_FNS[self.name](logsnr), 0.0, 1.0)

  def alpha_sigma(self, t):
    return alpha_sigma(self.logsnr(t))


def get_schedule(schedule) -> Schedule:
  """A `Schedule` from its name ('cosine' | 'linear'); a `Schedule` passes through."""
  return schedule if isinstance(schedule, Schedule) else Schedule(schedule)
