"""The training loss: plain MSE on the denoiser's prediction target, in float32."""
import jax
import jax.numpy as jnp

from imagen_jax.diffusion import process
from imagen_jax.diffusion.schedules import get_schedule


def sample_times(rng, batch: int, low_discrepancy: bool = True):
  """t ~ U(0, 1) per example.

  Low-discrepancy (Kingma et al., 2021): t_i = (u + i / B) mod 1 with one u ~ U(0, 1).
  Each t_i is still U(0, 1), so the loss stays unbiased, but the batch covers [0, 1]
  evenly, which lowers the variance of the batch-mean loss.
  """
  if not low_discrepancy:
    return jax.random.uniform(rng, (batch,), jnp.float32)
  u = jax.random.uniform(rng, (), jnp.float32)
  return jnp.mod(u + jnp.arange(batch, dtype=jnp.float32) / batch, 1.0)


def drop_text(cond, rng, drop_prob: float):
  """Classifier-free guidance training: each row's text_mask becomes all False with prob drop_prob.

  Returns (cond, dropped [B] bool). Only text_mask changes (see the cond contract).
  """
  batch = cond["text_mask"].shape[0]
  dropped = jax.random.uniform(rng, (batch,)) < drop_prob
  cond = dict(cond, text_mask=cond["text_mask"] & ~dropped[:, None])
  return cond, dropped


def diffusion_loss(denoise_fn, x0, cond, rng, *, schedule, prediction: str,
                   cond_drop_prob: float = 0.1, low_discrepancy: bool = True):
  """Mean squared error between denoise_fn(x_t, t, cond) and the target of `prediction`.

  x0: clean images [B, H, W, C] in [-1, 1]. cond: the conditioning dict (for SR stages
  already holding the noise-augmented `lowres` and `lowres_aug_t`). Text dropout is
  skipped when cond has no `text_mask` or cond_drop_prob == 0.
  Returns (scalar float32 loss, metrics dict).
  """
  process.check_prediction(prediction)
  schedule = get_schedule(schedule)
  x0 = x0.astype(jnp.float32)
  t_rng, noise_rng, drop_rng = jax.random.split(rng, 3)
  t = sample_times(t_rng, x0.shape[0], low_discrepancy)
  noise = jax.random.normal(noise_rng, x0.shape, jnp.float32)
  x_t = process.q_sample(x0, t, noise, schedule)

  metrics = {}
  if "text_mask" in cond and cond_drop_prob > 0:
    cond, dropped = drop_text(cond, drop_rng, cond_drop_prob)
    metrics["text_drop_frac"] = jnp.mean(dropped.astype(jnp.float32))

  pred = denoise_fn(x_t, t, cond).astype(jnp.float32)
  target = process.prediction_target(x0, noise, schedule.logsnr(t), prediction)
  loss = jnp.mean(jnp.square(pred - target))
  metrics["loss"] = loss
  return loss, metrics
