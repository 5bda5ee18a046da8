"""The paper's U-Nets (configs/imagen_*.py): sizes within 5% of the paper's, the structure
the variants share, config validation, and fully convolutional 256->1024 SR (a real train
step on crops, the same params at full size).

The paper-sized models are only ever traced (jax.eval_shape): nothing allocates 2B params.
The switches are tested in tests/test_unet_switches.py.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import imagen_base64, imagen_cascade, imagen_sr256, imagen_sr1024
from imagen_jax import summarize
from imagen_jax.models import UNet, dummy_inputs
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.text import T5Encoder, init_params
from imagen_jax.train import stages as stages_lib
from imagen_jax.train.loop import example_inputs
from imagen_jax.train.state import create_train_state, make_optimizer
from imagen_jax.train.step import make_train_step, random_crop_pair

STAGE_FILES = {"base": imagen_base64, "sr256": imagen_sr256, "sr1024": imagen_sr1024}
PAPER_PARAMS = {"base": 2.0e9, "sr256": 600e6, "sr1024": 400e6}


def _spec(config, name):
  return stages_lib.stage_spec(config, name)


# ---- Sizes and structure. ----

@pytest.mark.parametrize("name", ["base", "sr256", "sr1024"])
def test_paper_stage_within_5_percent_of_the_paper(name):
  spec = _spec(STAGE_FILES[name].get_config(), name)
  assert spec.unet.text_dim == 4096  # T5-XXL
  params = summarize.abstract_params(spec)  # eval_shape: no allocation
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  assert abs(count / PAPER_PARAMS[name] - 1) < 0.05, (name, count)


def test_variants_share_the_paper_structure():
  cascades = {v: imagen_cascade.get_config(v) for v in ("", "small", "tiny")}
  for name in ("base", "sr256", "sr1024"):
    specs = {v: _spec(c, name) for v, c in cascades.items()}
    # The stage files alone give the same stage as the cascade.
    assert STAGE_FILES[name].get_config("tiny").stages[name] == cascades["tiny"].stages[name]
    for spec in specs.values():
      u = spec.unet
      levels = u.num_levels
      assert levels == 4 and u.dropout == 0.0
      blocks = u.blocks_per_level
      if name == "base":
        assert u.channel_mults == (1, 2, 3, 4) and not u.efficient and u.space_to_depth == 1
        # self- and cross-attention at 32, 16, 8 of a 64 image (levels 1-3)
        assert u.self_attn_levels == u.cross_attn_levels == (1, 2, 3)
        assert spec.lowres_resolution == 0 and spec.diffusion.schedule == "cosine"
        assert spec.optimizer.name == "adafactor"
      else:
        assert u.efficient and u.channel_mults == (1, 2, 4, 8)
        assert list(blocks) == sorted(blocks) and blocks[-1] > blocks[0]  # more blocks low
        assert u.cross_attn_levels == (levels - 1,)  # text only at the lowest resolution
        assert u.self_attn_levels == ((levels - 1,) if name == "sr256" else ())
        assert u.attn_heads * u.attn_head_dim == 2 * u.level_channels[-1]  # hidden 2 x ch
        assert spec.resolution == 4 * spec.lowres_resolution
        assert spec.optimizer.name == "adam"
        assert spec.diffusion.schedule == ("cosine" if name == "sr256" else "linear")
    paper, small, tiny = specs[""], specs["small"], specs["tiny"]
    assert paper.resolution == small.resolution == {"base": 64, "sr256": 256,
                                                    "sr1024": 1024}[name]
    assert paper.unet.blocks_per_level == small.unet.blocks_per_level
    if name == "sr1024":
      assert paper.train_crop == 256 and small.train_crop == 256 and tiny.train_crop == 64
  assert cascades[""].text.d_model == 4096 and cascades[""].text.checkpoint.endswith(
      "t5_1_1_xxl/checkpoint_1000000")
  assert cascades[""].stage_order == ("base", "sr256", "sr1024")


@pytest.mark.parametrize("variant", ["", "small", "tiny"])
def test_configs_validate(variant):
  mesh = mesh_lib.make_mesh({"data": -1, "fsdp": 8 if variant == "" else 1, "tensor": 1})
  specs = stages_lib.validate(imagen_cascade.get_config(variant), mesh)
  assert [s.name for s in specs] == ["base", "sr256", "sr1024"]
  for name, module in STAGE_FILES.items():  # each stage file is a config of its own
    assert [s.name for s in stages_lib.validate(module.get_config(variant), mesh)] == [name]


def test_train_crop_is_validated():
  config = imagen_sr1024.get_config("tiny")
  mesh = mesh_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  config.stages.sr1024.train_crop = 66
  with pytest.raises(ValueError, match=r"train_crop=66 must be a multiple of .* = 4"):
    stages_lib.validate(config, mesh)
  config.stages.sr1024.train_crop = 36  # a multiple of 4 but not of the U-Net's 16
  with pytest.raises(ValueError, match=r"train_crop=36: .*multiple of"):
    stages_lib.validate(config, mesh)
  base = imagen_base64.get_config("tiny")
  base.stages.base.train_crop = 8
  with pytest.raises(ValueError, match="super-resolution stages"):
    stages_lib.validate(base, mesh)


# ---- A train step of each tiny stage; fully convolutional 256->1024 SR. ----

def _random_batch(spec, max_length, seed=0):
  rng = np.random.default_rng(seed)
  b, r = spec.train.batch_size, spec.resolution
  tokens = rng.integers(2, 32000, (b, max_length)).astype(np.int32)
  tokens[:, -3:] = 0
  tokens[:, -4] = 1
  return {"image": rng.integers(0, 256, (b, r, r, 3), dtype=np.uint8), "text_tokens": tokens}


@pytest.fixture(scope="module")
def sr1024_trained():
  """Two real train steps of the tiny 256->1024 stage (Adam, Efficient U-Net, 64x64 crops of
  256x256 images): the path `python -m imagen_jax.train` compiles. The other tiny stages
  share its code paths (base: tests/test_train.py's standard U-Net; Adafactor's sharding:
  tests/test_summarize.py); compilation is what this file spends its time on (~40 ms per
  parameter leaf for init alone), so the U-Net keeps one of its four levels, with
  cross-attention: cropping, the Efficient U-Net's blocks and space-to-depth do not
  depend on depth."""
  config = imagen_sr1024.get_config("tiny")
  config.stages.sr1024.unet.update(channel_mults=(1,), num_res_blocks=(1,),
                                   self_attn_levels=(), cross_attn_levels=(0,))
  mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  rules = mesh_lib.rules_from_config(config.axis_rules)
  t5 = stages_lib.t5_config(config)
  text_params = jax.device_put(init_params(t5, 0), NamedSharding(mesh, P()))
  (spec,) = stages_lib.validate(config, mesh)
  unet = UNet(spec.unet)
  optimizer = make_optimizer(spec.optimizer)
  state, shardings = create_train_state(
      unet, example_inputs(spec, t5.d_model, config.text.max_length), optimizer,
      rng=jax.random.key(0), mesh=mesh, rules=rules)
  step = make_train_step(unet, T5Encoder(t5), spec.diffusion, optimizer,
                         ema_decay=spec.optimizer.ema_decay,
                         lowres_resolution=spec.lowres_resolution, train_crop=spec.train_crop)
  metrics = []
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    step = jax.jit(step, in_shardings=(shardings, mesh_lib.batch_sharding(mesh, rules), None))
    for seed in range(2):  # the first step's learning rate is 0 (warmup)
      batch = mesh_lib.host_to_global(_random_batch(spec, config.text.max_length, seed), mesh,
                                      rules)
      state, m = step(state, batch, text_params)
      metrics.append(jax.device_get(m))
  return spec, state, metrics


def test_tiny_sr1024_trains_on_crops(sr1024_trained):
  spec, state, metrics = sr1024_trained
  assert (spec.train_crop, spec.resolution, spec.lowres_resolution) == (64, 256, 64)
  for m in metrics:
    assert np.isfinite(m["loss"]) and not m["nonfinite"] and m["grad_norm"] > 0
  assert int(state.step) == 2


def test_sr1024_same_params_at_training_crop_and_full_resolution(sr1024_trained):
  """Trained on 64x64 crops (of 256x256 images, from 16x16 low-res crops), the tiny
  256->1024 stand-in runs at its full 256x256 (from 64x64) with the same params."""
  spec, state, _ = sr1024_trained
  params = jax.device_get(state.params)
  model = UNet(spec.unet)
  apply = jax.jit(lambda p, x, t, c: model.apply({"params": p}, x, t, c))
  rng = np.random.default_rng(0)
  outs = {}
  for size in (spec.train_crop, spec.resolution):
    x, t, cond = dummy_inputs(spec.unet, size, 2, 6, lowres_size=size // 4)
    x = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    cond["text"] = jnp.asarray(rng.standard_normal(cond["text"].shape), jnp.float32)
    cond["lowres"] = jnp.asarray(rng.uniform(-1, 1, cond["lowres"].shape), jnp.float32)
    outs[size] = np.asarray(apply(params, x, jnp.full((2,), 0.5), cond))
    assert outs[size].shape == (2, size, size, 3) and np.all(np.isfinite(outs[size]))
    assert np.abs(outs[size]).max() > 0  # the trained out conv is no longer zero


def test_random_crop_pair_takes_the_same_region():
  # Pixel values encode their coordinates; the low-res copy is every 4th pixel, so an
  # aligned pair of crops satisfies hi[::4, ::4] == lo exactly.
  b, res, factor, crop = 6, 32, 4, 16
  ii, jj = np.meshgrid(np.arange(res), np.arange(res), indexing="ij")
  x0 = np.stack([ii, jj, ii * res + jj], -1).astype(np.float32)
  x0 = jnp.asarray(np.broadcast_to(x0, (b, res, res, 3)) + 1000 * np.arange(b)[:, None, None, None])
  lowres = x0[:, ::factor, ::factor]
  hi, lo = jax.jit(random_crop_pair, static_argnums=2)(x0, lowres, crop, jax.random.key(3))
  assert hi.shape == (b, crop, crop, 3) and lo.shape == (b, crop // factor, crop // factor, 3)
  np.testing.assert_array_equal(hi[:, ::factor, ::factor], lo)
  top, left = np.asarray(hi[:, 0, 0, 0]) % 1000, np.asarray(hi[:, 0, 0, 1]) % 1000
  assert np.all(top % factor == 0) and np.all(left % factor == 0)
  assert np.all(top <= res - crop) and np.all(left <= res - crop)
  assert len(set(zip(top, left))) > 1  # per-example offsets
  # Each crop is a contiguous block of its own image.
  np.testing.assert_array_equal(hi[:, :, :, 0] % 1000 - top[:, None, None],
                                np.broadcast_to(np.arange(crop)[None, :, None], (b, crop, crop)))
