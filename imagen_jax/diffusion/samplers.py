"""Ancestral (DDPM) and DDIM samplers on a uniform time grid from t = 1 to t = 0.

Each sampler is one `jax.lax.fori_loop`, so a jitted call compiles the denoiser once.
Callers jit the whole call, with sampler / steps / prediction / thresholding / eta /
schedule static; guidance_weight may be a Python float (w == 1 skips the uncond half)
or a traced scalar.

Randomness: example b draws everything from its own key keys[b] (`rng` is one key, split
into B keys, or B keys): the initial noise from fold_in(keys[b], 0), the noise of step i
from fold_in(keys[b], i + 1). So sample(keys) row b equals sample(keys[b:b+1]) whenever the
denoiser treats examples independently.
"""
import jax
import jax.numpy as jnp

from imagen_jax.diffusion import process
from imagen_jax.diffusion.guidance import guided_denoiser
from imagen_jax.diffusion.schedules import alpha_sigma, get_schedule
from imagen_jax.diffusion.thresholding import apply_threshold

SAMPLERS = ("ddim", "ddpm")


def _ddpm_step(x_t, x0, eps, logsnr_t, logsnr_s, noise, eta):
  """x_s ~ q(x_s | x_t, x0_hat), the true posterior with the predicted x0."""
  del eps, eta  # x0 and x_t determine the posterior
  mean, var = process.q_posterior(x_t, x0, logsnr_t, logsnr_s)
  return mean + jnp.sqrt(var) * noise


def _ddim_step(x_t, x0, eps, logsnr_t, logsnr_s, noise, eta):
  """x_s = alpha_s x0 + sqrt(sigma_s^2 - v) eps + sqrt(v) z, v = eta^2 * posterior variance.

  eta = 0 is deterministic DDIM; eta = 1 is the DDPM posterior step (Song et al., 2021).
  """
  del x_t
  alpha_s, sigma_s = (process.broadcast_per_example(a, x0) for a in alpha_sigma(logsnr_s))
  x_s = alpha_s * x0
  if eta == 0:
    return x_s + sigma_s * eps
  var = eta**2 * process.broadcast_per_example(-jnp.expm1(logsnr_t - logsnr_s), x0) * sigma_s**2
  return x_s + jnp.sqrt(jnp.maximum(sigma_s**2 - var, 0.0)) * eps + jnp.sqrt(var) * noise


_STEPS = {"ddpm": _ddpm_step, "ddim": _ddim_step}


def sample(denoise_fn, rng, shape, cond, *, schedule, prediction: str, sampler: str = "ddim",
           steps: int = 50, guidance_weight=1.0, thresholding: str = "static",
           percentile: float = 99.5, eta: float = 0.0, clip_final: bool = True):
  """Draws x0 of `shape` = [B, ...] (float32, in [-1, 1] with clip_final) by reverse diffusion.

  Per step t -> s: guided prediction -> (x0, eps) -> threshold x0 -> eps recomputed from
  (x_t, x0) so the step stays consistent -> sampler step. The last step (s = 0) returns
  the thresholded x0 prediction itself: t = 0 means clean data.
  """
  if sampler not in SAMPLERS:
    raise ValueError(f"Unknown sampler {sampler!r}; choose one of {SAMPLERS}.")
  if steps < 1:
    raise ValueError(f"steps must be >= 1, got {steps}.")
  process.check_prediction(prediction)
  schedule = get_schedule(schedule)
  batch = shape[0]
  keys = process.per_example_keys(rng, batch)
  guided = guided_denoiser(denoise_fn, guidance_weight)
  step_fn = _STEPS[sampler]
  needs_noise = sampler == "ddpm" or eta != 0
  times = jnp.linspace(1.0, 0.0, steps + 1, dtype=jnp.float32)

  def body(i, x_t):
    t, s = times[i], times[i + 1]
    logsnr_t = jnp.full((batch,), schedule.logsnr(t))
    logsnr_s = jnp.full((batch,), schedule.logsnr(s))
    pred = guided(x_t, jnp.full((batch,), t), cond)
    x0, eps = process.to_x0_eps(x_t, pred, logsnr_t, prediction)
    if thresholding != "none":
      x0 = apply_threshold(x0, thresholding, percentile)
      eps = process.eps_from_x0(x_t, x0, logsnr_t)
    noise = process.normal_per_example(keys, shape, salt=i + 1) if needs_noise else None
    x_s = step_fn(x_t, x0, eps, logsnr_t, logsnr_s, noise, eta)
    return jnp.where(i == steps - 1, x0, x_s)

  x = jax.lax.fori_loop(0, steps, body, process.normal_per_example(keys, shape, salt=0))
  return jnp.clip(x, -1.0, 1.0) if clip_final else x
