"""The forward (noising) process and conversions between prediction types.

x_t = alpha_t * x0 + sigma_t * eps, alpha_t^2 + sigma_t^2 = 1, eps ~ N(0, I).
A denoiser predicts one of
  'eps': the noise eps,
  'x0':  the clean data x0,
  'v':   v = alpha_t * eps - sigma_t * x0   (Salimans & Ho, 2022).
Given x_t, any one of (eps, x0, v) determines the other two, since each is affine in x_t
and the prediction.

All per-example scalars (t, logsnr) have shape [B] and broadcast over the other dims.
"""
import jax
import jax.numpy as jnp

from imagen_jax.diffusion.schedules import alpha_sigma, get_schedule

PREDICTIONS = ("eps", "v", "x0")


def check_prediction(prediction: str) -> None:
  if prediction not in PREDICTIONS:
    raise ValueError(f"Unknown prediction {prediction!r}; choose one of {PREDICTIONS}.")


def broadcast_per_example(per_example, like):
  """A per-example value [B] as [B, 1, ..., 1], float32, so it broadcasts against `like`."""
  per_example = jnp.asarray(per_example, jnp.float32)
  return per_example.reshape(per_example.shape + (1,) * (like.ndim - per_example.ndim))


def per_example_keys(rng, batch: int):
  """One PRNG key per example: `rng` is a single key (split into `batch` keys) or [batch] keys.

  Drawing each example's randomness from its own key makes a batch reproduce, example by
  example, the same computation run on smaller batches with the matching keys.
  Accepts typed keys (jax.random.key) and raw uint32 keys (jax.random.PRNGKey).
  """
  typed = jnp.issubdtype(rng.dtype, jax.dtypes.prng_key)
  if rng.ndim == (0 if typed else 1):
    return jax.random.split(rng, batch)
  if rng.shape[0] != batch:
    raise ValueError(f"Got {rng.shape[0]} per-example keys for a batch of {batch}.")
  return rng


def normal_per_example(keys, shape, salt: int = 0):
  """Standard normal noise of `shape` = [B, ...], example b drawn from fold_in(keys[b], salt)."""
  draw = lambda k: jax.random.normal(jax.random.fold_in(k, salt), shape[1:], jnp.float32)
  return jax.vmap(draw)(keys)


def q_sample(x0, t, noise, schedule):
  """x_t = alpha_t * x0 + sigma_t * noise, with t [B] in [0, 1]."""
  alpha, sigma = get_schedule(schedule).alpha_sigma(t)
  return broadcast_per_example(alpha, x0) * x0 + broadcast_per_example(sigma, x0) * noise


def to_x0_eps(x_t, pred, logsnr, prediction: str):
  """(x0, eps) implied by a prediction of type `prediction` at x_t with log-SNR `logsnr`."""
  check_prediction(prediction)
  alpha, sigma = (broadcast_per_example(a, x_t) for a in alpha_sigma(logsnr))
  pred = pred.astype(jnp.float32)
  if prediction == "eps":
    return (x_t - sigma * pred) / alpha, pred
  if prediction == "x0":
    return pred, (x_t - alpha * pred) / sigma
  # v: alpha * x_t - sigma * v = x0 and sigma * x_t + alpha * v = eps, using alpha^2 + sigma^2 = 1.
  return alpha * x_t - sigma * pred, sigma * x_t + alpha * pred


def eps_from_x0(x_t, x0, logsnr):
  """The eps consistent with x_t and a (possibly thresholded) x0."""
  alpha, sigma = (broadcast_per_example(a, x_t) for a in alpha_sigma(logsnr))
  return (x_t - alpha * x0) / sigma


def prediction_target(x0, eps, logsnr, prediction: str):
  """What a `prediction`-type denoiser should output for x_t = alpha * x0 + sigma * eps."""
  check_prediction(prediction)
  if prediction == "eps":
    return eps
  if prediction == "x0":
    return x0
  alpha, sigma = (broadcast_per_example(a, x0) for a in alpha_sigma(logsnr))
  return alpha * eps - sigma * x0


def q_posterior(x_t, x0, logsnr_t, logsnr_s):
  """Mean and variance of q(x_s | x_t, x0) for s < t (logsnr_s > logsnr_t).

  Log-SNR form (Kingma et al., 2021, eq. 33): with c = 1 - SNR_t / SNR_s,
    mean = alpha_s * (x_t * (1 - c) / alpha_t + c * x0),   variance = c * sigma_s^2.
  """
  alpha_t, _ = alpha_sigma(logsnr_t)
  alpha_s, sigma_s = alpha_sigma(logsnr_s)
  # expm1 keeps c accurate for tiny steps; exp keeps 1 - c accurate when c is close to 1.
  c = -jnp.expm1(logsnr_t - logsnr_s)
  one_minus_c = jnp.exp(logsnr_t - logsnr_s)
  coef_xt, coef_x0 = alpha_s * one_minus_c / alpha_t, alpha_s * c
  mean = broadcast_per_example(coef_xt, x_t) * x_t + broadcast_per_example(coef_x0, x_t) * x0
  return mean, broadcast_per_example(c * sigma_s**2, x_t)
