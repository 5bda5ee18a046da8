"""Noise-conditioning augmentation of the low-res image for super-resolution stages.

The low-res conditioning image is noised with the forward process of `schedule`, and the
level is given to the U-Net as `cond['lowres_aug_t']`. LEVELS ARE DIFFUSION TIMES t in
[0, 1] of that schedule (0 = clean, 1 = pure noise), not noise scales: with the cosine
schedule t = 0.1 / 0.2 / 0.3 means sigma ~ 0.17 / 0.32 / 0.46 and with the linear
schedule sigma ~ 0.31 / 0.57 / 0.77. Training draws t ~ U(0, max_aug_t) per example;
sampling passes a fixed level, the paper's 0.0 - 0.3 range.

Each example's randomness comes from its own key (see `process.per_example_keys`), so a
batch matches the same examples augmented one at a time with the matching keys.
"""
import jax
import jax.numpy as jnp

from imagen_jax.diffusion import process


def augment_lowres(lowres, rng, schedule, *, aug_t=None, max_aug_t: float = 1.0):
  """Returns (noised lowres [B, h, w, C] float32, aug_t [B] float32).

  aug_t: None to draw U(0, max_aug_t) per example (training), or a level (scalar or [B])
  to use as given (sampling). Examples with aug_t == 0 come back exactly unchanged.
  The result is not clipped: the U-Net sees the same distribution in training and sampling.
  """
  lowres = lowres.astype(jnp.float32)
  batch = lowres.shape[0]
  keys = process.per_example_keys(rng, batch)
  if aug_t is None:
    draw = lambda k: jax.random.uniform(jax.random.fold_in(k, 0), (), jnp.float32)
    aug_t = jax.vmap(draw)(keys) * max_aug_t
  else:
    aug_t = jnp.broadcast_to(jnp.asarray(aug_t, jnp.float32), (batch,))
  noise = process.normal_per_example(keys, lowres.shape, salt=1)
  noised = process.q_sample(lowres, aug_t, noise, schedule)
  # logsnr(0) is finite (alpha_0 < 1), so t = 0 would still noise a little; 0 means clean.
  clean = (aug_t == 0).reshape((batch,) + (1,) * (lowres.ndim - 1))
  return jnp.where(clean, lowres, noised), aug_t
