"""Classifier-free guidance (Ho & Salimans, 2021) as a wrapper around a denoiser.

Convention (Imagen paper): pred = pred_uncond + w * (pred_cond - pred_uncond); w = 1 is
the plain conditional model, w = 0 the unconditional one, w > 1 extrapolates.

Guiding in the model's output space (eps, v or x0) gives the same eps as guiding eps
itself: for fixed x_t and t, eps = a * x_t + b * pred with a, b depending only on t
('eps': a=0, b=1; 'x0': a=1/sigma, b=-alpha/sigma; 'v': a=sigma, b=alpha). The cond and
uncond halves share x_t and t, so the a * x_t terms cancel in (cond - uncond) and the
weights (1 - w) + w sum to 1: eps_u + w (eps_c - eps_u) = a x_t + b (pred_u + w (pred_c - pred_u)).
"""
import jax.numpy as jnp


def guided_denoiser(denoise_fn, guidance_weight):
  """A denoise_fn(x_t, t, cond) applying classifier-free guidance with weight `guidance_weight`.

  Cond and uncond run in ONE call on a doubled batch; the second half is the same input
  with `cond['text_mask']` all False (the contract's way of dropping the text) and every
  other cond entry duplicated. A Python weight of exactly 1 returns `denoise_fn` itself,
  skipping the uncond half; a traced weight always runs both halves, so a sweep over
  weights compiles once.
  """
  if isinstance(guidance_weight, (int, float)) and guidance_weight == 1:
    return denoise_fn

  def guided(x_t, t, cond):
    if "text_mask" not in cond:
      raise ValueError("Classifier-free guidance needs cond['text_mask'] to drop the text.")
    batch = x_t.shape[0]
    doubled = {k: jnp.concatenate([v, v]) for k, v in cond.items()}
    doubled["text_mask"] = jnp.concatenate([cond["text_mask"], jnp.zeros_like(cond["text_mask"])])
    pred = denoise_fn(jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t]), doubled)
    pred = pred.astype(jnp.float32)
    pred_cond, pred_uncond = pred[:batch], pred[batch:]
    return pred_uncond + guidance_weight * (pred_cond - pred_uncond)

  return guided
