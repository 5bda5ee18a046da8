"""`python -m imagen_jax.summarize`: FLOPs counted from jaxprs (closed forms, XLA's own
count), per-device memory from the training shardings (real and abstract meshes agree),
the table / JSON output and the CLI."""
import json
import math
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import imagen_base64, imagen_cascade
from imagen_jax import summarize
from imagen_jax.models import UNet, UNetConfig, dummy_inputs, layers
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.train import stages as stages_lib
from imagen_jax.train.state import abstract_train_state, make_optimizer

import background

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _flops(fn, *args):
  return summarize.jaxpr_flops(jax.make_jaxpr(fn)(*args))


def test_flops_closed_forms():
  x = jnp.zeros((2, 6, 6, 4))
  dense = layers.Dense(5)
  p = jax.eval_shape(dense.init, jax.random.key(0), x)
  assert _flops(lambda p, x: dense.apply(p, x), p, x) == 2 * (2 * 6 * 6) * 4 * 5
  conv = layers.Conv(8, 3)
  p = jax.eval_shape(conv.init, jax.random.key(0), x)
  fwd = 2 * (2 * 6 * 6 * 8) * (9 * 4)
  assert _flops(lambda p, x: conv.apply(p, x), p, x) == fwd
  # Backward of a conv: the input gradient and the kernel gradient each cost a forward;
  # the jaxpr of a gradient also holds the forward pass.
  loss = lambda p, x: jnp.sum(conv.apply(p, x))
  assert _flops(jax.grad(loss, argnums=(0, 1)), p, x) == 3 * fwd
  # A strided conv's input gradient convolves a dilated (zero-filled) input: only the
  # forward's multiply-adds count.
  down = layers.Conv(8, 3, stride=2)
  p = jax.eval_shape(down.init, jax.random.key(0), x)
  fwd = 2 * (2 * 3 * 3 * 8) * (9 * 4)
  assert _flops(lambda p, x: down.apply(p, x), p, x) == fwd
  assert _flops(jax.grad(lambda x, p: jnp.sum(down.apply(p, x))), x, p) == 2 * fwd
  # Attention einsums are dot_generals; a scan counts its body `length` times.
  q = jnp.zeros((2, 10, 3, 4))
  assert _flops(lambda q: layers.attention(q, q, q), q) == 2 * (2 * 3 * 10 * 10 * 4) * 2
  w = jnp.zeros((7, 7))
  body = lambda c, _: (c @ w, None)
  assert _flops(lambda c: jax.lax.scan(body, c, None, length=5)[0], jnp.zeros((3, 7))) == \
      5 * 2 * 3 * 7 * 7


TINY = UNetConfig(base_channels=16, channel_mults=(1, 2), num_res_blocks=(1, 2),
                  self_attn_levels=(1,), cross_attn_levels=(0, 1), attn_heads=2,
                  attn_head_dim=8, text_dim=12, cond_dim=32, num_groups=4, efficient=True,
                  lowres_cond=True)


def test_unet_flops_agree_with_xla_cost_analysis():
  """XLA's HLO cost analysis counts elementwise ops too but skips the zero padding of
  convolutions at the borders; on this 16x16 U-Net the two counts agree within 15%."""
  model = UNet(TINY)
  x, t, cond = dummy_inputs(TINY, 16, 2, 5)
  params = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), x, t, cond))["params"]
  fwd = lambda p, x, t, c: model.apply({"params": p}, x, t, c)
  ours = _flops(fwd, params, x, t, cond)
  xla = jax.jit(fwd).lower(params, x, t, cond).cost_analysis()["flops"]
  assert abs(xla / ours - 1) < 0.15, (ours, xla)
  # Forward + backward with respect to the params: ~3 forwards (the stem's input
  # gradient is not needed).
  train = _flops(jax.grad(lambda p, x, t, c: jnp.mean(fwd(p, x, t, c) ** 2)),
                 params, x, t, cond)
  assert 2.8 < train / ours <= 3.0, train / ours


def test_train_flops_per_image_of_a_crop_trained_stage():
  # sr1024 trains on 64x64 crops and samples at 256x256: 16x the pixels per forward.
  config = imagen_cascade.get_config("tiny")
  config.stages.sr1024.unet.remat = "full"  # model FLOPs: remat's recomputation not counted
  train = summarize.train_flops_per_image(config, "sr1024")
  sample = summarize.sample_flops_per_image(config, "sr1024")
  assert 14 < sample / (train / 3) < 17, sample / train


def _shard_bytes(tree, shardings):
  return sum(math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
             for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)))


@pytest.mark.parametrize("stage", ["base", "sr256"])  # Adafactor, Adam
def test_memory_uses_the_training_shardings(stage):
  """Per-device bytes on an AbstractMesh equal those of the shardings `create_train_state`
  uses on a real 8-device mesh (params, optimizer state, EMA), and FSDP divides them."""
  config = imagen_cascade.get_config("tiny")
  mesh_shape = {"data": 4, "fsdp": 2, "tensor": 1}
  real = mesh_lib.make_mesh(mesh_shape)
  rules = mesh_lib.rules_from_config(config.axis_rules)
  spec = stages_lib.stage_spec(config, stage)
  abstract, shardings = abstract_train_state(
      UNet(spec.unet), summarize._stage_inputs(spec, 8, spec.resolution),
      make_optimizer(spec.optimizer), mesh=real, rules=rules)
  expected = {"params": _shard_bytes(abstract.params, shardings.params),
              "opt_state": _shard_bytes(abstract.opt_state, shardings.opt_state),
              "ema": _shard_bytes(abstract.ema_params, shardings.ema_params)}
  got = summarize.state_memory_per_device(config, stage, summarize.abstract_mesh(mesh_shape, 8))
  assert {k: got[k] for k in expected} == expected
  assert got["total"] == sum(expected.values())
  unsharded = summarize.state_memory_per_device(
      config, stage, summarize.abstract_mesh({"data": -1, "fsdp": 1, "tensor": 1}, 8))
  n = sum(math.prod(x.shape) for x in jax.tree.leaves(summarize.abstract_params(spec)))
  assert unsharded["params"] == unsharded["ema"] == 4 * n
  assert 0.5 * unsharded["params"] <= got["params"] < 0.6 * unsharded["params"]
  if stage == "sr256":  # Adam: two moments per parameter
    assert 2 * unsharded["params"] < unsharded["opt_state"] < 2 * unsharded["params"] + 64
  else:  # Adafactor: one second moment (factored for dims >= 128; none are, this tiny)
    assert unsharded["params"] < unsharded["opt_state"] < 1.01 * unsharded["params"]


def test_summary_of_a_pod_mesh_that_is_not_present():
  config = imagen_cascade.get_config("tiny")
  summary = summarize.summarize(config, num_devices=256, mesh_shape={"data": -1, "fsdp": 8},
                                stages=["sr1024"], text_flops=False)
  assert summary["mesh"] == {"data": 32, "fsdp": 8, "tensor": 1}  # tensor: from config.mesh
  assert summary["num_devices"] == 256
  assert json.loads(json.dumps(summary)) == summary
  (row,) = summary["stages"]
  spec = stages_lib.stage_spec(config, "sr1024")
  assert row["params"] == spec.unet.num_params(64, 8, 16)
  assert row["memory_per_device"] == summarize.state_memory_per_device(
      config, "sr1024", summarize.abstract_mesh(summary["mesh"], 256))
  table = summarize.format_table(summary)
  assert "| sr1024 | 64->256 (trains on 64 crops) |" in table
  with pytest.raises(ValueError, match="does not divide"):
    summarize.summarize(config, num_devices=12, mesh_shape={"data": -1, "fsdp": 8})
  assert summarize.parse_mesh("data=-1, fsdp=8") == {"data": -1, "fsdp": 8}
  with pytest.raises(ValueError, match="NAME=SIZE"):
    summarize.parse_mesh("data")


def summarize_cli_json(tmp_path):
  """The CLI's JSON summary of a tiny config on 64 devices (run in the background lane,
  tests/background.py, beside the in-process tests)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return background.run(
      [sys.executable, "-m", "imagen_jax.summarize",
       f"--config={os.path.join(ROOT, 'configs', 'imagen_base64.py')}:tiny",
       "--num_devices=64", "--mesh=data=-1,fsdp=4", "--json"],
      cwd=ROOT, env=env, timeout=300)


@pytest.mark.background.with_args(summarize_cli_json)
def test_cli_json():
  out = background.result(summarize_cli_json)
  assert out.returncode == 0, out.stderr[-3000:]
  summary = json.loads(out.stdout)
  assert summary["mesh"] == {"data": 16, "fsdp": 4, "tensor": 1}
  (row,) = summary["stages"]
  assert row["stage"] == "base" and row["optimizer"] == "adafactor"
  assert row["params"] > 0 and row["memory_per_device"]["total"] > 0
  assert 2.8 < row["train_flops_per_image"] / row["sample_flops_per_image"] <= 3.0
  assert summary["text"]["flops_per_caption"] > 0


def test_paper_base_fits_a_v4_chip_on_the_v4_256_mesh():
  """Issue 5: the 2B base under the paper's 256-chip mesh (data 32 x fsdp 8), by the
  summarize numbers: params + Adafactor state + EMA per chip, with room left of a TPU v4
  chip's 32 GiB HBM for activations (summarize does not count those)."""
  config = imagen_base64.get_config()
  mesh = summarize.abstract_mesh({"data": -1, "fsdp": 8, "tensor": 1}, 256)
  memory = summarize.state_memory_per_device(config, "base", mesh)
  params = stages_lib.stage_spec(config, "base").unet.num_params(64)
  assert 1.9e9 < params < 2.1e9
  # fsdp shards params and EMA 8 ways: ~4 bytes x 2.03B / 8 each (to within replicated
  # norms and biases).
  assert memory["params"] < 1.05 * 4 * params / 8
  assert memory["total"] < 4 * 2**30  # ~2.1 GiB of the chip's 32 GiB
