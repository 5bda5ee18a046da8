"""Samplers: DDPM ancestral, DDIM (with eta), DPM-Solver++ (2M) and EDM-style Heun.

All run on the same log-SNR formulation over a time grid from t = 1 to t = 0
(`time_grids`: uniform in t by default, or uniform in log-SNR), and each is one
`jax.lax.fori_loop` whose body calls the denoiser once, so a jitted call compiles the
denoiser once. Callers jit the whole call, with sampler / steps / prediction /
thresholding / eta / schedule / time_grid static; guidance_weight may be a Python float
(w == 1 skips the uncond half) or a traced scalar.

Every denoiser call goes through the same path: guided prediction (cond and uncond in one
batched call) -> (x0, eps) -> x0 thresholded per sample -> eps recomputed from (x_t, x0),
so guidance comes before thresholding and every solver only ever sees thresholded x0.

Randomness: example b draws everything from its own key keys[b] (`rng` is one key, split
into B keys, or B keys): the initial noise from fold_in(keys[b], 0), the noise of step i
from fold_in(keys[b], i + 1) (DDPM and DDIM with eta > 0; the other samplers are
deterministic given the initial noise). So sample(keys) row b equals
sample(keys[b:b+1]) whenever the denoiser treats examples independently.

Inpainting (`known=(x0_known, mask)`, module `editing`) is a hook in these same loops, not
a copy of them: before each denoiser call the kept region of the state is replaced by a
forward sample of the known image, and with RePaint resampling a plan of calls repeats
each step (the noise of DDPM / DDIM then comes from fold_in(keys[b], j + 1) for call j).
"""
import jax
import jax.numpy as jnp

from imagen_jax.diffusion import editing, ode_solvers, process, time_grids
from imagen_jax.diffusion.guidance import guided_denoiser
from imagen_jax.diffusion.schedules import alpha_sigma, get_schedule
from imagen_jax.diffusion.thresholding import THRESHOLD_MODES, apply_threshold

SAMPLERS = ("ddim", "ddpm", "dpm++2m", "heun")
# Denoiser calls per sample for `steps` grid steps.
CALLS = {"ddim": lambda steps: steps, "ddpm": lambda steps: steps,
         "dpm++2m": lambda steps: steps, "heun": ode_solvers.heun_calls}


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


def _ancestral(step_fn, x0_eps, x_init, times, logsnrs, steps, noise_fn, eta, *, edit=None):
  """DDPM / DDIM: step i maps x_{t_i} to x_{t_{i+1}}; the last step returns x0 itself.

  edit: None, or an `editing.Inpainting` whose plan drives the loop (call j does step
  plan.step[j]; the kept region is replaced before the call, a jump back may follow it).
  """
  def body(j, x_t):
    i = j if edit is None else edit.step[j]
    if edit is not None:
      x_t = edit.replace(x_t, i, j)
    x0, eps = x0_eps(x_t, times[i], logsnrs[i])
    batch = x_t.shape[0]
    logsnr_t, logsnr_s = (jnp.full((batch,), logsnrs[i + k]) for k in (0, 1))
    x_s = step_fn(x_t, x0, eps, logsnr_t, logsnr_s, noise_fn(j), eta)
    x_s = jnp.where(i == steps - 1, x0, x_s)
    return x_s if edit is None else edit.maybe_renoise(x_s, i, j)

  calls = steps if edit is None else edit.plan.calls
  return jax.lax.fori_loop(0, calls, body, x_init)


def _check_args(sampler, steps, prediction, thresholding, grid, eta):
  if sampler not in SAMPLERS:
    raise ValueError(f"Unknown sampler {sampler!r}; choose one of {SAMPLERS}.")
  if eta != 0 and sampler not in _STEPS:
    raise ValueError(f"eta={eta} is DDIM's stochasticity; sampler {sampler!r} is a "
                     "deterministic ODE solver: use sampler='ddim' or eta=0.")
  if steps < 1:
    raise ValueError(f"steps must be >= 1, got {steps}.")
  if grid not in time_grids.TIME_GRIDS:
    raise ValueError(f"Unknown time_grid {grid!r}; choose one of {time_grids.TIME_GRIDS}.")
  if thresholding not in THRESHOLD_MODES:
    raise ValueError(f"Unknown thresholding {thresholding!r}; choose one of {THRESHOLD_MODES}.")
  process.check_prediction(prediction)


def sample(denoise_fn, rng, shape, cond, *, schedule, prediction: str, sampler: str = "ddim",
           steps: int = 50, guidance_weight=1.0, thresholding: str = "static",
           percentile: float = 99.5, eta: float = 0.0, clip_final: bool = True,
           time_grid: str = "uniform_t", known=None, resample_steps: int = 1):
  """Draws x0 of `shape` = [B, ...] (float32, in [-1, 1] with clip_final) by reverse diffusion.

  sampler: 'ddpm' (ancestral), 'ddim' (eta = 0 deterministic, eta = 1 = DDPM), 'dpm++2m'
  or 'heun' (deterministic, 2nd order). `steps` is the number of grid steps; denoiser calls
  per sample are CALLS[sampler](steps) (steps, but 2 steps - 2 for heun). time_grid: see
  `time_grids`. The last step returns the thresholded x0 prediction itself (t = 0 means
  clean data).

  known: None, or (x0_known, mask) for inpainting (`editing`): each broadcastable to
  `shape`, mask 1 = keep x0_known, 0 = generate. Before every denoiser call the kept region
  of the state is replaced by a forward sample of x0_known at that time, and the output
  equals x0_known exactly where mask == 1. resample_steps (static, inpainting only): RePaint
  resampling, each grid step done that many times with a jump back in between; denoiser
  calls are CALLS[sampler](steps) * resample_steps. Works with every sampler, guidance and
  thresholding; known=None is plain sampling, unchanged.
  """
  _check_args(sampler, steps, prediction, thresholding, time_grid, eta)
  if known is None and resample_steps != 1:
    raise ValueError(f"resample_steps={resample_steps} is RePaint resampling for inpainting; "
                     "pass known=(x0_known, mask) or leave resample_steps=1.")
  schedule = get_schedule(schedule)
  batch = shape[0]
  keys = process.per_example_keys(rng, batch)
  guided = guided_denoiser(denoise_fn, guidance_weight)
  times, logsnrs = time_grids.time_grid(time_grid, steps, schedule)
  edit = None
  if known is not None:
    plan = editing.make_plan(sampler, steps, resample_steps)
    edit = editing.Inpainting(known, keys, logsnrs, shape, plan)

  def x0_eps(x_t, t, logsnr):
    """Guided prediction -> (x0, eps), x0 thresholded per sample, eps consistent with it."""
    logsnr = jnp.full((batch,), logsnr)
    pred = guided(x_t, jnp.full((batch,), t), cond)
    x0, eps = process.to_x0_eps(x_t, pred, logsnr, prediction)
    if thresholding != "none":
      x0 = apply_threshold(x0, thresholding, percentile)
      eps = process.eps_from_x0(x_t, x0, logsnr)
    return x0, eps

  x_init = process.normal_per_example(keys, shape, salt=0)
  if sampler in _STEPS:
    needs_noise = sampler == "ddpm" or eta != 0

    def noise_fn(j):
      """The noise of call j (= step j without resampling)."""
      return process.normal_per_example(keys, shape, salt=j + 1) if needs_noise else None

    x = _ancestral(_STEPS[sampler], x0_eps, x_init, times, logsnrs, steps, noise_fn, eta,
                   edit=edit)
  else:
    solver = {"dpm++2m": ode_solvers.dpmpp_2m, "heun": ode_solvers.heun}[sampler]
    x = solver(x0_eps, x_init, times, logsnrs, steps, edit=edit)
  x = jnp.clip(x, -1.0, 1.0) if clip_final else x
  return x if edit is None else edit.finish(x)
