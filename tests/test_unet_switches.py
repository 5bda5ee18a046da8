"""The U-Net's memory / speed switches (UNetConfig.remat, attention_impl, dtype): each
leaves the parameters, outputs and (remat, attention) gradients unchanged within a stated
tolerance, and bfloat16 compute is honoured by every convolution and matmul while norms
and softmaxes stay float32."""
import collections
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax import summarize
from imagen_jax.models import UNet, UNetConfig, dummy_inputs

# Small, but with every attention kind (self, cross, pooling), a fully masked text row,
# the Efficient ordering and the low-res input: compile time is what these tests spend (one
# level: 28 s for the file, cold, against 39 s with two).
SWITCH = UNetConfig(base_channels=8, channel_mults=(1,), num_res_blocks=1,
                    self_attn_levels=(0,), cross_attn_levels=(0,), attn_heads=2,
                    attn_head_dim=8, text_dim=12, cond_dim=16, num_groups=4,
                    efficient=True, lowres_cond=True, space_to_depth=2)


def _inputs(cfg, seed=0):
  rng = np.random.default_rng(seed)
  x, t, cond = dummy_inputs(cfg, 8, 3, 5, lowres_size=4)
  x = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
  t = jnp.asarray([0.1, 0.5, 0.9], jnp.float32)
  cond["text"] = jnp.asarray(rng.standard_normal(cond["text"].shape), jnp.float32)
  # A partly masked row, a fully masked one (dropped text), a full one.
  cond["text_mask"] = jnp.asarray([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], bool)
  cond["lowres"] = jnp.asarray(rng.uniform(-1, 1, cond["lowres"].shape), jnp.float32)
  cond["lowres_aug_t"] = jnp.asarray([0.0, 0.2, 0.4], jnp.float32)
  return x, t, cond


def _random_params(cfg, seed=3):
  """Random params of the right shapes (numpy; zero-initialised layers made non-zero)."""
  shapes = nn.unbox(jax.eval_shape(UNet(cfg).init, jax.random.key(0), *_inputs(cfg)))["params"]
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    fan_in = int(np.prod(leaf.shape[:-1])) if leaf.ndim > 1 else 100
    value = rng.standard_normal(leaf.shape) / np.sqrt(fan_in)
    if jax.tree_util.keystr(path).endswith("['scale']"):
      value = value + 1.0
    return jnp.asarray(value, jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def _forward(cfg, params, inputs):
  model = UNet(cfg)
  return jax.jit(lambda p: model.apply({"params": p}, *inputs))(params)


def _out_and_grad(cfg, params, inputs):
  """(output, gradient of a mean squared error w.r.t. the params), one compile."""
  model = UNet(cfg)

  def loss(p):
    out = model.apply({"params": p}, *inputs)
    return jnp.mean(jnp.square(out - inputs[0])), out

  (_, out), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return out, grad


@pytest.fixture(scope="module")
def reference():
  params = _random_params(SWITCH)
  inputs = _inputs(SWITCH)
  return params, inputs, _out_and_grad(SWITCH, params, inputs)


def _assert_close(actual, expected, rel):
  """|actual - expected| <= rel x max |expected| (leaf by leaf)."""
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    a, e = np.asarray(a), np.asarray(e)
    np.testing.assert_allclose(a, e, rtol=0, atol=rel * (np.abs(e).max() + 1e-12))


def test_dot_product_attention_matches_einsum(reference):
  """attention_impl='xla' (jax.nn.dot_product_attention), float32: outputs within 1e-5 of
  the largest value of the explicit einsum + softmax, partly and fully masked text rows
  included. ('cudnn' needs an NVIDIA GPU and bfloat16; it is not run here.)"""
  params, inputs, (out_ref, _) = reference
  out = _forward(dataclasses.replace(SWITCH, attention_impl="xla"), params, inputs)
  assert np.abs(np.asarray(out_ref)).max() > 1e-2  # a non-trivial output
  _assert_close(out, out_ref, 1e-5)


@pytest.mark.parametrize("remat", ["full", "dots_saveable"])
def test_remat_leaves_params_outputs_and_gradients_unchanged(reference, remat):
  """Rematerialisation recomputes the same ops: the same param tree, outputs within 1e-6
  and every gradient leaf within 1e-5 of its largest value (float32; XLA fuses the
  recomputed ops differently, hence not bit for bit)."""
  params, inputs, (out_ref, grad_ref) = reference
  cfg = dataclasses.replace(SWITCH, remat=remat)
  shapes = nn.unbox(jax.eval_shape(UNet(cfg).init, jax.random.key(0), *inputs))["params"]
  assert jax.tree.map(lambda s: s.shape, shapes) == jax.tree.map(lambda p: p.shape, params)
  out, grad = _out_and_grad(cfg, params, inputs)
  _assert_close(out, out_ref, 1e-6)
  _assert_close(grad, grad_ref, 1e-5)
  # ...and the backward pass does recompute: the gradient's jaxpr holds remat blocks.
  model = UNet(cfg)
  text = str(jax.make_jaxpr(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, *inputs))))(
      params))
  assert text.count("remat") + text.count("checkpoint") >= 5


def _primitive_dtypes(jaxpr):
  """{primitive name: [(operand dtypes, operand shapes)]}, sub-jaxprs included."""
  seen = collections.defaultdict(list)

  def walk(j):
    for eqn in j.eqns:
      avals = [v.aval for v in eqn.invars if hasattr(v, "aval")]
      seen[eqn.primitive.name].append(([str(a.dtype) for a in avals],
                                       [tuple(a.shape) for a in avals]))
      for value in eqn.params.values():
        for sub in summarize._sub_jaxprs(value):
          walk(sub)

  walk(jaxpr.jaxpr)
  return seen


@pytest.mark.parametrize("impl", ["einsum", "xla"])
def test_bfloat16_is_honoured_everywhere(reference, impl):
  """dtype='bfloat16': every convolution and matmul of the U-Net takes bfloat16 operands
  (the only float32 ones are the bilinear resize of the low-res input, done before the
  network), norm statistics (rsqrt) and softmaxes (exp) stay float32, and the float32
  output is within 5% (of the largest value; as tests/test_unet.py) of float32 compute."""
  params, inputs, (out_ref, _) = reference
  cfg = dataclasses.replace(SWITCH, dtype="bfloat16", attention_impl=impl)
  model = UNet(cfg)
  seen = _primitive_dtypes(jax.make_jaxpr(lambda p: model.apply({"params": p}, *inputs))(params))
  assert len(seen["dot_general"]) > 20 and len(seen["conv_general_dilated"]) > 5
  for dtypes, shapes in seen["conv_general_dilated"]:
    assert dtypes == ["bfloat16", "bfloat16"], shapes
  lowres_side, side = inputs[2]["lowres"].shape[1], inputs[0].shape[1]
  f32_dots = [shapes for dtypes, shapes in seen["dot_general"] if dtypes != ["bfloat16"] * 2]
  assert len(f32_dots) == 2, f32_dots
  for shapes in f32_dots:
    assert (lowres_side, side) in shapes, shapes  # the resize's interpolation weights
  assert seen["exp"] and all(d == ["float32"] for d, _ in seen["exp"])
  assert seen["rsqrt"] and all(d == ["float32"] for d, _ in seen["rsqrt"])
  if impl == "einsum":  # (the xla path's numerics: test_dot_product_attention_matches_einsum)
    out = _forward(cfg, params, inputs)
    assert out.dtype == jnp.float32
    err = np.abs(np.asarray(out) - np.asarray(out_ref)).max()
    assert err < 0.05 * np.abs(np.asarray(out_ref)).max(), err  # bf16: 8-bit mantissa


def test_switches_are_validated():
  for field, value in (("remat", "sometimes"), ("attention_impl", "flash"),
                       ("attn_head_channels", 5)):
    with pytest.raises(ValueError, match=field):
      dataclasses.replace(SWITCH, **{field: value}).validate(8)
