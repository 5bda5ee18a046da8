"""Continuous-time Gaussian diffusion on log-SNR: schedules, forward process, loss,
classifier-free guidance, thresholding, noise-conditioning augmentation, time grids, samplers,
and inpainting inside the samplers (`editing`).

Knows a denoiser only as `denoise_fn(x_t, t, cond) -> prediction` (see the cond contract).
"""
from imagen_jax.diffusion.editing import Inpainting, make_plan
from imagen_jax.diffusion.guidance import guided_denoiser
from imagen_jax.diffusion.losses import diffusion_loss, drop_text, sample_times
from imagen_jax.diffusion.noise_aug import augment_lowres
from imagen_jax.diffusion.process import (PREDICTIONS, eps_from_x0, normal_per_example,
                                          per_example_keys, prediction_target, q_posterior,
                                          q_sample, to_x0_eps)
from imagen_jax.diffusion.samplers import CALLS, SAMPLERS, sample
from imagen_jax.diffusion.schedules import (Schedule, alpha_sigma, cosine_logsnr, get_schedule,
                                            linear_logsnr)
from imagen_jax.diffusion.thresholding import (THRESHOLD_MODES, apply_threshold,
                                               dynamic_threshold, static_threshold)
from imagen_jax.diffusion.time_grids import TIME_GRIDS, time_grid
