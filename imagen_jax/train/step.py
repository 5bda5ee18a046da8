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
  """Frozen T5 features and mask for padded token ids (pad id 0)."""
  mask = tokens > 0
  text = text_encoder.apply({"params": text_params}, tokens, mask)
  return jax.lax.stop_gradient(text.astype(jnp.float32)), mask


def make_conditioning(x0, text, text_mask, rng, *, lowres_resolution: int, schedule,
                      max_lowres_aug_t: float, lowres_aug_t: float | None = None):
  """The `cond` dict of a stage; SR stages get a noise-augmented low-res copy of x0."""
  cond = {"text": text, "text_mask": text_mask}
  if lowres_resolution:
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
                    lowres_resolution: int) -> Callable[..., tuple[TrainState, dict[str, Any]]]:
  """Returns train_step(state, batch, text_params) -> (state, metrics); jit it with shardings."""
  schedule = diffusion.get_schedule(settings.schedule)

  def train_step(state: TrainState, batch, text_params):
    rng = jax.random.fold_in(state.rng, state.step)
    loss_rng, aug_rng, dropout_rng = jax.random.split(rng, 3)
    text, text_mask = text_features(text_encoder, text_params, batch["text_tokens"])
    x0 = images_to_float(batch["image"])
    cond = make_conditioning(x0, text, text_mask, aug_rng, lowres_resolution=lowres_resolution,
                             schedule=schedule, max_lowres_aug_t=settings.max_lowres_aug_t)

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
