"""Tests of imagen_jax.diffusion against closed forms written out here, independently, and
against imagen-pytorch's own functions (skipped when it is not installed; see `imagen_pt`).
The samplers' Gaussian-data tests are in test_samplers.py."""
import functools
import importlib.util
import os
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax import diffusion as D

from fast_compile import compile_sampler


# ---------------------------------------------------------------------------------------
# Independent references.

def ref_cosine_logsnr(t, s=0.008):
  """imagen-pytorch's alpha_cosine_log_snr, in float64."""
  t = np.asarray(t, np.float64)
  return -np.log(np.maximum(np.cos((t + s) / (1 + s) * np.pi / 2) ** -2 - 1, 1e-20))


def ref_linear_logsnr(t):
  """imagen-pytorch's beta_linear_log_snr, in float64."""
  return -np.log(np.expm1(1e-4 + 10 * np.asarray(t, np.float64) ** 2))


def ref_alpha_sigma(logsnr):
  logsnr = np.asarray(logsnr, np.float64)
  return np.sqrt(1 / (1 + np.exp(-logsnr))), np.sqrt(1 / (1 + np.exp(logsnr)))


def optimal_denoiser(prediction, schedule, means, stds):
  """Bayes-optimal denoiser for x0 with independent coordinates, each an equal mixture of
  two Gaussians N(means[k][d], stds[k][d]^2), k = 0, 1 (equal components = Gaussian data).

  Given x_t = alpha x0 + sigma eps, component k has x_t ~ N(alpha m, alpha^2 s^2 + sigma^2),
  E[x0 | x_t, k] = m + alpha s^2 / var (x_t - alpha m), E[eps | x_t, k] = sigma / var (x_t - alpha m).
  """
  if len(means) == 1:
    means, stds = means * 2, stds * 2
  (m0, m1), (s0, s1) = (jnp.asarray(np.array(v), jnp.float32) for v in (means, stds))

  def denoise(x_t, t, cond):
    del cond
    logsnr = D.get_schedule(schedule)(t).reshape((-1,) + (1,) * (x_t.ndim - 1))
    alpha = jnp.sqrt(1 / (1 + jnp.exp(-logsnr)))
    sigma = jnp.sqrt(1 / (1 + jnp.exp(logsnr)))
    parts = []
    for m, s in ((m0, s0), (m1, s1)):
      var = alpha**2 * s**2 + sigma**2
      r = x_t - alpha * m
      parts.append((-0.5 * jnp.log(var) - 0.5 * r**2 / var,   # log-likelihood of x_t
                    m + alpha * s**2 / var * r, sigma / var * r))
    resp0 = jax.nn.sigmoid(parts[0][0] - parts[1][0])          # P(k = 0 | x_t)
    x0 = resp0 * parts[0][1] + (1 - resp0) * parts[1][1]
    eps = resp0 * parts[0][2] + (1 - resp0) * parts[1][2]
    return {"eps": eps, "x0": x0, "v": alpha * eps - sigma * x0}[prediction]

  return denoise


def masked_text_mean(cond):
  """Mean of the text embedding over unmasked tokens (0 when the row is dropped), [B]."""
  mask = cond["text_mask"][..., None].astype(jnp.float32)
  total = (cond["text"] * mask).sum((1, 2))
  return total / jnp.maximum(mask.sum((1, 2)) * cond["text"].shape[-1], 1.0)


def make_cond(rng, batch, length=5, width=3, with_lowres=False):
  k1, k2, k3 = jax.random.split(rng, 3)
  cond = {"text": jax.random.normal(k1, (batch, length, width)) + 1.0,
          "text_mask": jnp.arange(length)[None, :] < jax.random.randint(k2, (batch, 1), 1, length + 1)}
  if with_lowres:
    cond["lowres"] = jax.random.uniform(k3, (batch, 2, 2, 3), minval=-1, maxval=1)
    cond["lowres_aug_t"] = jnp.full((batch,), 0.2)
  return cond


# ---------------------------------------------------------------------------------------
# Schedules.

def test_schedules_match_closed_forms():
  t = np.linspace(0.0, 0.99, 100)
  np.testing.assert_allclose(D.cosine_logsnr(t), ref_cosine_logsnr(t), rtol=1e-4, atol=2e-3)
  np.testing.assert_allclose(D.linear_logsnr(t), ref_linear_logsnr(t), rtol=1e-4, atol=2e-3)
  cos, lin = D.get_schedule("cosine"), D.get_schedule("linear")
  # Endpoints: the closed forms at t = 0 and t = 1; cosine -> -inf at 1, so it hits the clip.
  np.testing.assert_allclose(cos(0.0), ref_cosine_logsnr(0.0), atol=2e-3)
  np.testing.assert_allclose(cos(0.0), 8.7693, atol=1e-3)
  np.testing.assert_allclose(lin(0.0), -np.log(np.expm1(1e-4)), atol=1e-3)
  np.testing.assert_allclose(lin(1.0), -np.log(np.expm1(10.0001)), atol=1e-3)
  assert float(cos(1.0)) == cos.logsnr_min == -20.0
  grid = jnp.linspace(0, 1, 1001)
  for sched in (cos, lin):
    values = sched(grid)
    assert np.all(np.diff(values) < 0), sched.name
    alpha, sigma = sched.alpha_sigma(grid)
    np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, atol=1e-6)
    ref_a, ref_s = ref_alpha_sigma(values)
    np.testing.assert_allclose(alpha, ref_a, atol=1e-6)
    np.testing.assert_allclose(sigma, ref_s, atol=1e-6)
  with pytest.raises(ValueError, match="Unknown schedule"):
    D.get_schedule("quadratic")


# ---------------------------------------------------------------------------------------
# Forward process and conversions.

def test_conversions_round_trip_against_closed_forms():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  x0 = jax.random.normal(k1, (16, 3, 3, 2))
  eps = jax.random.normal(k2, x0.shape)
  logsnr = jax.random.uniform(k3, (16,), minval=-10, maxval=10)
  a, s = ref_alpha_sigma(np.asarray(logsnr))
  a, s = a[:, None, None, None], s[:, None, None, None]
  x_t = a * np.asarray(x0, np.float64) + s * np.asarray(eps, np.float64)
  v = a * np.asarray(eps, np.float64) - s * np.asarray(x0, np.float64)
  x_t32 = jnp.asarray(x_t, jnp.float32)
  for prediction, pred in (("eps", eps), ("x0", x0), ("v", v)):
    got_x0, got_eps = D.to_x0_eps(x_t32, jnp.asarray(pred, jnp.float32), logsnr, prediction)
    np.testing.assert_allclose(got_x0, x0, atol=2e-4, err_msg=prediction)
    np.testing.assert_allclose(got_eps, eps, atol=2e-4, err_msg=prediction)
    np.testing.assert_allclose(D.prediction_target(x0, eps, logsnr, prediction), pred,
                               atol=1e-5, err_msg=prediction)
  np.testing.assert_allclose(D.eps_from_x0(x_t32, x0, logsnr), eps, atol=2e-4)
  t = jnp.linspace(0, 1, 16)
  a_t, s_t = ref_alpha_sigma(ref_cosine_logsnr(np.asarray(t).clip(0, 0.999)))
  expected = a_t[:, None, None, None] * x0 + s_t[:, None, None, None] * eps
  np.testing.assert_allclose(D.q_sample(x0[:15], t[:15], eps[:15], "cosine"), expected[:15],
                             atol=1e-4)
  with pytest.raises(ValueError, match="Unknown prediction"):
    D.to_x0_eps(x_t32, x0, logsnr, "score")


def test_posterior_matches_kingma_form():
  """q(x_s | x_t, x0) with alpha_{t|s} = alpha_t / alpha_s, sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2:
  mean = alpha_{t|s} sigma_s^2 / sigma_t^2 x_t + alpha_s sigma_{t|s}^2 / sigma_t^2 x0,
  var = sigma_{t|s}^2 sigma_s^2 / sigma_t^2."""
  rng = np.random.default_rng(0)
  logsnr_t = rng.uniform(-8, 6, 32)
  logsnr_s = logsnr_t + rng.uniform(0.01, 4, 32)
  x_t, x0 = rng.normal(size=(32, 2, 1, 1)), rng.normal(size=(32, 2, 1, 1))
  a_t, s_t = ref_alpha_sigma(logsnr_t)
  a_s, s_s = ref_alpha_sigma(logsnr_s)
  a_ts = a_t / a_s
  s2_ts = s_t**2 - a_ts**2 * s_s**2
  col = lambda v: v[:, None, None, None]
  mean = col(a_ts * s_s**2 / s_t**2) * x_t + col(a_s * s2_ts / s_t**2) * x0
  var = s2_ts * s_s**2 / s_t**2
  got_mean, got_var = D.q_posterior(jnp.asarray(x_t, jnp.float32), jnp.asarray(x0, jnp.float32),
                                    jnp.asarray(logsnr_t, jnp.float32),
                                    jnp.asarray(logsnr_s, jnp.float32))
  np.testing.assert_allclose(got_mean, mean, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(got_var.reshape(-1), var, rtol=1e-3, atol=1e-7)


# ---------------------------------------------------------------------------------------
# Thresholding.

def test_dynamic_threshold_is_per_sample():
  x0 = jnp.array([[0.5, -1.5, 2.0, -3.0],    # |x| sorted 0.5 1.5 2 3
                  [0.2, -0.4, 0.9, 1.2],     # |x| sorted 0.2 0.4 0.9 1.2
                  [0.1, -0.9, 0.3, 0.5]]).reshape(3, 2, 2, 1)  # in range
  # 99.5th percentile with linear interpolation: position 0.995 * 3 = 2.985 between the
  # 3rd and 4th sorted values.
  s_a = 2.0 + 0.985 * (3.0 - 2.0)   # 2.985
  s_b = 0.9 + 0.985 * (1.2 - 0.9)   # 1.1955
  expected = np.array([[0.5 / s_a, -1.5 / s_a, 2.0 / s_a, -1.0],
                       [0.2 / s_b, -0.4 / s_b, 0.9 / s_b, 1.0],
                       [0.1, -0.9, 0.3, 0.5]])   # s = max(0.5 + ..., 1) = 1: untouched
  got = D.dynamic_threshold(x0, 99.5).reshape(3, 4)
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  np.testing.assert_array_equal(D.apply_threshold(x0, "dynamic", 99.5), got.reshape(x0.shape))
  np.testing.assert_array_equal(D.static_threshold(x0).reshape(3, 4)[0], [0.5, -1, 1, -1])
  np.testing.assert_array_equal(D.apply_threshold(x0, "none"), x0)


# ---------------------------------------------------------------------------------------
# Guidance.

def cond_dependent_denoiser(calls):
  def denoise(x_t, t, cond):
    calls.append(x_t.shape[0])
    bcast = lambda v: v.reshape((-1,) + (1,) * (x_t.ndim - 1))
    lowres = cond["lowres"].mean((1, 2, 3))
    return 0.5 * x_t + bcast(t) + bcast(masked_text_mean(cond)) + 0.1 * bcast(lowres)
  return denoise


def test_guidance_formula_and_single_batched_call():
  k1, k2 = jax.random.split(jax.random.key(1))
  cond = make_cond(k1, 4, with_lowres=True)
  x_t, t = jax.random.normal(k2, (4, 2, 2, 3)), jnp.linspace(0.1, 0.9, 4)
  calls = []
  fn = cond_dependent_denoiser(calls)
  uncond = dict(cond, text_mask=jnp.zeros_like(cond["text_mask"]))
  pred_c, pred_u = np.asarray(fn(x_t, t, cond)), np.asarray(fn(x_t, t, uncond))
  assert np.abs(pred_c - pred_u).min() > 1e-3  # the text matters
  calls.clear()

  assert D.guided_denoiser(fn, 1.0) is fn  # w = 1: plain conditional, no uncond half
  for w in (0.0, 3.0):
    got = D.guided_denoiser(fn, w)(x_t, t, cond)
    assert calls == [8]  # cond and uncond in one call on the doubled batch
    calls.clear()
    np.testing.assert_allclose(got, pred_u + w * (pred_c - pred_u), atol=1e-5)
  np.testing.assert_allclose(D.guided_denoiser(fn, 0.0)(x_t, t, cond), pred_u, atol=1e-6)
  # A traced weight works too (one compile for a sweep of weights).
  traced = jax.jit(lambda w: D.guided_denoiser(fn, w)(x_t, t, cond))(2.0)
  np.testing.assert_allclose(traced, pred_u + 2.0 * (pred_c - pred_u), atol=1e-5)


# ---------------------------------------------------------------------------------------
# Samplers.

GAUSS_MU = np.array([0.3, -0.5, 0.0, 0.2])
GAUSS_STD = np.array([0.5, 0.3, 0.8, 0.2])
# Coordinates 0-3 Gaussian (both "components" equal), coordinate 4 bimodal +-0.5, std 0.1.
MEANS = [np.append(GAUSS_MU, -0.5), np.append(GAUSS_MU, 0.5)]
STDS = [np.append(GAUSS_STD, 0.1)] * 2
NUM_SAMPLES = 20000


def exact_chain_std(sampler, steps, schedule_fn):
  """Std of the sampler's output for Gaussian data, by propagating mean/var through the
  (linear) chain exactly, with the Kingma et al. posterior written out again here."""
  ts = np.linspace(1, 0, steps + 1)
  var = np.ones_like(GAUSS_STD)   # x_1 ~ N(0, 1)
  for i in range(steps):
    l_t, l_s = np.clip(schedule_fn(ts[i]), -20, 20), np.clip(schedule_fn(ts[i + 1]), -20, 20)
    (a_t, s_t), (a_s, s_s) = ref_alpha_sigma(l_t), ref_alpha_sigma(l_s)
    gain = a_t * GAUSS_STD**2 / (a_t**2 * GAUSS_STD**2 + s_t**2)   # d x0_hat / d x_t
    if i == steps - 1:
      return np.sqrt(gain**2 * var)
    if sampler == "ddim":   # x_s = alpha_s x0_hat + sigma_s (x_t - alpha_t x0_hat) / sigma_t
      var = (s_s / s_t + (a_s - s_s * a_t / s_t) * gain) ** 2 * var
    else:
      a_ts, s2_ts = a_t / a_s, s_t**2 - (a_t / a_s) ** 2 * s_s**2
      coef_xt, coef_x0 = a_ts * s_s**2 / s_t**2, a_s * s2_ts / s_t**2
      var = (coef_xt + coef_x0 * gain) ** 2 * var + s2_ts * s_s**2 / s_t**2


@functools.lru_cache(maxsize=None)  # the few-steps test reuses the 200-step draws
def draw(sampler, prediction, steps, schedule="cosine", seed=0):
  fn = optimal_denoiser(prediction, schedule, MEANS, STDS)
  run = jax.jit(functools.partial(
      D.sample, fn, shape=(NUM_SAMPLES, 1, 1, 5), cond={}, schedule=schedule,
      prediction=prediction, sampler=sampler, steps=steps, thresholding="none",
      clip_final=False))
  key = jax.random.key(seed)
  compiled = compile_sampler(run, key, calls=D.make_plan(sampler, steps).calls)
  return np.asarray(compiled(key)).reshape(NUM_SAMPLES, 5)


@pytest.mark.parametrize("sampler,prediction,schedule", [
    ("ddpm", "eps", "cosine"), ("ddpm", "v", "linear"),
    ("ddim", "eps", "cosine"), ("ddim", "x0", "linear")])
def test_samplers_reproduce_data_distribution(sampler, prediction, schedule):
  ref = {"cosine": ref_cosine_logsnr, "linear": ref_linear_logsnr}[schedule]
  x = draw(sampler, prediction, 200, schedule)
  gauss, bimodal = x[:, :4], x[:, 4]
  # Means: statistical error <= 0.8 / sqrt(20000) = 0.006.
  np.testing.assert_allclose(gauss.mean(0), GAUSS_MU, atol=0.02)
  # Stds vs the exact discrete chain: statistical error ~ 1 / sqrt(2 * 20000) = 0.5 %.
  np.testing.assert_allclose(gauss.std(0), exact_chain_std(sampler, 200, ref), rtol=0.025)
  # ... and vs the data itself (200 steps leave a discretisation deficit of up to ~6 %).
  np.testing.assert_allclose(gauss.std(0), GAUSS_STD, rtol=0.1)
  # Bimodal coordinate: half the mass at each mode, each mode at +-0.5 with std ~0.1.
  assert abs(np.mean(bimodal > 0) - 0.5) < 0.02
  np.testing.assert_allclose(np.abs(bimodal).mean(), 0.5, atol=0.02)
  np.testing.assert_allclose(np.abs(bimodal).std(), 0.1, rtol=0.2)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_few_steps_are_worse_than_many(sampler):
  err = {}
  for steps in (5, 200):
    x = draw(sampler, "eps", steps, "cosine")[:, :4]
    err[steps] = np.abs(x.std(0) / GAUSS_STD - 1).max()
    np.testing.assert_allclose(x.std(0), exact_chain_std(sampler, steps, ref_cosine_logsnr),
                               rtol=0.025)
  assert err[5] > 0.3 and err[200] < 0.08 and err[5] > 4 * err[200], err


def test_static_thresholding_bounds_a_wild_denoiser():
  wild = lambda x_t, t, cond: 100.0 * x_t + 37.0
  for mode in ("static", "dynamic"):
    for sampler in ("ddpm", "ddim"):
      x = D.sample(wild, jax.random.key(0), (3, 4, 4, 3), {}, schedule="cosine",
                   prediction="eps", sampler=sampler, steps=4, thresholding=mode,
                   clip_final=False)
      assert x.dtype == jnp.float32 and np.all(np.isfinite(x))
      assert np.abs(x).max() <= 1.0 + 1e-6, (mode, sampler)


def test_batch_equals_one_by_one_with_per_example_keys():
  gauss = optimal_denoiser("eps", "cosine", [[0.9, -0.2, 0.0]], [[0.6, 0.5, 1.2]])
  fn = lambda x_t, t, cond: gauss(x_t, t, cond) + 0.3 * masked_text_mean(cond)[:, None, None, None]
  cond = make_cond(jax.random.key(3), 4)
  run = jax.jit(lambda rng, cond: D.sample(
      fn, rng, (cond["text"].shape[0], 2, 2, 3), cond, schedule="cosine", prediction="eps",
      sampler="ddpm", steps=10, guidance_weight=3.0, thresholding="dynamic"))
  rng = jax.random.key(7)
  batch = np.asarray(run(rng, cond))
  keys = jax.random.split(rng, 4)
  np.testing.assert_array_equal(run(keys, cond), batch)  # one key == its split into B keys
  for b in range(4):
    single = run(keys[b:b + 1], jax.tree.map(lambda v: v[b:b + 1], cond))
    np.testing.assert_allclose(single[0], batch[b], atol=1e-5)
  assert len({batch[b].tobytes() for b in range(4)}) == 4  # examples differ
  # Raw uint32 keys follow the same scheme.
  raw = jax.random.PRNGKey(0)
  np.testing.assert_array_equal(D.per_example_keys(raw, 4), jax.random.split(raw, 4))
  assert D.per_example_keys(jax.random.split(raw, 4), 4).shape == (4, 2)


def test_ddim_eta_one_is_ddpm_and_guidance_noop_without_text_effect():
  fn = optimal_denoiser("v", "cosine", [[0.2, 0.4]], [[0.3, 0.7]])
  common = dict(schedule="cosine", prediction="v", steps=8, thresholding="static")
  cond = make_cond(jax.random.key(0), 6)
  ddpm = D.sample(fn, jax.random.key(5), (6, 1, 1, 2), cond, sampler="ddpm", **common)
  ddim1 = D.sample(fn, jax.random.key(5), (6, 1, 1, 2), cond, sampler="ddim", eta=1.0, **common)
  np.testing.assert_allclose(ddim1, ddpm, atol=1e-4)
  # The denoiser ignores the text, so any guidance weight gives the unguided samples.
  guided = D.sample(fn, jax.random.key(5), (6, 1, 1, 2), cond, sampler="ddpm",
                    guidance_weight=4.0, **common)
  np.testing.assert_allclose(guided, ddpm, atol=1e-5)


# ---------------------------------------------------------------------------------------
# Loss.

@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_loss_of_optimal_denoiser_matches_analytic_expectation(prediction):
  mu, std = np.array([0.3, -0.5, 0.0, 0.2]), np.array([0.5, 0.3, 0.8, 0.2])
  fn = optimal_denoiser(prediction, "cosine", [mu], [std])
  batch = 32768
  x0 = jnp.asarray(mu + std * np.random.default_rng(0).normal(size=(batch, 1, 1, 4)),
                   jnp.float32)
  loss_fn = jax.jit(functools.partial(D.diffusion_loss, fn, schedule="cosine",
                                      prediction=prediction))
  loss, metrics = loss_fn(x0, {}, jax.random.key(0))
  assert loss.dtype == jnp.float32 and metrics["loss"] == loss
  # Expected loss: E_t mean_d Var(target | x_t), target = a x0 + b eps, Gaussian conditioning:
  # Var(target) - Cov(target, x_t)^2 / Var(x_t).
  t = (np.arange(200000) + 0.5) / 200000
  alpha, sigma = ref_alpha_sigma(np.clip(ref_cosine_logsnr(t), -20, 20))
  alpha, sigma = alpha[:, None], sigma[:, None]
  a, b = {"eps": (0, 1), "x0": (1, 0), "v": (-sigma, alpha)}[prediction]
  var_target = a**2 * std**2 + b**2
  cov = a * alpha * std**2 + b * sigma
  expected = np.mean(var_target - cov**2 / (alpha**2 * std**2 + sigma**2))
  np.testing.assert_allclose(loss, expected, rtol=0.03)


def test_loss_drops_text_for_about_ten_percent_and_keeps_float32():
  batch = 20000
  cond = make_cond(jax.random.key(0), batch, length=4, width=1)
  seen = []

  def fn(x_t, t, cond):
    seen.append(cond)
    return jnp.zeros_like(x_t, jnp.bfloat16)

  loss, metrics = D.diffusion_loss(fn, jnp.zeros((batch, 1, 1, 1)), cond, jax.random.key(1),
                                   schedule="linear", prediction="eps", cond_drop_prob=0.1)
  assert loss.dtype == jnp.float32
  mask, original = np.asarray(seen[0]["text_mask"]), np.asarray(cond["text_mask"])
  dropped = ~mask.any(1)
  assert abs(dropped.mean() - 0.1) < 0.01  # 5 standard errors
  np.testing.assert_allclose(metrics["text_drop_frac"], dropped.mean())
  np.testing.assert_array_equal(mask[~dropped], original[~dropped])  # kept rows unchanged
  np.testing.assert_array_equal(seen[0]["text"], cond["text"])       # only the mask changes
  # eps target with a zero prediction: loss = E[eps^2] = 1.
  np.testing.assert_allclose(loss, 1.0, rtol=0.05)


# ---------------------------------------------------------------------------------------
# Noise-conditioning augmentation.

def test_noise_aug_levels_and_identity_at_zero():
  augment = jax.jit(D.augment_lowres, static_argnames=("schedule", "max_aug_t"))
  lowres = jax.random.uniform(jax.random.key(0), (512, 4, 4, 3), minval=-1, maxval=1)
  noised, aug_t = augment(lowres, jax.random.key(1), "cosine", max_aug_t=0.4)
  assert aug_t.shape == (512,) and aug_t.min() >= 0 and aug_t.max() <= 0.4
  assert aug_t.max() > 0.35 and aug_t.min() < 0.05  # spread over the range
  same, zeros = augment(lowres, jax.random.key(1), "cosine", aug_t=0.0)
  np.testing.assert_array_equal(same, lowres)
  np.testing.assert_array_equal(zeros, np.zeros(512))
  # A fixed level: x = alpha lowres + sigma noise with the closed-form alpha, sigma.
  noised, aug_t = augment(lowres, jax.random.key(2), "linear", aug_t=0.3)
  np.testing.assert_array_equal(aug_t, np.full(512, 0.3, np.float32))
  alpha, sigma = ref_alpha_sigma(ref_linear_logsnr(0.3))
  residual = np.asarray(noised) - alpha * np.asarray(lowres)
  np.testing.assert_allclose(residual.mean(), 0.0, atol=0.01)
  np.testing.assert_allclose(residual.std(), sigma, rtol=0.02)
  # Per-example keys: a batch equals its examples augmented one at a time.
  keys = jax.random.split(jax.random.key(4), 3)
  batch, batch_t = augment(lowres[:3], keys, "cosine")
  single, single_t = augment(lowres[1:2], keys[1:2], "cosine")
  np.testing.assert_allclose(single[0], batch[1], atol=1e-6)
  np.testing.assert_allclose(single_t[0], batch_t[1])


# ---------------------------------------------------------------------------------------
# Parity with imagen-pytorch (lucidrains), an independent PyTorch implementation.

@pytest.fixture(scope="module")
def imagen_pt():
  for name in ("torch", "einops", "beartype", "kornia", "transformers"):
    pytest.importorskip(name)
  if importlib.util.find_spec("imagen_pytorch") is None:
    pytest.skip("imagen-pytorch is not installed: pip install --no-deps imagen-pytorch beartype "
                "kornia kornia-rs")
  return load_imagen_pytorch()


def load_imagen_pytorch():
  """imagen-pytorch's `imagen_pytorch.imagen_pytorch`, imported with no network
  (bench/peers/imagen_pytorch_loader.py says how; the benchmark peers share it)."""
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                  "bench", "peers"))
  from imagen_pytorch_loader import load_imagen_pytorch as load
  return load()


def _torch64(x):
  import torch
  return torch.from_numpy(np.asarray(x, np.float64))


@pytest.mark.parametrize("name", ["cosine", "linear"])
def test_schedule_and_forward_process_match_imagen_pytorch(imagen_pt, name):
  t = np.linspace(0.0, 0.999, 1000)
  ref_fn = {"cosine": imagen_pt.alpha_cosine_log_snr, "linear": imagen_pt.beta_linear_log_snr}[name]
  ref = ref_fn(_torch64(t)).numpy()   # float64: the reference, free of float32 cancellation
  np.testing.assert_allclose(D.get_schedule(name)(t), ref, rtol=1e-5, atol=1e-5)
  ref_a, ref_s = (v.numpy() for v in imagen_pt.log_snr_to_alpha_sigma(_torch64(ref)))
  got_a, got_s = D.alpha_sigma(jnp.asarray(ref, jnp.float32))
  np.testing.assert_allclose(got_a, ref_a, atol=1e-6)
  np.testing.assert_allclose(got_s, ref_s, atol=1e-6)

  rng = np.random.default_rng(1)
  x0, noise = rng.uniform(-1, 1, (64, 4, 4, 3)), rng.normal(size=(64, 4, 4, 3))
  t = rng.uniform(0, 0.99, 64)
  process = imagen_pt.GaussianDiffusionContinuousTimes(noise_schedule=name)
  ref_xt = process.q_sample(_torch64(x0), _torch64(t), _torch64(noise))[0].numpy()
  f32 = lambda v: jnp.asarray(v, jnp.float32)
  x_t = D.q_sample(f32(x0), f32(t), f32(noise), name)
  np.testing.assert_allclose(x_t, ref_xt, atol=2e-5)
  # Prediction conversions: x0 from eps (imagen-pytorch clamps alpha at 1e-8, inactive here) and v.
  logsnr = D.get_schedule(name)(f32(t))
  v = rng.normal(size=x0.shape)
  ref_from_eps = process.predict_start_from_noise(_torch64(ref_xt), t=_torch64(t),
                                                  noise=_torch64(noise)).numpy()
  ref_from_v = process.predict_start_from_v(_torch64(ref_xt), t=_torch64(t), v=_torch64(v)).numpy()
  got_from_eps = D.to_x0_eps(f32(ref_xt), f32(noise), logsnr, "eps")[0]
  np.testing.assert_allclose(got_from_eps, ref_from_eps, atol=1e-4)  # 1/alpha: up to ~60
  np.testing.assert_allclose(D.to_x0_eps(f32(ref_xt), f32(v), logsnr, "v")[0], ref_from_v,
                             atol=1e-5)


@pytest.mark.parametrize("name", ["cosine", "linear"])
def test_posterior_matches_imagen_pytorch(imagen_pt, name):
  rng = np.random.default_rng(2)
  x0, x_t = rng.uniform(-1, 1, (64, 2, 2, 3)), rng.normal(size=(64, 2, 2, 3))
  t = rng.uniform(0.01, 1.0, 64)
  s = t * rng.uniform(0.0, 0.99, 64)   # t_next < t, down to 0
  process = imagen_pt.GaussianDiffusionContinuousTimes(noise_schedule=name)
  mean, var, _ = process.q_posterior(_torch64(x0), _torch64(x_t), _torch64(t), t_next=_torch64(s))
  sched = D.get_schedule(name)
  f32 = lambda v: jnp.asarray(v, jnp.float32)
  # imagen-pytorch's cosine is unclipped (logsnr -> -inf at t = 1); compare where ours is not
  # clipped either.
  keep = np.asarray(sched(f32(t)) > sched.logsnr_min)
  got_mean, got_var = D.q_posterior(f32(x_t), f32(x0), sched(f32(t)), sched(f32(s)))
  np.testing.assert_allclose(np.asarray(got_mean)[keep], mean.numpy()[keep], rtol=1e-4, atol=2e-5)
  np.testing.assert_allclose(np.asarray(got_var)[keep].reshape(-1),
                             var.numpy()[keep].reshape(-1), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("percentile", [99.5, 90.0])
def test_thresholding_matches_imagen_pytorch(imagen_pt, percentile):
  """imagen-pytorch thresholds inside `Imagen.p_mean_variance`; that method runs here on a
  stand-in `self` that holds only what it reads, with the model output passed in (so no
  U-Net is built or called). It returns the posterior of the thresholded x0 too."""
  rng = np.random.default_rng(3)
  # Per-sample scales from 0.5 (inside [-1, 1], untouched) to 3 (clipped and rescaled).
  x0 = rng.normal(size=(6, 4, 4, 3)) * np.array([0.2, 0.5, 1.0, 1.5, 2.0, 3.0])[:, None, None, None]
  x_t = rng.normal(size=x0.shape)
  t = np.full(6, 0.4)
  process = imagen_pt.GaussianDiffusionContinuousTimes(noise_schedule="cosine", timesteps=10)
  owner = types.SimpleNamespace(dynamic_thresholding_percentile=percentile / 100,
                                can_classifier_guidance=True, is_video=False)
  f32 = lambda v: jnp.asarray(v, jnp.float32)
  sched = D.get_schedule("cosine")
  for dynamic, mode in ((True, "dynamic"), (False, "static")):
    (mean, var, _), ref_x0 = imagen_pt.Imagen.p_mean_variance(
        owner, None, _torch64(x_t), _torch64(t), noise_scheduler=process,
        model_output=_torch64(x0), pred_objective="x_start", dynamic_threshold=dynamic)
    got_x0 = D.apply_threshold(f32(x0), mode, percentile)
    np.testing.assert_allclose(got_x0, ref_x0.numpy(), atol=1e-6, err_msg=mode)
    # t_next defaults to t - 1/timesteps.
    got_mean, got_var = D.q_posterior(f32(x_t), got_x0, sched(f32(t)), sched(f32(t - 0.1)))
    np.testing.assert_allclose(got_mean, mean.numpy(), rtol=1e-4, atol=2e-5, err_msg=mode)
    np.testing.assert_allclose(got_var, var.numpy(), rtol=1e-4, err_msg=mode)


def test_guidance_matches_imagen_pytorch_cond_scale(imagen_pt):
  """Our w is imagen-pytorch's `cond_scale` (with its 'remove parallel component' extension
  off, the paper's formula): w = 1 the conditional model, w = 0 the unconditional one."""
  import torch
  k1, k2 = jax.random.split(jax.random.key(5))
  cond = make_cond(k1, 4, with_lowres=True)
  x_t, t = jax.random.normal(k2, (4, 2, 2, 3)), jnp.linspace(0.1, 0.9, 4)
  fn = cond_dependent_denoiser([])
  uncond = dict(cond, text_mask=jnp.zeros_like(cond["text_mask"]))
  outputs = {0.0: np.asarray(fn(x_t, t, cond), np.float64),
             1.0: np.asarray(fn(x_t, t, uncond), np.float64)}   # keyed by cond_drop_prob
  unet = types.SimpleNamespace(
      forward=lambda x, time, cond_drop_prob=0.0: torch.from_numpy(outputs[cond_drop_prob]))
  for w in (0.0, 1.0, 3.0, 7.5):
    ref = imagen_pt.Unet.forward_with_cond_scale(
        unet, None, None, cond_scale=w, remove_parallel_component=False).numpy()
    np.testing.assert_allclose(D.guided_denoiser(fn, w)(x_t, t, cond), ref, atol=1e-5,
                               err_msg=f"w={w}")
