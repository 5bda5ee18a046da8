"""Sampling one stage of the cascade: a U-Net, its diffusion settings, one compiled loop."""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax

from imagen_jax import diffusion


@dataclasses.dataclass(frozen=True)
class SampleSettings:
  sampler: str = "ddim"          # ddim | ddpm | dpm++2m | heun (diffusion.SAMPLERS)
  time_grid: str = "uniform_t"   # uniform_t | uniform_logsnr (diffusion.TIME_GRIDS)
  steps: int = 50
  guidance_weight: float = 3.0   # 1.0 = plain conditional; eps_u + w (eps_c - eps_u)
  thresholding: str = "static"   # none | static | dynamic
  percentile: float = 99.5       # dynamic thresholding percentile of |x0|, per sample
  eta: float = 0.0               # DDIM stochasticity (0 for the other samplers)
  lowres_aug_t: float = 0.1      # SR stages: noise level of the conditioning image, as time t


def make_stage_sampler(unet: nn.Module, settings: SampleSettings, *, schedule: str,
                       prediction: str, resolution: int, lowres_resolution: int,
                       resample_steps: int = 1):
  """Returns a jitted fn(params, rng, text, text_mask, lowres, known, mask) -> images in [-1, 1].

  `lowres` is the previous stage's output (float, [-1, 1]) for SR stages and None for the
  base stage. The whole reverse process, guidance included, is one compiled call.
  Inpainting: `known` (float [B, R, R, 3] in [-1, 1], at this stage's resolution) and
  `mask` ([B, R, R, 1], 1 = keep known, 0 = generate) make the stage keep `known` where
  mask is 1 (`diffusion.sample`'s known=; resample_steps: RePaint resampling). With
  known=None (the default) sampling is exactly what it is without these arguments.
  """
  sched = diffusion.get_schedule(schedule)

  @jax.jit
  def run(params, rng, text, text_mask, lowres=None, known=None, mask=None):
    aug_rng, sample_rng = jax.random.split(rng)
    cond = {"text": text, "text_mask": text_mask}
    if lowres_resolution:
      if lowres is None:
        raise ValueError("This is a super-resolution stage: pass the low-resolution images.")
      lowres, aug_t = diffusion.augment_lowres(lowres, aug_rng, sched,
                                               aug_t=settings.lowres_aug_t)
      cond.update(lowres=lowres, lowres_aug_t=aug_t)
    if (known is None) != (mask is None):
      raise ValueError("Inpainting needs both `known` and `mask`.")

    def denoise_fn(x_t, t, c):
      return unet.apply({"params": params}, x_t, t, c, train=False)

    shape = (text.shape[0], resolution, resolution, 3)
    editing = {} if known is None else dict(known=(known, mask), resample_steps=resample_steps)
    return diffusion.sample(
        denoise_fn, sample_rng, shape, cond, schedule=sched, prediction=prediction,
        sampler=settings.sampler, steps=settings.steps, time_grid=settings.time_grid,
        guidance_weight=settings.guidance_weight, thresholding=settings.thresholding,
        percentile=settings.percentile, eta=settings.eta, **editing)

  return run
