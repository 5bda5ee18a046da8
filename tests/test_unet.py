"""U-Net: shapes, logical axis names, text masking, conditioning paths, dtypes."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax.models import UNet, UNetConfig, count_params, dummy_inputs
from imagen_jax.models import layers
from imagen_jax.parallel import axes

TINY = UNetConfig(base_channels=16, channel_mults=(1, 2), num_res_blocks=1,
                  self_attn_levels=(1,), cross_attn_levels=(0, 1), attn_heads=2,
                  attn_head_dim=8, text_dim=12, cond_dim=32, num_groups=4,
                  space_to_depth=2)
SIZE, TEXT_LEN, BATCH = 8, 5, 2


def _inputs(cfg, seed=0, batch=BATCH, size=SIZE):
  # numpy randomness throughout: on this CPU every eager jax.random call with the
  # default (partitionable threefry) PRNG compiles for seconds.
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  uniform = lambda *shape: jnp.asarray(rng.uniform(-1, 1, shape), jnp.float32)
  x = normal(batch, size, size, 3)
  t = jnp.abs(uniform(batch))
  cond = {"text": normal(batch, TEXT_LEN, cfg.text_dim),
          "text_mask": jnp.array([[True, True, True, False, False],
                                  [True, False, True, True, False]][:batch])}
  if cfg.lowres_cond:
    cond["lowres"] = uniform(batch, size // 2, size // 2, 3)
    cond["lowres_aug_t"] = jnp.abs(uniform(batch))
  return x, t, cond


def _perturb(params, seed=1, only=None):
  """Adds noise to every leaf (or leaves whose path contains `only`), so that
  zero-initialised layers (the final conv, biases) stop hiding the conditioning.
  numpy noise: eager jax.random would compile one program per leaf shape."""
  rng = np.random.default_rng(seed)
  def noisy(path, leaf):
    if only is not None and only not in jax.tree_util.keystr(path):
      return leaf
    return leaf + 0.1 * rng.standard_normal(leaf.shape).astype(np.float32)
  return jax.tree_util.tree_map_with_path(noisy, params)


def _init_apply(cfg):
  """(initial params, perturbed params, jitted apply, inputs) for a config."""
  model = UNet(cfg)
  x, t, cond = _inputs(cfg)
  # An rbg key: jitted init compiles several times faster than with threefry on CPU.
  key = jax.random.key(0, impl="rbg")
  params = nn.unbox(jax.jit(model.init)(key, x, t, cond))["params"]
  apply = jax.jit(lambda p, x, t, c: model.apply({"params": p}, x, t, c))
  return params, _perturb(params), apply, (x, t, cond)


def _random_params(cfg, seed=3):
  """Random params of the right shapes without compiling init (eval_shape + numpy)."""
  model = UNet(cfg)
  x, t, cond = _inputs(cfg)
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), x, t, cond))["params"]
  rng = np.random.default_rng(seed)
  def draw(path, leaf):
    fan_in = int(np.prod(leaf.shape[:-1])) if leaf.ndim > 1 else 100
    value = rng.standard_normal(leaf.shape) / np.sqrt(fan_in)
    if jax.tree_util.keystr(path).endswith("['scale']"):
      value = value + 1.0
    return jnp.asarray(value, jnp.float32)
  params = jax.tree_util.tree_map_with_path(draw, shapes)
  apply = jax.jit(lambda p, x, t, c: model.apply({"params": p}, x, t, c))
  return params, apply, (x, t, cond)


# The tests of what init gives use a one-level TINY without attention: compiling an init
# costs ~40 ms a parameter leaf on this CPU (a random draw each), 8 s for TINY's 192, 3 s
# for this one's 75.
INIT = dataclasses.replace(TINY, channel_mults=(1,), self_attn_levels=(), cross_attn_levels=())


@pytest.fixture(scope="module")
def initialised():
  return _init_apply(INIT)


@pytest.fixture(scope="module")
def tiny_model():
  """TINY with random params (numpy; nothing hidden by zero-initialised layers)."""
  return _random_params(TINY)


# Each setting of each switch appears at least once (all 8 combinations cost 2x time).
@pytest.mark.parametrize("space_to_depth,efficient,lowres_cond",
                         [(1, False, False), (2, True, False), (1, True, True),
                          (2, False, True)])
def test_output_shape_all_variants(space_to_depth, efficient, lowres_cond):
  cfg = dataclasses.replace(TINY, space_to_depth=space_to_depth, efficient=efficient,
                            lowres_cond=lowres_cond, num_res_blocks=(1, 2))
  model = UNet(cfg)
  x, t, cond = _inputs(cfg, size=16)
  variables = jax.eval_shape(model.init, jax.random.key(0), x, t, cond)
  out = jax.eval_shape(model.apply, variables, x, t, cond)
  assert out.shape == x.shape and out.dtype == jnp.float32


@pytest.mark.parametrize("cfg", [TINY, dataclasses.replace(TINY, efficient=True,
                                                           lowres_cond=True)],
                         ids=["base", "sr_efficient"])
def test_every_param_has_logical_names_of_right_rank(cfg):
  x, t, cond = _inputs(cfg)
  variables = jax.eval_shape(UNet(cfg).init, jax.random.key(0), x, t, cond)
  is_box = lambda v: isinstance(v, nn.LogicallyPartitioned)
  leaves = jax.tree.leaves(variables["params"], is_leaf=is_box)
  vocabulary = {v for k, v in vars(axes).items() if k.isupper() and isinstance(v, str)}
  assert len(leaves) > 50
  for leaf in leaves:
    assert is_box(leaf), f"unnamed parameter: {leaf}"
    assert len(leaf.names) == leaf.value.ndim, (leaf.names, leaf.value.shape)
    assert set(leaf.names) <= vocabulary, leaf.names
    assert len(set(leaf.names)) == len(leaf.names), f"repeated axis {leaf.names}"
    assert leaf.value.dtype == jnp.float32
  specs = jax.tree.leaves(nn.get_partition_spec(variables["params"]),
                          is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
  conv_spec = (axes.CONV_H, axes.CONV_W, axes.CONV_IN, axes.CONV_OUT)
  assert sum(tuple(s) == conv_spec for s in specs) >= 10


def test_param_count_matches_init_and_final_conv_is_zero(initialised):
  x, t, cond = _inputs(TINY)
  shapes = jax.eval_shape(UNet(TINY).init, jax.random.key(0), x, t, cond)["params"]
  assert count_params(TINY, SIZE, TEXT_LEN) == sum(p.size for p in jax.tree.leaves(shapes))
  initial, _, apply, (x, t, cond) = initialised
  assert count_params(INIT, SIZE, TEXT_LEN) == sum(p.size for p in jax.tree.leaves(initial))
  assert not np.any(np.asarray(initial["out_conv"]["kernel"]))
  np.testing.assert_array_equal(apply(initial, x, t, cond), 0.0)


def test_masked_text_tokens_have_no_effect(tiny_model):
  params, apply, (x, t, cond) = tiny_model
  mask = cond["text_mask"]
  noise = 10.0 * np.random.default_rng(7).standard_normal(cond["text"].shape)
  out = apply(params, x, t, cond)
  masked_changed = dict(cond, text=jnp.where(mask[..., None], cond["text"], noise))
  np.testing.assert_allclose(apply(params, x, t, masked_changed), out, atol=1e-6)
  # Sanity check that the test can fail: changing a real token does change the output.
  real_changed = dict(cond, text=cond["text"].at[:, 0].set(noise[:, 0]))
  assert np.abs(apply(params, x, t, real_changed) - out).max() > 1e-3


def test_all_masked_row_is_null_conditioning(tiny_model):
  params, apply, (x, t, cond) = tiny_model
  dropped = cond["text_mask"].at[0].set(False)
  other_text = jnp.asarray(np.random.default_rng(9).standard_normal(cond["text"].shape))
  out_a = apply(params, x, t, dict(cond, text_mask=dropped))
  out_b = apply(params, x, t, dict(text=other_text, text_mask=dropped))
  assert np.all(np.isfinite(out_a))
  np.testing.assert_allclose(out_a[0], out_b[0], atol=1e-6)
  # The null conditioning differs from the real text, and row 1 still sees its text.
  out_full = apply(params, x, t, cond)
  assert np.abs(out_a[0] - out_full[0]).max() > 1e-3
  assert np.abs(out_a[1] - out_b[1]).max() > 1e-3
  np.testing.assert_allclose(out_a[1], out_full[1], atol=1e-5)


def test_time_changes_output_with_only_final_conv_perturbed(initialised):
  initial, _, apply, (x, t, cond) = initialised
  params = _perturb(initial, only="out_conv")
  out1 = apply(params, x, jnp.full_like(t, 0.1), cond)
  out2 = apply(params, x, jnp.full_like(t, 0.7), cond)
  assert np.abs(out1 - out2).max() > 1e-3


def test_sr_model_depends_on_lowres_and_aug_level():
  cfg = dataclasses.replace(TINY, lowres_cond=True, efficient=True)
  params, apply, (x, t, cond) = _random_params(cfg)
  out = apply(params, x, t, cond)
  assert out.shape == x.shape
  other_lowres = dict(cond, lowres=-cond["lowres"])
  assert np.abs(apply(params, x, t, other_lowres) - out).max() > 1e-3
  other_aug = dict(cond, lowres_aug_t=1.0 - cond["lowres_aug_t"])
  assert np.abs(apply(params, x, t, other_aug) - out).max() > 1e-3


def test_bfloat16_compute_close_to_float32(tiny_model):
  params, apply, (x, t, cond) = tiny_model
  bf16 = UNet(dataclasses.replace(TINY, dtype="bfloat16"))
  out16 = jax.jit(lambda p: bf16.apply({"params": p}, x, t, cond))(params)
  out32 = apply(params, x, t, cond)
  assert out16.dtype == jnp.float32
  err = np.abs(np.asarray(out16) - np.asarray(out32)).max()
  assert err < 0.05 * np.abs(np.asarray(out32)).max(), err


def test_validate_rejects_bad_sizes_and_levels():
  cfg = UNetConfig(channel_mults=(1, 2, 2))
  cfg.validate(32)
  with pytest.raises(ValueError, match=r"image size.*multiple of.*= 4"):
    cfg.validate(30)
  with pytest.raises(ValueError, match="= 8"):
    dataclasses.replace(cfg, space_to_depth=2).validate(36)
  with pytest.raises(ValueError, match="cross_attn_levels"):
    dataclasses.replace(cfg, cross_attn_levels=(3,)).validate(32)
  with pytest.raises(ValueError, match="num_groups"):
    dataclasses.replace(cfg, base_channels=48, num_groups=32).validate(32)
  with pytest.raises(ValueError, match="num_res_blocks"):
    dataclasses.replace(cfg, num_res_blocks=(2, 2)).validate(32)
  # The model validates at trace time, before anything compiles.
  x, t, cond = dummy_inputs(cfg, 32)
  with pytest.raises(ValueError, match="image size"):
    jax.eval_shape(UNet(cfg).init, jax.random.key(0), x[:, :30, :30], t, cond)
  sr = dataclasses.replace(cfg, lowres_cond=True)
  with pytest.raises(ValueError, match="lowres"):
    jax.eval_shape(UNet(sr).init, jax.random.key(0), x, t, cond)


def test_config_from_lists_is_hashable():
  cfg = UNetConfig(channel_mults=[1, 2], self_attn_levels=[1], cross_attn_levels=[1],
                   num_res_blocks=[1, 2])
  assert cfg.channel_mults == (1, 2) and cfg.num_res_blocks == (1, 2)
  hash(cfg)


def test_group_norm_matches_flax_reference():
  rng = np.random.default_rng(0)
  # A large mean relative to the spread: one-pass E[x^2] - E[x]^2 would lose it.
  x = (1000.0 + 2.0 * rng.standard_normal((2, 4, 4, 12))).astype(np.float32)
  p = {"params": {"scale": 1.0 + rng.standard_normal(12).astype(np.float32),
                  "bias": rng.standard_normal(12).astype(np.float32)}}
  scale, shift = rng.standard_normal((2, 2, 12)).astype(np.float32)
  ours = jax.jit(lambda p, x, ss: layers.GroupNorm(num_groups=4).apply(p, x, ss))
  ref = jax.jit(nn.GroupNorm(num_groups=4, epsilon=1e-5, use_fast_variance=False).apply)(p, x)
  np.testing.assert_allclose(ours(p, x, None), ref, atol=1e-3)
  # The fused FiLM equals applying (1 + scale), shift after the norm.
  expected = ref * (1 + scale[:, None, None]) + shift[:, None, None]
  np.testing.assert_allclose(ours(p, x, (scale, shift)), expected, atol=1e-3)


def test_group_norm_gradients_match_flax_and_each_dx_is_materialized():
  """Our GroupNorm's gradients (input, affine, FiLM) equal flax's GroupNorm followed by
  the FiLM, and its input gradient passes one optimization barrier (materialize_grad),
  which is what stops XLA from recomputing it in every consumer."""
  rng = np.random.default_rng(1)
  x = (0.5 + rng.standard_normal((2, 4, 4, 12))).astype(np.float32)
  p = {"params": {"scale": 1.0 + rng.standard_normal(12).astype(np.float32),
                  "bias": rng.standard_normal(12).astype(np.float32)}}
  ss = tuple(rng.standard_normal((2, 2, 12)).astype(np.float32))
  probe = rng.standard_normal(x.shape).astype(np.float32)
  flax_norm = nn.GroupNorm(num_groups=4, epsilon=1e-5, use_fast_variance=False)

  def ours(p, x, ss):
    return jnp.vdot(layers.GroupNorm(num_groups=4).apply(p, x, ss), probe)

  def reference(p, x, ss):
    y = flax_norm.apply(p, x) * (1 + ss[0][:, None, None]) + ss[1][:, None, None]
    return jnp.vdot(y, probe)

  grads = jax.jit(jax.grad(ours, argnums=(0, 1, 2)))(p, x, ss)
  expected = jax.jit(jax.grad(reference, argnums=(0, 1, 2)))(p, x, ss)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)

  backward = str(jax.make_jaxpr(jax.grad(ours, argnums=1))(p, x, ss))
  assert backward.count("optimization_barrier") == 1, backward


def test_cpu_conv3x3_gradients_match_xla_and_conv_uses_it_on_the_cpu():
  """conv_cpu.conv3x3 (filter gradient as one matmul over shifted output gradients) gives
  XLA's own convolution's output and both gradients, on square and non-square images;
  `Conv` takes it for stride-1 3x3 convs up to 32x32 on the CPU, and XLA's beyond."""
  from imagen_jax.models import conv_cpu
  rng = np.random.default_rng(2)
  plain = lambda x, k: jax.lax.conv_general_dilated(
      x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
  for b, h, w, c, o in [(2, 8, 8, 4, 6), (3, 5, 7, 3, 2), (1, 16, 16, 8, 8)]:
    x = jnp.asarray(rng.standard_normal((b, h, w, c)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((3, 3, c, o)), jnp.float32)
    probe = jnp.asarray(rng.standard_normal((b, h, w, o)), jnp.float32)
    np.testing.assert_allclose(conv_cpu.conv3x3(x, k), plain(x, k), rtol=1e-5, atol=1e-5)
    ours = jax.grad(lambda x, k: jnp.vdot(conv_cpu.conv3x3(x, k), probe), argnums=(0, 1))
    xla = jax.grad(lambda x, k: jnp.vdot(plain(x, k), probe), argnums=(0, 1))
    for got, want in zip(jax.jit(ours)(x, k), jax.jit(xla)(x, k)):
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  # An input that is not differentiated (the stem's image) gets no input-gradient conv.
  kernel_only = jax.make_jaxpr(jax.grad(lambda k: conv_cpu.conv3x3(x, k).sum()))(k)
  assert str(kernel_only).count("conv_general_dilated") == 1  # the forward alone
  np.testing.assert_allclose(jax.grad(lambda k: jnp.vdot(conv_cpu.conv3x3(x, k), probe))(k),
                             jax.grad(lambda k: jnp.vdot(plain(x, k), probe))(k),
                             rtol=1e-4, atol=1e-4)

  conv = layers.Conv(4)
  for side, expected in ((32, True), (64, False)):
    x = jnp.zeros((1, side, side, 2))
    params = jax.eval_shape(conv.init, jax.random.key(0), x)
    assert ("custom_vjp_call" in str(jax.make_jaxpr(conv.apply)(params, x))) == expected


def test_space_to_depth_folds_patches():
  x = jnp.arange(2 * 4 * 6 * 3, dtype=jnp.float32).reshape(2, 4, 6, 3)
  y = layers.space_to_depth(x, 2)
  assert y.shape == (2, 2, 3, 12)
  # Channel block (di, dj) of output pixel (i, j) is input pixel (2i + di, 2j + dj).
  np.testing.assert_array_equal(y[1, 1, 2, 3:6], x[1, 2, 5])
  np.testing.assert_array_equal(y[0, 0, 1, 6:9], x[0, 1, 2])
  np.testing.assert_array_equal(layers.depth_to_space(y, 2), x)


def test_sinusoidal_embedding_closed_form():
  t = jnp.array([0.0, 0.25])
  emb = layers.sinusoidal_embedding(t, 8)
  freqs = np.exp(-np.log(10000.0) * np.arange(4) / 4)
  expected = np.concatenate([np.sin(250.0 * freqs), np.cos(250.0 * freqs)])
  np.testing.assert_allclose(emb[1], expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(emb[0], [0, 0, 0, 0, 1, 1, 1, 1])



def test_input_to_output_skip_is_a_direct_path_from_the_input():
  # Random params (no init to compile), then only the output conv's weights on the skipped
  # input, and no bias: the prediction is then a 3x3 conv of the space-to-depth input,
  # linear in x_t and independent of t. Without the skip the same surgery would give zero.
  cfg = dataclasses.replace(TINY, input_to_output_skip=True)
  model = UNet(cfg)
  params, _, (x, t, cond) = _random_params(cfg)
  kernel = params["out_conv"]["kernel"]
  width, folded_input = cfg.base_channels, 3 * cfg.space_to_depth ** 2
  assert kernel.shape[-2] == width + folded_input
  only_skip = np.zeros(kernel.shape, np.float32)
  only_skip[..., width:, :] = np.random.default_rng(0).standard_normal(
      only_skip[..., width:, :].shape)
  params = dict(params, out_conv=dict(kernel=jnp.asarray(only_skip),
                                      bias=jnp.zeros_like(params["out_conv"]["bias"])))
  apply = jax.jit(lambda x, t: model.apply({"params": params}, x, t, cond))
  out = apply(x, t)
  assert np.abs(out).max() > 1e-2
  np.testing.assert_allclose(apply(2 * x, t), 2 * out, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(apply(x, 1.0 - t), out, rtol=1e-5, atol=1e-5)
