"""One training step of one cascade stage: text -> noise -> U-Net -> loss -> update."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from imagen_jax import diffusion
from imagen_jax.train.state import TrainState, ema_update


@dataclasses.dataclass(frozen=True)
class DiffusionSettings:
  schedule: str = "cosine"
  prediction: str = "v"
  cond_drop_prob: float = 0.1
  max_lowres_aug_t: float = 0.5


def images_to_float(images: jax.Array) -> jax.Array:
  """uint8 [0, 255] -> float32 [-1, 1]."""
  return images.astype(jnp.float32) / 127.5 - 1.0


def float_to_images(x: jax.Array) -> jax.Array:
  return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def downsample(x: jax.Array, resolution: int) -> jax.Array:
  """Anti-aliased resize of NHWC float images to resolution x resolution."""
  batch, _, _, channels = x.shape
  return jax.image.resize(x, (batch, resolution, resolution, channels), "linear", antialias=True)


def text_features(text_encoder: nn.Module, text_params, tokens: jax.Array):
  """Frozen T5 features and mask for padded token ids (pad id 0).

  Padded positions are zero (the U-Nets mask them, so this changes no output), which makes
  them equal to precomputed embeddings re-padded by the input pipeline.
  """
  mask = tokens > 0
  text = text_encoder.apply({"params": text_params}, tokens, mask)
  text = jnp.where(mask[..., None], text.astype(jnp.float32), 0.0)
  return jax.lax.stop_gradient(text), mask


def batch_text(batch, text_encoder: nn.Module | None, text_params):
  """(text [B, L, D] float32, mask [B, L]) of a training batch: its precomputed
  "text_embedding" + "text_mask" (stored as bfloat16 / float16 / float32; the encoder is
  not run), else the frozen encoder applied to its "text_tokens"."""
  if "text_embedding" in batch:
    text = batch["text_embedding"].astype(jnp.float32)
    return jax.lax.stop_gradient(text), batch["text_mask"].astype(bool)
  if text_encoder is None:
    raise ValueError("The batch has text_tokens, not text embeddings, but no text encoder "
                     "was given.")
  return text_features(text_encoder, text_params, batch["text_tokens"])


def random_crop_pair(x0: jax.Array, lowres: jax.Array, crop: int, rng: jax.Array):
  """The same random region of each high-res image x0 [B, R, R, C] and of its low-res copy
  lowres [B, r, r, C]: crop x crop high-res pixels at offsets that are multiples of R / r,
  and the (crop r / R)^2 low-res pixels they were downsampled to (per example offsets).

  Fully convolutional SR training (the paper's 256->1024 model trains on 64->256 crops).
  """
  batch, res = x0.shape[0], x0.shape[1]
  factor = res // lowres.shape[1]
  lcrop = crop // factor
  offsets = jax.random.randint(rng, (batch, 2), 0, lowres.shape[1] - lcrop + 1)

  def one(x, low, offset):
    hi = jax.lax.dynamic_slice(x, (offset[0] * factor, offset[1] * factor, 0),
                               (crop, crop, x.shape[-1]))
    lo = jax.lax.dynamic_slice(low, (offset[0], offset[1], 0), (lcrop, lcrop, low.shape[-1]))
    return hi, lo

  return jax.vmap(one)(x0, lowres, offsets)


def make_conditioning(x0, text, text_mask, rng, *, lowres_resolution: int, schedule,
                      max_lowres_aug_t: float, lowres_aug_t: float | None = None,
                      lowres: jax.Array | None = None):
  """The `cond` dict of a stage; SR stages get a noise-augmented low-res copy of x0
  (`lowres`, if given, is that copy already made, e.g. the matching crop)."""
  cond = {"text": text, "text_mask": text_mask}
  if lowres_resolution:
    if lowres is None:
      lowres = downsample(x0, lowres_resolution)
    if lowres_aug_t is None:
      lowres, aug_t = diffusion.augment_lowres(lowres, rng, schedule, max_aug_t=max_lowres_aug_t)
    else:
      lowres, aug_t = diffusion.augment_lowres(lowres, rng, schedule, aug_t=lowres_aug_t)
    cond.update(lowres=lowres, lowres_aug_t=aug_t)
  return cond


def keep_if_finite(finite: jax.Array, new, old):
  """`new` where `finite`, else `old`, leaf by leaf (a select, not arithmetic: bit exact)."""
  return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)


def make_train_step(unet: nn.Module, text_encoder: nn.Module, settings: DiffusionSettings,
                    optimizer: optax.GradientTransformation, *, ema_decay: float,
                    lowres_resolution: int,
                    train_crop: int = 0) -> Callable[..., tuple[TrainState, dict[str, Any]]]:
  """Returns train_step(state, batch, text_params) -> (state, metrics); jit it with shardings.

  train_crop > 0 (SR stages): train on random train_crop x train_crop crops of the images
  and the matching regions of their low-res copies (`random_crop_pair`).
  A batch holds "image" and either "text_tokens" (encoded in the step by the frozen
  text_encoder) or precomputed "text_embedding" + "text_mask" (`batch_text`: the encoder
  is skipped and text_params may be None).
  """
  schedule = diffusion.get_schedule(settings.schedule)

  def train_step(state: TrainState, batch, text_params):
    rng = jax.random.fold_in(state.rng, state.step)
    loss_rng, aug_rng, dropout_rng = jax.random.split(rng, 3)
    text, text_mask = batch_text(batch, text_encoder, text_params)
    x0 = images_to_float(batch["image"])
    lowres = None
    if train_crop and train_crop < x0.shape[1]:
      # Its own stream (fold_in), so that the other draws are those of an uncropped run.
      crop_rng = jax.random.fold_in(rng, 1)
      x0, lowres = random_crop_pair(x0, downsample(x0, lowres_resolution), train_crop, crop_rng)
    cond = make_conditioning(x0, text, text_mask, aug_rng, lowres_resolution=lowres_resolution,
                             schedule=schedule, max_lowres_aug_t=settings.max_lowres_aug_t,
                             lowres=lowres)

    def loss_fn(params):
      def denoise_fn(x_t, t, c):
        return unet.apply({"params": params}, x_t, t, c, train=True, rngs={"dropout": dropout_rng})
      return diffusion.diffusion_loss(denoise_fn, x0, cond, loss_rng, schedule=schedule,
                                      prediction=settings.prediction,
                                      cond_drop_prob=settings.cond_drop_prob)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # EMA warm-up (as tf.train.ExponentialMovingAverage with num_updates): early averages
    # don't drag the random init along, which matters for short runs.
    step = state.step.astype(jnp.float32)
    decay = jnp.minimum(ema_decay, (1.0 + step) / (10.0 + step))
    ema_params = ema_update(state.ema_params, params, decay)
    # A NaN or Inf in the loss or any gradient (the norm catches every element) must reach
    # neither the params, nor Adam's moments, nor the EMA: keep them all and count the skip.
    # The step still advances: the batch is consumed, so the data stream stays in step.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    params, opt_state, ema_params = keep_if_finite(
        finite, (params, opt_state, ema_params), (state.params, state.opt_state, state.ema_params))
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              ema_params=ema_params,
                              skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32))
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm, param_norm=optax.tree.norm(params),
                   nonfinite=~finite, skipped_steps=new_state.skipped_steps)
    return new_state, metrics

  return train_step
