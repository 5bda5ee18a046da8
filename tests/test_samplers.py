"""The samplers against closed forms: Gaussian data N(MU, SIGMA) has an exact Bayes-optimal
denoiser and an exact probability-flow ODE solution, both written out here.

Tolerances are stated on whitened statistics, which weigh every direction of SIGMA alike
(its variances span 0.04 .. 0.49): mean error |L^-1 (mean - MU)| and covariance error
|L^-1 C L^-T - I| (max over entries, L L^T = SIGMA). With n = 20000 samples their
statistical noise is ~0.007 per coordinate (mean) and ~0.01 per entry (covariance).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax import diffusion as D

from fast_compile import compile_sampler

MU = np.array([0.4, -0.3, 0.1])
_ROTATION = np.linalg.qr(np.array([[1.0, 2.0, 0.0], [0.0, 1.0, 1.0], [1.0, 0.0, 1.0]]))[0]
SIGMA = _ROTATION @ np.diag([0.04, 0.16, 0.49]) @ _ROTATION.T   # correlated, non-isotropic
EIGVALS, EIGVECS = np.linalg.eigh(SIGMA)
WHITEN = np.linalg.inv(np.linalg.cholesky(SIGMA))
NUM_SAMPLES = 20000

# (sampler, eta) pairs: every sampler, DDIM both deterministic and with DDPM's noise.
CASES = [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 1.0), ("dpm++2m", 0.0), ("heun", 0.0)]
CASE_IDS = ["ddpm", "ddim", "ddim_eta1", "dpm++2m", "heun"]


def gaussian_denoiser(prediction, schedule):
  """Bayes-optimal denoiser for x0 ~ N(MU, SIGMA) along the last axis, every other
  position independent. x_t = alpha x0 + sigma eps ~ N(alpha MU, alpha^2 SIGMA + sigma^2 I);
  in SIGMA's eigenbasis U (eigenvalues d), with r = U^T (x_t - alpha MU):
    E[x0 | x_t] = MU + U (alpha d / (alpha^2 d + sigma^2) r),
    E[eps | x_t] = U (sigma / (alpha^2 d + sigma^2) r),
  each computed directly, never by dividing by a small alpha or sigma."""
  mu, vecs, vals = (jnp.asarray(v, jnp.float32) for v in (MU, EIGVECS, EIGVALS))

  def denoise(x_t, t, cond):
    del cond
    logsnr = D.get_schedule(schedule)(t).reshape((-1,) + (1,) * (x_t.ndim - 1))
    alpha, sigma = jnp.sqrt(jax.nn.sigmoid(logsnr)), jnp.sqrt(jax.nn.sigmoid(-logsnr))
    r = (x_t - alpha * mu) @ vecs
    var = alpha**2 * vals + sigma**2
    x0 = mu + (alpha * vals / var * r) @ vecs.T
    eps = (sigma / var * r) @ vecs.T
    return {"eps": eps, "x0": x0, "v": alpha * eps - sigma * x0}[prediction]

  return denoise


def exact_ode_x0(x_init, schedule):
  """Where the deterministic samplers converge for initial noise x_init (at t = 1): the
  exact probability-flow ODE solution at t = 0, then the exact x0 prediction there.

  The PF-ODE of Gaussian data keeps each standardized eigen-coordinate
  z = U^T (x_t - alpha_t MU) / sqrt(alpha_t^2 d + sigma_t^2) constant (a 1-D linear flow
  between Gaussian marginals is the monotone map z -> z), and at t = 0,
  E[x0 | x] = MU + U (alpha d / sqrt(alpha^2 d + sigma^2) z). float64.
  """
  sched = D.get_schedule(schedule)
  (a1, s1), (a0, s0) = ([float(v) for v in sched.alpha_sigma(t)] for t in (1.0, 0.0))
  x = np.asarray(x_init, np.float64).reshape(-1, 3)
  z = (x - a1 * MU) @ EIGVECS / np.sqrt(a1**2 * EIGVALS + s1**2)
  return MU + (a0 * EIGVALS / np.sqrt(a0**2 * EIGVALS + s0**2) * z) @ EIGVECS.T


@functools.lru_cache(maxsize=None)
def draw(sampler, eta, prediction, steps, n=NUM_SAMPLES, schedule="cosine", grid="uniform_t"):
  """n samples [n, 3]; example b always from key b of split(key(0), NUM_SAMPLES), so a smaller
  n draws the first n examples of a larger one."""
  fn = gaussian_denoiser(prediction, schedule)
  run = jax.jit(functools.partial(
      D.sample, fn, shape=(n, 1, 1, 3), cond={}, schedule=schedule, prediction=prediction,
      sampler=sampler, steps=steps, eta=eta, thresholding="none", clip_final=False,
      time_grid=grid))
  keys = sample_keys(n)
  compiled = compile_sampler(run, keys, calls=D.make_plan(sampler, steps).calls)
  return np.asarray(compiled(keys)).reshape(n, 3)


def sample_keys(n):
  return jax.random.split(jax.random.key(0), NUM_SAMPLES)[:n]


def whitened_errors(x):
  """(mean error, covariance error) of samples x [n, 3], whitened by SIGMA."""
  mean_err = np.abs(WHITEN @ (x.mean(0) - MU)).max()
  cov_err = np.abs(WHITEN @ np.cov(x.T) @ WHITEN.T - np.eye(3)).max()
  return mean_err, cov_err


# ---------------------------------------------------------------------------------------
# Distribution: every sampler, every prediction type.

# Steps at which each sampler's covariance bias (measured with 200k samples, cosine,
# uniform_t) is small: DDPM / DDIM converge at first order with a large constant on the
# smallest-variance direction (bias ~14 / steps and ~7 / steps); DPM-Solver++ and Heun
# are within 0.006 / 0.014 at 100 steps (100 / 198 denoiser calls).
ENOUGH_STEPS = {"ddpm": 500, "ddim": 500, "dpm++2m": 100, "heun": 100}
MEAN_TOL = 0.03   # 4 standard errors of the whitened mean
COV_TOL = 0.06    # ~4 standard errors of the worst whitened covariance entry + bias <= 0.03


@pytest.mark.parametrize("sampler,eta", CASES, ids=CASE_IDS)
def test_every_sampler_reproduces_mu_and_sigma(sampler, eta):
  """eps prediction on 20000 samples within the stated tolerances (measured: whitened mean
  error 0.005 - 0.011, covariance error 0.029 DDPM, 0.018 DDIM, 0.011 DPM++, 0.014 Heun).
  v and x0 prediction: sample for sample equal to it on the first 2000 examples (same
  keys), since eps, v and x0 describe the same denoiser and the samplers must take the same
  path whichever the model outputs (measured difference <= 1e-4, float32 rounding).
  DDIM with eta = 1 is DDPM's chain: its samples must equal DDPM's."""
  steps = ENOUGH_STEPS[sampler]
  if eta == 1.0:   # the same chain; the 20000-sample statistics are DDPM's
    x = draw("ddpm", 0.0, "eps", steps)
    np.testing.assert_allclose(draw(sampler, eta, "eps", steps, n=2000), x[:2000], atol=1e-4)
  else:
    x = draw(sampler, eta, "eps", steps)
  mean_err, cov_err = whitened_errors(x)
  assert mean_err < MEAN_TOL and cov_err < COV_TOL, (mean_err, cov_err)
  for prediction in ("v", "x0"):
    np.testing.assert_allclose(draw(sampler, eta, prediction, steps, n=2000), x[:2000],
                               atol=5e-4, err_msg=prediction)
  # ... and the error falls as steps grow: 10 steps are far off.
  _, few_err = whitened_errors(draw(sampler, eta, "eps", 10))
  assert few_err > 0.2 and few_err > 4 * cov_err, (few_err, cov_err)


def test_ddpm_error_falls_with_steps():
  errs = [whitened_errors(draw("ddpm", 0.0, "eps", steps))[1] for steps in (10, 50, 500)]
  assert errs[0] > errs[1] > errs[2], errs
  assert errs[0] > 0.4 and errs[1] > 0.15, errs   # measured 0.55, 0.22, 0.029


# ---------------------------------------------------------------------------------------
# Deterministic samplers against the exact probability-flow ODE solution.

CALLS = (16, 32, 64, 128)   # denoiser calls per sample


def ode_error(sampler, calls, grid, n=1024):
  """RMS distance from the exact PF-ODE solution for the same initial noise."""
  steps = calls // 2 + 1 if sampler == "heun" else calls
  assert D.CALLS[sampler](steps) == calls
  x = draw(sampler, 0.0, "eps", steps, n=n, grid=grid)
  x_init = D.normal_per_example(sample_keys(n), (n, 1, 1, 3), salt=0)   # the initial noise
  return np.sqrt(np.mean((x - exact_ode_x0(x_init, "cosine")) ** 2))


def test_deterministic_samplers_converge_at_their_order():
  """On the uniform-log-SNR grid (where the asymptotic orders show cleanly): DDIM is first
  order, DPM-Solver++(2M) and Heun second, and at the same number of denoiser calls both
  beat DDIM (measured RMS errors at 16 / 32 / 64 / 128 calls: DDIM 9.5e-2 5.0e-2 2.6e-2
  1.3e-2, DPM++ 1.1e-2 5.2e-3 1.4e-3 3.3e-4, Heun 2.3e-1 5.2e-2 1.2e-2 3.0e-3)."""
  errs = {s: np.array([ode_error(s, c, "uniform_logsnr") for c in CALLS])
          for s in ("ddim", "dpm++2m", "heun")}
  for sampler, err in errs.items():
    assert np.all(np.diff(err) < 0), (sampler, err)
  # Order: slope of log error against log calls over 32 .. 128 calls.
  order = {s: -np.polyfit(np.log(CALLS[1:]), np.log(e[1:]), 1)[0] for s, e in errs.items()}
  assert 0.8 < order["ddim"] < 1.2, order
  assert 1.7 < order["dpm++2m"] < 2.4, order
  assert 1.8 < order["heun"] < 2.4, order
  ddim, dpm, heun = errs["ddim"], errs["dpm++2m"], errs["heun"]
  assert np.all(dpm < ddim / 5), errs      # from 16 calls on
  assert heun[-1] < ddim[-1] / 3 and heun[-2] < ddim[-2] / 1.5, errs
  assert dpm[-1] < 1e-3 and heun[-1] < 5e-3, errs


def test_second_order_samplers_beat_ddim_on_the_default_grid():
  """uniform_t, the default (measured at 32 / 128 calls: DDIM 2.3e-2 / 6.0e-3, DPM++
  3.3e-3 / 2.2e-4, Heun 1.2e-2 / 1.5e-3)."""
  for calls in (32, 128):
    ddim = ode_error("ddim", calls, "uniform_t")
    assert ode_error("dpm++2m", calls, "uniform_t") < ddim / 5, calls
    assert ode_error("heun", calls, "uniform_t") < ddim / 1.5, calls


# ---------------------------------------------------------------------------------------
# Thresholding and guidance inside every sampler.

def spiked_denoiser(cond_key="spike"):
  """x0-prediction model: the Gaussian denoiser per pixel, plus cond[cond_key][b] at one
  pixel of example b: an outlier in that example's x0 only."""
  gauss = gaussian_denoiser("x0", "cosine")

  def denoise(x_t, t, cond):
    at_pixel = (jnp.arange(16).reshape(1, 4, 4, 1) == 5) & (jnp.arange(3) == 0)
    return gauss(x_t, t, cond) + cond[cond_key][:, None, None, None] * at_pixel

  return denoise


@pytest.mark.parametrize("sampler,eta", CASES, ids=CASE_IDS)
def test_dynamic_thresholding_is_per_sample(sampler, eta):
  """One sample's outlier changes its own output and leaves the others bit for bit."""
  keys = jax.random.split(jax.random.key(1), 3)
  run = jax.jit(lambda spike: D.sample(
      spiked_denoiser(), keys, (3, 4, 4, 3), {"spike": spike}, schedule="cosine",
      prediction="x0", sampler=sampler, eta=eta, steps=6, thresholding="dynamic",
      percentile=99.5, clip_final=False))
  clean, spiked = run(jnp.zeros(3)), run(jnp.array([20.0, 0.0, 0.0]))
  np.testing.assert_array_equal(spiked[1:], clean[1:])
  # The outlier sets example 0's s ~ 15 (the 99.5th percentile of its 48 values lies 77 %
  # of the way to the spike): its output moves. A per-batch s would move all three.
  assert np.abs(spiked[0] - clean[0]).max() > 0.1


@pytest.mark.parametrize("sampler,eta", CASES, ids=CASE_IDS)
def test_guidance_before_thresholding(sampler, eta):
  """cond predicts x0 = 0.9, uncond 0.5: w = 3 extrapolates to 1.7, which static
  thresholding must clip to 1 (thresholding each half first would leave 1.7)."""
  fn = lambda x_t, t, cond: 0.5 + 0.4 * cond["text_mask"].any(1)[:, None, None, None] + 0 * x_t
  cond = {"text": jnp.ones((2, 3, 1)), "text_mask": jnp.ones((2, 3), bool)}
  x = D.sample(fn, jax.random.key(0), (2, 2, 2, 1), cond, schedule="cosine", prediction="x0",
               sampler=sampler, eta=eta, steps=4, guidance_weight=3.0, thresholding="static",
               clip_final=False)
  np.testing.assert_allclose(x, 1.0, atol=1e-6)


def text_dependent_denoiser():
  gauss = gaussian_denoiser("eps", "cosine")

  def denoise(x_t, t, cond):
    mask = cond["text_mask"][..., None].astype(jnp.float32)
    text = (cond["text"] * mask).sum((1, 2)) / jnp.maximum(mask.sum((1, 2)), 1.0)
    return gauss(x_t, t, cond) + 0.3 * text[:, None, None, None]

  return denoise


def text_cond(batch):
  k1, k2 = jax.random.split(jax.random.key(3))
  return {"text": jax.random.normal(k1, (batch, 5, 1)) + 1.0,
          "text_mask": jnp.arange(5)[None, :] < jax.random.randint(k2, (batch, 1), 1, 6)}


@pytest.mark.parametrize("sampler,eta", CASES, ids=CASE_IDS)
def test_guidance_weights_zero_and_one_and_batch_equals_one_by_one(sampler, eta):
  """w = 0 samples the unconditional model, w = 1 the conditional one (our convention,
  the paper's and imagen-pytorch's cond_scale), and a batch equals its examples sampled
  one at a time with their keys (guidance 3, dynamic thresholding)."""
  fn, cond = text_dependent_denoiser(), text_cond(4)
  uncond = dict(cond, text_mask=jnp.zeros_like(cond["text_mask"]))

  @jax.jit
  def run(rng, cond, w):
    return D.sample(fn, rng, (cond["text"].shape[0], 2, 2, 3), cond, schedule="cosine",
                    prediction="eps", sampler=sampler, eta=eta, steps=6, guidance_weight=w,
                    thresholding="dynamic")

  rng = jax.random.key(7)
  w1 = jnp.float32(1.0)   # traced, so both halves run: must still equal the plain conditional
  np.testing.assert_allclose(run(rng, cond, w1), D.sample(
      fn, rng, (4, 2, 2, 3), cond, schedule="cosine", prediction="eps", sampler=sampler,
      eta=eta, steps=6, thresholding="dynamic"), atol=1e-5)
  np.testing.assert_allclose(run(rng, cond, jnp.float32(0.0)), run(rng, uncond, w1), atol=1e-5)
  assert np.abs(run(rng, cond, w1) - run(rng, uncond, w1)).max() > 1e-2   # the text matters

  batch = np.asarray(run(rng, cond, jnp.float32(3.0)))
  keys = jax.random.split(rng, 4)
  for b in range(4):
    single = run(keys[b:b + 1], jax.tree.map(lambda v: v[b:b + 1], cond), jnp.float32(3.0))
    np.testing.assert_allclose(single[0], batch[b], atol=1e-5)
  assert len({batch[b].tobytes() for b in range(4)}) == 4


# ---------------------------------------------------------------------------------------
# Loop structure, time grids, argument checks.

@pytest.mark.parametrize("sampler,steps", [("ddpm", 3), ("ddim", 5), ("dpm++2m", 7),
                                           ("heun", 5), ("heun", 2), ("heun", 1)])
def test_one_traced_denoiser_and_the_stated_number_of_calls(sampler, steps):
  traces, calls = [], []
  gauss = gaussian_denoiser("v", "cosine")

  def fn(x_t, t, cond):
    traces.append(1)   # Python side: once per trace
    jax.debug.callback(lambda t: calls.append(1), t[0])   # device side: once per call
    return gauss(x_t, t, cond)

  x = jax.jit(lambda rng: D.sample(fn, rng, (2, 1, 1, 3), {}, schedule="cosine",
                                   prediction="v", sampler=sampler, steps=steps))(
                                       jax.random.key(0))
  jax.block_until_ready(x)
  assert len(traces) == 1
  assert len(calls) == D.CALLS[sampler](steps) == {"heun": max(2 * steps - 2, 1)}.get(
      sampler, steps)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_time_grids(schedule):
  sched = D.get_schedule(schedule)
  times, logsnrs = D.time_grid("uniform_t", 8, schedule)
  np.testing.assert_allclose(times, np.linspace(1, 0, 9), atol=1e-7)
  np.testing.assert_allclose(logsnrs, sched(times))
  times, logsnrs = D.time_grid("uniform_logsnr", 8, schedule)
  assert times[0] == 1.0 and times[-1] == 0.0 and np.all(np.diff(times) < 0)
  np.testing.assert_allclose(logsnrs, sched(times))   # what the denoiser sees, exactly
  step = (float(sched(0.0)) - float(sched(1.0))) / 8
  np.testing.assert_allclose(np.diff(logsnrs), step, rtol=1e-3)
  # The schedule's inverse, away from the clipped end of the cosine.
  t = jnp.linspace(0.0, 0.999, 500)
  np.testing.assert_allclose(sched.t_from_logsnr(sched(t)), t, atol=2e-5)


def test_argument_checks():
  fn = gaussian_denoiser("eps", "cosine")
  common = dict(schedule="cosine", prediction="eps", steps=2)
  args = (fn, jax.random.key(0), (1, 1, 1, 3), {})
  with pytest.raises(ValueError, match="Unknown sampler"):
    D.sample(*args, sampler="euler", **common)
  with pytest.raises(ValueError, match="Unknown time_grid"):
    D.sample(*args, time_grid="karras", **common)
  with pytest.raises(ValueError, match="eta=0.5 is DDIM's"):
    D.sample(*args, sampler="heun", eta=0.5, **common)
  with pytest.raises(ValueError, match="Unknown thresholding"):
    D.sample(*args, thresholding="soft", **common)
  with pytest.raises(ValueError, match="steps must be >= 1"):
    D.sample(*args, schedule="cosine", prediction="eps", steps=0)
