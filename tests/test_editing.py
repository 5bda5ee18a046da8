"""Text-guided editing: inpainting inside every sampler, and upscale / inpaint through a cascade.

Inpainting is the replacement method (`diffusion.editing`), which is NOT the exact
conditional in general, so the Gaussian tests check three separate things:

1. Where it is exact (the kept coordinate independent of the generated ones under the data
   distribution, which may still be correlated among themselves), every sampler at enough
   steps draws the generated coordinates from the exact conditional N(mu_g, Sigma_gg).
2. On correlated data, for DDPM and DDIM (and with RePaint resampling), the samples follow
   the output distribution of the replacement algorithm itself, which is Gaussian and known
   in closed form here (every step is affine in the state plus Gaussian noise, so its mean
   and covariance propagate exactly, float64): this checks the implementation tightly at
   any number of steps.
3. That closed form then measures the method's gap to the exact conditional p(x_g | x_k),
   stated below and asserted as measured (it is the method's, not the implementation's).

Statistics are whitened by the reference covariance: mean error |L^-1 (mean - ref)|, and
covariance error |L^-1 C L^-T - I| (max over entries, L L^T = reference covariance). With
n = 20000 samples their noise is ~0.007 (mean) and ~0.01 (covariance entry), so
MEAN_TOL = 0.03 and COV_TOL = 0.06 leave about 3 standard errors above the samplers' own
discretisation bias at the steps used (at most 0.027, DDPM at 300 steps, from the closed
form; none in the closed-form comparisons).
"""
import functools
import importlib
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from imagen_jax import diffusion as D

from fast_compile import compile_sampler

MEAN_TOL, COV_TOL = 0.03, 0.06
N = 20000
MU = np.array([0.4, -0.3, 0.1])
KEEP = np.array([True, False, False])          # coordinate 0 known, 1 and 2 generated
# Independent known coordinate, correlated generated pair (eigenvalues 0.19, 0.25, 0.51).
SIGMA_IND = np.array([[0.25, 0.0, 0.0], [0.0, 0.4, 0.15], [0.0, 0.15, 0.3]])
# tests/test_samplers.py's correlated SIGMA (eigenvalues 0.04, 0.16, 0.49).
_ROTATION = np.linalg.qr(np.array([[1.0, 2.0, 0.0], [0.0, 1.0, 1.0], [1.0, 0.0, 1.0]]))[0]
SIGMA_COR = _ROTATION @ np.diag([0.04, 0.16, 0.49]) @ _ROTATION.T


def known_value(sigma, sds):
  """The known x0: coordinate 0 at MU_0 + sds standard deviations (far from the mean, so a
  method that ignored it would show); the other coordinates are never used."""
  return np.array([MU[0] + sds * np.sqrt(sigma[0, 0]), 0.0, 0.0])


def gaussian_denoiser(sigma, prediction="eps", schedule="cosine"):
  """Bayes-optimal denoiser of x0 ~ N(MU, sigma) along the last axis (tests/test_samplers.py)."""
  vals, vecs = np.linalg.eigh(sigma)
  mu, vecs, vals = (jnp.asarray(v, jnp.float32) for v in (MU, vecs, vals))

  def denoise(x_t, t, cond):
    del cond
    logsnr = D.get_schedule(schedule)(t).reshape((-1,) + (1,) * (x_t.ndim - 1))
    alpha, sig = jnp.sqrt(jax.nn.sigmoid(logsnr)), jnp.sqrt(jax.nn.sigmoid(-logsnr))
    r = (x_t - alpha * mu) @ vecs
    var = alpha**2 * vals + sig**2
    x0 = mu + (alpha * vals / var * r) @ vecs.T
    eps = (sig / var * r) @ vecs.T
    return {"eps": eps, "x0": x0, "v": alpha * eps - sig * x0}[prediction]

  return denoise


def exact_conditional(sigma, known):
  """Mean and covariance of x_g given x_k = known_k for x ~ N(MU, sigma)."""
  g, k = ~KEEP, KEEP
  gain = sigma[np.ix_(g, k)] @ np.linalg.inv(sigma[np.ix_(k, k)])
  return MU[g] + gain @ (known[k] - MU[k]), sigma[np.ix_(g, g)] - gain @ sigma[np.ix_(k, g)]


def cosine_logsnrs(steps):
  """The uniform-t grid's log-SNRs of the cosine schedule (schedules.py), float64 numpy."""
  theta = (np.linspace(1.0, 0.0, steps + 1) + 0.008) / 1.008 * (np.pi / 2)
  return np.clip(-np.log(np.maximum(np.tan(theta)**2, 1e-20)), -20.0, 20.0)


def replacement_closed_form(sigma, known, sampler, steps, resample_steps=1):
  """The exact output distribution (mean, cov) of the generated coordinates under the
  replacement method for DDPM or deterministic DDIM, uniform-t cosine grid, float64.

  The state x ~ N(m, P) (x_init ~ N(0, I)); before call j at grid point i the kept
  coordinates become alpha_i known + sigma_i z (m, P: kept rows and columns replaced); the
  optimal denoiser is affine, x0_hat = G_i x + b_i, so a DDPM step (posterior mean + noise)
  and a DDIM step (alpha_s x0_hat + sigma_s eps_hat) are affine maps plus Gaussian noise,
  and so is a RePaint jump back. The plan of calls is the samplers' own (`D.make_plan`)."""
  vals, vecs = np.linalg.eigh(sigma)
  ls = cosine_logsnrs(steps)
  alphas, sigmas = np.sqrt(1 / (1 + np.exp(-ls))), np.sqrt(1 / (1 + np.exp(ls)))
  eye = np.eye(3)
  step_maps = []   # per grid step i: x_next = lin x + const + sqrt(var) z
  for i in range(steps):
    a, s = alphas[i], sigmas[i]
    gain = vecs @ np.diag(a * vals / (a**2 * vals + s**2)) @ vecs.T
    b = MU - a * gain @ MU
    if i == steps - 1:
      step_maps.append((gain, b, 0.0))
      continue
    a_s, s_s = alphas[i + 1], sigmas[i + 1]
    if sampler == "ddpm":
      c = -np.expm1(ls[i] - ls[i + 1])
      step_maps.append((a_s * np.exp(ls[i] - ls[i + 1]) / a * eye + a_s * c * gain,
                        a_s * c * b, c * s_s**2))
    else:   # DDIM, eta = 0: eps_hat = (x - a x0_hat) / s
      step_maps.append((a_s * gain + s_s / s * (eye - a * gain), (a_s - s_s / s * a) * b, 0.0))
  plan = D.make_plan(sampler, steps, resample_steps)
  m, p = np.zeros(3), np.eye(3)
  for i, back in zip(plan.step, plan.renoise):
    m, p = m.copy(), p.copy()
    m[KEEP] = alphas[i] * known[KEEP]
    p[KEEP, :], p[:, KEEP] = 0.0, 0.0
    p[KEEP, KEEP] = sigmas[i]**2
    lin, const, var = step_maps[i]
    m, p = lin @ m + const, lin @ p @ lin.T + var * eye
    if back:
      r = alphas[i] / alphas[i + 1]
      m, p = r * m, r**2 * p + sigmas[i]**2 * -np.expm1(ls[i] - ls[i + 1]) * eye
  g = ~KEEP
  return m[g], p[np.ix_(g, g)]


def whitened_errors(mean, cov, ref_mean, ref_cov):
  w = np.linalg.inv(np.linalg.cholesky(ref_cov))
  return np.abs(w @ (mean - ref_mean)).max(), np.abs(w @ cov @ w.T - np.eye(len(ref_mean))).max()


def sample_stats(x):
  xg = x[:, ~KEEP]
  return xg.mean(0), np.cov(xg.T)


def inpaint_gaussian(sigma, known, sampler, steps, resample_steps=1, eta=0.0, n=N):
  fn = gaussian_denoiser(sigma)
  x0_known = jnp.asarray(known, jnp.float32).reshape(1, 1, 1, 3)
  run = jax.jit(functools.partial(
      D.sample, fn, shape=(n, 1, 1, 3), cond={}, schedule="cosine", prediction="eps",
      sampler=sampler, steps=steps, eta=eta, thresholding="none", clip_final=False,
      known=(x0_known, jnp.asarray(KEEP, jnp.float32)), resample_steps=resample_steps))
  keys = jax.random.split(jax.random.key(0), n)
  compiled = compile_sampler(run, keys, calls=D.make_plan(sampler, steps, resample_steps).calls)
  x = np.asarray(compiled(keys)).reshape(n, 3)
  assert np.all(x[:, KEEP] == np.float32(known[KEEP])), "kept coordinate not exact"
  return x


# ---------------------------------------------------------------------------------------
# 1. Exact case: the known coordinate independent of the generated ones.

# Steps at which the samplers' own covariance bias (closed form for DDPM / DDIM) is small:
# DDPM 0.027 at 300 steps, DDIM 0.023 at 150; DPM-Solver++ and Heun are second order.
ENOUGH_STEPS = {"ddpm": 300, "ddim": 150, "dpm++2m": 60, "heun": 40}


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++2m", "heun"])
def test_independent_regions_follow_the_exact_conditional(sampler):
  """Kept x_0 = MU_0 + 2 sd, independent of (x_1, x_2), which are correlated (0.43): the
  generated pair must be N(MU_g, SIGMA_gg), whatever the known value (measured whitened
  errors: mean 0.007 - 0.011, covariance 0.005 - 0.020)."""
  known = known_value(SIGMA_IND, 2.0)
  x = inpaint_gaussian(SIGMA_IND, known, sampler, ENOUGH_STEPS[sampler])
  mean_err, cov_err = whitened_errors(*sample_stats(x), *exact_conditional(SIGMA_IND, known))
  assert mean_err < MEAN_TOL and cov_err < COV_TOL, (mean_err, cov_err)


# ---------------------------------------------------------------------------------------
# 2. Correlated data: the implementation against the replacement method's closed form.

@pytest.mark.parametrize("sampler,steps,resample_steps,eta", [
    ("ddim", 20, 1, 0.0), ("ddim", 20, 1, 1.0), ("ddpm", 10, 3, 0.0), ("ddim", 8, 4, 0.0)])
def test_correlated_samples_follow_the_replacement_closed_form(sampler, steps, resample_steps,
                                                               eta):
  """Few steps on purpose: the closed form is exact at any number of steps, and far from
  the exact conditional, so agreement pins down the hook (replacement before each call,
  fresh noise, the plan of calls, the jump back). DDIM with eta = 1 is DDPM's chain.
  Measured whitened errors against the closed form: mean 0.006 - 0.011, covariance
  0.005 - 0.014; against the exact conditional: mean 0.47 - 0.90."""
  known = known_value(SIGMA_COR, 1.5)
  x = inpaint_gaussian(SIGMA_COR, known, sampler, steps, resample_steps, eta)
  closed = replacement_closed_form(SIGMA_COR, known, "ddpm" if eta == 1.0 else sampler, steps,
                                   resample_steps)
  mean_err, cov_err = whitened_errors(*sample_stats(x), *closed)
  assert mean_err < MEAN_TOL and cov_err < COV_TOL, (mean_err, cov_err)
  # ... and the test can tell: the exact conditional is far from these samples.
  assert whitened_errors(*sample_stats(x), *exact_conditional(SIGMA_COR, known))[0] > 0.2


# ---------------------------------------------------------------------------------------
# 3. The method's gap to the exact conditional (closed form, no sampling noise).

def test_replacement_gap_to_the_exact_conditional_and_resampling():
  """Measured (whitened, SIGMA_COR, x_0 known at +1.5 sd, 200 steps): plain replacement
  puts the generated mean 0.64 (DDPM) / 0.92 (DDIM) conditional standard deviations from
  the exact conditional mean, covariance error 0.19 / 0.40. It under-uses the known value:
  the generated means move only 33 % and 56 % (DDPM; DDIM 20 % and 39 %) of the way from
  their prior means to the conditional ones, with variances too large (0.33, 0.087 against
  0.30, 0.070). RePaint resampling shrinks the mean gap with resample_steps U = 1, 2, 5,
  10, 20: DDPM 0.64 0.39 0.23 0.14 0.076, DDIM 0.92 0.63 0.35 0.23 0.13; its covariance
  error first falls, then grows with U at a fixed number of steps (U = 20: variances too
  small, 0.27, 0.052) and falls again with more steps (DDPM, U = 10: 0.27 / 0.17 / 0.09 at
  100 / 200 / 500 steps)."""
  known = known_value(SIGMA_COR, 1.5)
  exact = exact_conditional(SIGMA_COR, known)
  gaps = {s: [whitened_errors(*replacement_closed_form(SIGMA_COR, known, s, 200, u), *exact)
              for u in (1, 2, 5, 10, 20)] for s in ("ddpm", "ddim")}
  for sampler, expected in (("ddpm", (0.64, 0.39, 0.23, 0.14, 0.076)),
                            ("ddim", (0.92, 0.63, 0.35, 0.23, 0.13))):
    mean_gaps = [m for m, _ in gaps[sampler]]
    np.testing.assert_allclose(mean_gaps, expected, rtol=0.05, err_msg=sampler)
    assert np.all(np.diff(mean_gaps) < 0), mean_gaps
  np.testing.assert_allclose([c for _, c in gaps["ddpm"]][0], 0.19, atol=0.01)
  cov_u10 = [whitened_errors(*replacement_closed_form(SIGMA_COR, known, "ddpm", steps, 10),
                             *exact)[1] for steps in (100, 200, 500)]
  np.testing.assert_allclose(cov_u10, (0.27, 0.17, 0.09), atol=0.01)


# ---------------------------------------------------------------------------------------
# The hook with guidance, thresholding and every sampler.

def text_dependent_denoiser():
  gauss = gaussian_denoiser(SIGMA_COR)

  def denoise(x_t, t, cond):
    mask = cond["text_mask"][..., None].astype(jnp.float32)
    text = (cond["text"] * mask).sum((1, 2)) / jnp.maximum(mask.sum((1, 2)), 1.0)
    return gauss(x_t, t, cond) + 0.3 * text[:, None, None, None]

  return denoise


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++2m", "heun"])
def test_kept_region_exact_with_guidance_thresholding_and_resampling(sampler):
  """Guidance 3 and dynamic thresholding, per-example masks: the output equals x0_known
  bit for bit where the mask is 1, for resample_steps 1 and 2, and differs elsewhere; a
  mask of zeros is plain sampling (to float32 rounding: a separately compiled program);
  and examples are independent of their batch: permuting the batch (keys, text, image,
  mask) permutes the outputs (measured: bit for bit)."""
  fn = text_dependent_denoiser()
  k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
  batch, shape = 3, (3, 4, 4, 3)
  cond = {"text": jax.random.normal(k1, (batch, 5, 1)) + 1.0,
          "text_mask": jnp.arange(5)[None, :] < jnp.array([[2], [5], [3]])}
  x0_known = jax.random.uniform(k2, shape, minval=-1.0, maxval=1.0)
  mask = (jax.random.uniform(k3, shape[:3] + (1,)) < 0.5).astype(jnp.float32)
  common = dict(schedule="cosine", prediction="v", sampler=sampler, steps=5,
                guidance_weight=3.0, thresholding="dynamic")

  @functools.partial(jax.jit, static_argnames="resample_steps")
  def run(rng, cond, known, resample_steps):
    return D.sample(fn, rng, (cond["text"].shape[0],) + shape[1:], cond, known=known,
                    resample_steps=resample_steps, **common)

  rng = jax.random.split(jax.random.key(7), batch)   # per-example keys
  keep = np.broadcast_to(np.asarray(mask) == 1, shape)
  outputs = {}
  for u in (1, 2):
    x = outputs[u] = np.asarray(run(rng, cond, (x0_known, mask), u))
    np.testing.assert_array_equal(x[keep], np.asarray(x0_known)[keep])
    assert np.abs(x - np.asarray(x0_known))[~keep].min() > 0 and np.abs(x).max() <= 1.0
  assert np.abs(outputs[1] - outputs[2]).max() > 1e-3   # resampling changes the samples
  plain = jax.jit(lambda rng: D.sample(fn, rng, shape, cond, **common))(rng)
  np.testing.assert_allclose(run(rng, cond, (x0_known, jnp.zeros_like(mask)), 1), plain,
                             atol=1e-5)
  perm = np.array([2, 0, 1])
  permuted = run(rng[perm], jax.tree.map(lambda v: v[perm], cond),
                 (x0_known[perm], mask[perm]), 2)
  np.testing.assert_allclose(permuted, outputs[2][perm], atol=1e-6)


@pytest.mark.parametrize("sampler,steps,resample_steps", [
    ("dpm++2m", 4, 3), ("heun", 4, 2), ("heun", 1, 3)])
def test_one_traced_denoiser_and_resample_calls(sampler, steps, resample_steps):
  """Inpainting keeps one traced denoiser; calls = CALLS[sampler](steps) * resample_steps."""
  traces, calls = [], []
  gauss = gaussian_denoiser(SIGMA_COR, "v")

  def fn(x_t, t, cond):
    traces.append(1)
    jax.debug.callback(lambda t: calls.append(1), t[0])
    return gauss(x_t, t, cond)

  known = (jnp.zeros((2, 1, 1, 3)), jnp.asarray(KEEP, jnp.float32))
  x = jax.jit(lambda rng: D.sample(fn, rng, (2, 1, 1, 3), {}, schedule="cosine",
                                   prediction="v", sampler=sampler, steps=steps, known=known,
                                   resample_steps=resample_steps))(jax.random.key(0))
  jax.block_until_ready(x)
  assert len(traces) == 1
  assert len(calls) == D.CALLS[sampler](steps) * resample_steps == D.make_plan(
      sampler, steps, resample_steps).calls


def test_editing_argument_checks():
  fn = gaussian_denoiser(SIGMA_COR)
  common = dict(schedule="cosine", prediction="eps", steps=2)

  def check(**kwargs):   # traced only: the errors come before anything runs
    jax.eval_shape(lambda rng: D.sample(fn, rng, (2, 1, 1, 3), {}, **common, **kwargs),
                   jax.random.key(0))

  with pytest.raises(ValueError, match="resample_steps=2 is RePaint"):
    check(resample_steps=2)
  with pytest.raises(ValueError, match="resample_steps must be >= 1"):
    check(known=(jnp.zeros(3), jnp.ones(3)), resample_steps=0)
  with pytest.raises(ValueError, match="does not broadcast"):
    check(known=(jnp.zeros((2, 2, 2, 3)), jnp.ones(3)))
  with pytest.raises(ValueError, match="a pair"):
    check(known=jnp.zeros((2, 1, 1, 3)))


# ---------------------------------------------------------------------------------------
# Through a cascade: configs/shapes.py:tiny with seeded random weights in a tmp workdir.

def _random_params(abstract, seed):
  """Seeded random values for a tree of ShapeDtypeStructs, without compiling an init:
  kernels N(0, 1 / fan_in), norm scales 1, other floats N(0, 0.02^2); so every layer,
  the U-Nets' zero-initialised output convolutions included, passes its inputs on."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = str(path[-1]) if path else ""
    if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      return jax.random.key(seed)
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
      return np.zeros(leaf.shape, leaf.dtype)
    if "scale" in name:
      return np.ones(leaf.shape, leaf.dtype)
    if len(leaf.shape) >= 2:
      return (rng.standard_normal(leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))).astype(
          leaf.dtype)
    return (0.02 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, abstract)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A workdir as training leaves it (config.json, text_encoder/, each stage's checkpoint)
  for configs/shapes.py:tiny, with seeded random weights (the editing paths do not depend
  on training, and a random cascade needs no compilation to build)."""
  from configs import shapes as shapes_config
  from imagen_jax.models import UNet
  from imagen_jax.parallel import mesh as mesh_lib
  from imagen_jax.text import t5 as t5_lib
  from imagen_jax.train import checkpoint as ckpt
  from imagen_jax.train import stages
  from imagen_jax.train.loop import example_inputs
  from imagen_jax.train.state import abstract_train_state, make_optimizer

  config = shapes_config.get_config("tiny")
  path = str(tmp_path_factory.mktemp("editing_run"))
  with open(os.path.join(path, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  t5 = stages.t5_config(config)
  # Replicated over all devices, as training saves it (the sampler must move it to its own).
  everywhere = jax.sharding.NamedSharding(jax.sharding.Mesh(jax.devices(), ("d",)),
                                          jax.sharding.PartitionSpec())
  ckpt.save_text_encoder(path, jax.device_put(_random_params(t5_lib.param_shapes(t5), 0),
                                              everywhere), t5)
  mesh = mesh_lib.make_mesh({axis: 1 for axis in config.mesh}, jax.devices()[:1])
  rules = mesh_lib.rules_from_config(config.axis_rules)
  for i, name in enumerate(config.stage_order):
    spec = stages.stage_spec(config, name)
    abstract, _ = abstract_train_state(
        UNet(spec.unet), example_inputs(spec, t5.d_model, config.text.max_length),
        make_optimizer(spec.optimizer), mesh=mesh, rules=rules)
    saver = ckpt.Saver(ckpt.stage_manager(path, name, async_save=False), keep=1)
    saver.save(1, _random_params(abstract, i + 1))
    saver.close()
  return path


def _cli_main(args):
  """Runs `python -m imagen_jax.sample` in this process (sharing its compilations)."""
  cli = importlib.import_module("imagen_jax.sample.__main__")
  absl_level = logging.getLogger("absl").level
  try:
    cli.FLAGS(["sample"] + args)
    cli.main([])
  finally:
    cli.FLAGS.unparse_flags()  # this resets absl's --verbosity, which sets its logger's level
    logging.getLogger("absl").setLevel(absl_level)


def test_cascade_upscale_and_inpaint(workdir, tmp_path, monkeypatch):
  """`python -m imagen_jax.sample --upscale / --mask` and `Cascade.upscale / inpaint`, end to
  end on a random tiny cascade (16x16 base, 16 -> 32 SR), batch 2 throughout so the API
  calls reuse the CLI's compiled stage samplers (and the cascade is loaded once)."""
  from imagen_jax.sample.cascade import Cascade
  from imagen_jax.train.step import downsample, float_to_images, images_to_float

  cascade = Cascade.from_workdir(workdir)
  assert [s.name for s in cascade.specs] == ["base", "sr"]
  monkeypatch.setattr(Cascade, "from_workdir",
                      classmethod(lambda cls, path, stages=None: cascade))

  rng = np.random.default_rng(0)
  small = rng.integers(0, 256, (16, 16, 3), np.uint8)
  image = rng.integers(0, 256, (32, 32, 3), np.uint8)
  keep = np.zeros((32, 32), bool)
  keep[:, :20] = True
  keep[4:10, 24:30] = True
  Image.fromarray(small).save(tmp_path / "small.png")
  Image.fromarray(image).save(tmp_path / "image.png")
  Image.fromarray(keep.astype(np.uint8) * 255).save(tmp_path / "mask.png")

  # The CLI: super-resolution of the user's 16x16 image, two samples.
  _cli_main([f"--workdir={workdir}", f"--init_image={tmp_path / 'small.png'}", "--upscale",
             "--prompt=a red circle at the top", "--num_per_prompt=2",
             f"--output_dir={tmp_path / 'up'}"])
  files = sorted(f for f in os.listdir(tmp_path / "up") if f.endswith(".png"))
  assert files == ["0000.png", "0001.png", "grid.png"]
  assert np.asarray(Image.open(tmp_path / "up" / "0000.png")).shape == (32, 32, 3)
  # The CLI: inpainting with resampling, 3 samples in batches of 2 (the last one padded).
  _cli_main([f"--workdir={workdir}", f"--init_image={tmp_path / 'image.png'}",
             f"--mask={tmp_path / 'mask.png'}", "--prompt=two blue squares",
             "--num_per_prompt=3", "--batch_size=2", "--resample_steps=2",
             f"--output_dir={tmp_path / 'inp'}"])
  assert len(os.listdir(tmp_path / "inp" / "stage_base")) == 3
  for i in range(3):
    out = np.asarray(Image.open(tmp_path / "inp" / f"{i:04d}.png"))
    np.testing.assert_array_equal(out[keep], image[keep])
    assert np.any(out[~keep] != image[~keep])
  with pytest.raises(Exception, match="needs --upscale"):
    _cli_main([f"--workdir={workdir}", f"--init_image={tmp_path / 'image.png'}", "--prompt=x"])

  prompts = ["a red circle at the top", "two blue squares"]
  # Super-resolution of the user's images through the SR stage (the default from_stage).
  smalls = rng.integers(0, 256, (2, 16, 16, 3), np.uint8)
  (up,) = cascade.upscale(smalls, prompts, progress=False)
  assert up.shape == (2, 32, 32, 3) and up.dtype == np.uint8
  np.testing.assert_array_equal(
      cascade.upscale(smalls, prompts, from_stage="sr", progress=False)[0], up)
  # The SR stage sees the user's image: another low-res input, another output.
  assert np.any(cascade.upscale(smalls[::-1], prompts, progress=False)[0] != up)
  with pytest.raises(ValueError, match="base stage"):
    cascade.upscale(smalls, prompts, from_stage="base")

  # Inpainting: 3 prompts in batches of 2, one image and mask for all.
  base, final = cascade.inpaint(image, keep, prompts + ["a green triangle"], batch_size=2,
                                resample_steps=2, progress=False)
  assert base.shape == (3, 16, 16, 3) and final.shape == (3, 32, 32, 3)
  for out in final:
    np.testing.assert_array_equal(out[keep], image[keep])
    assert np.any(out[~keep] != image[~keep])
  # The base stage keeps the downsampled image where all the pixels under the filter are kept.
  small_image = np.asarray(float_to_images(downsample(images_to_float(image[None]), 16)))[0]
  small_keep = np.asarray(downsample(jnp.asarray(keep[None, ..., None], jnp.float32), 16)
                          )[0, ..., 0] >= 1 - 1e-4
  assert 0 < small_keep.sum() < keep.sum() / 4
  # (To 1 of 255: the resize of a batch of 3 and of 1 may round differently by an ulp, and
  # uint8 conversion turns that into 1 at a .5 boundary. The final stage needs no resize.)
  for out in base:
    assert np.abs(out[small_keep].astype(int) - small_image[small_keep]).max() <= 1
    assert np.abs(out[~small_keep].astype(int) - small_image[~small_keep]).max() > 8
  # A mask of ones gives the image back at every stage.
  base, final = cascade.inpaint(image, np.ones((32, 32)), prompts, resample_steps=2,
                                progress=False)
  np.testing.assert_array_equal(final, np.broadcast_to(image, final.shape))
  assert np.abs(base.astype(int) - small_image).max() <= 1
