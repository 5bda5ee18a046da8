"""Training: config validation, sharded == single-device steps, checkpoint round trip."""
import math
import os

import flax
import flax.linen as nn
import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import shapes as shapes_config
from imagen_jax.models import UNet
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.text import T5Encoder, init_params
from imagen_jax.train import checkpoint as ckpt
from imagen_jax.train import stages as stages_lib
from imagen_jax.train.loop import example_inputs
from imagen_jax.train.state import abstract_train_state, create_train_state, make_optimizer
from imagen_jax.train.step import make_train_step

from small_configs import one_level


def tiny_config():
  return shapes_config.get_config("tiny")


def random_batch(spec, max_length, seed=0):
  rng = np.random.default_rng(seed)
  b, r = spec.train.batch_size, spec.resolution
  tokens = rng.integers(2, 32000, (b, max_length)).astype(np.int32)
  tokens[:, -3:] = 0  # padding
  tokens[:, -4] = 1   # EOS
  return {"image": rng.integers(0, 256, (b, r, r, 3), dtype=np.uint8), "text_tokens": tokens}


class StageRunner:
  """The real train step of one stage of the tiny config, on a given mesh.

  `like`: another runner of the same U-Net whose initial state this one takes, placed in
  this mesh's shardings (a `device_put`, so no second init is compiled; the sharded init
  itself runs in every CLI test). Without it, the state is built by `create_train_state`."""

  def __init__(self, config, stage, mesh_shape, devices, like=None):
    self.mesh = mesh_lib.make_mesh(mesh_shape, devices)
    self.rules = mesh_lib.rules_from_config(config.axis_rules)
    self.spec = {s.name: s for s in stages_lib.validate(config, self.mesh)}[stage]
    t5 = stages_lib.t5_config(config)
    self.max_length = config.text.max_length
    self.text_params = jax.device_put(init_params(t5, 0), NamedSharding(self.mesh, P()))
    self.optimizer = make_optimizer(self.spec.optimizer)
    self.unet = UNet(self.spec.unet)
    inputs = example_inputs(self.spec, t5.d_model, self.max_length)
    if like is None:
      self.state, self.shardings = create_train_state(
          self.unet, inputs, self.optimizer, rng=jax.random.key(0), mesh=self.mesh,
          rules=self.rules)
    else:
      _, self.shardings = abstract_train_state(self.unet, inputs, self.optimizer,
                                               mesh=self.mesh, rules=self.rules)
      self.state = jax.device_put(like.state, self.shardings)
    step = make_train_step(self.unet, T5Encoder(t5), self.spec.diffusion, self.optimizer,
                           ema_decay=self.spec.optimizer.ema_decay,
                           lowres_resolution=self.spec.lowres_resolution)
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      self.step = jax.jit(step, in_shardings=(self.shardings,
                                              mesh_lib.batch_sharding(self.mesh, self.rules),
                                              None),
                          out_shardings=(self.shardings, None))

  def run(self, state, seeds):
    losses = []
    for seed in seeds:
      batch = mesh_lib.host_to_global(random_batch(self.spec, self.max_length, seed), self.mesh,
                                      self.rules)
      with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
        state, metrics = self.step(state, batch, self.text_params)
      losses.append(float(metrics["loss"]))
    return state, losses


# ---- Config errors are caught before anything compiles. ----

def test_batch_not_divisible_by_data_axis():
  config = tiny_config()
  config.stages.base.train.batch_size = 6
  mesh = mesh_lib.make_mesh({"data": 4, "fsdp": 2, "tensor": 1})
  with pytest.raises(ValueError, match=r"config.stages.base.train.batch_size=6 is not divisible "
                                       r"by the 8 data-parallel devices"):
    stages_lib.validate(config, mesh)


def test_image_size_not_divisible_by_unet_depth():
  config = tiny_config()
  config.stages.sr.resolution = 30
  mesh = mesh_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  with pytest.raises(ValueError, match=r"config.stages.sr.unet \(resolution 30\).*multiple of"):
    stages_lib.validate(config, mesh)


def test_mesh_needs_the_available_devices():
  with pytest.raises(ValueError, match="needs 6 devices but 8 are available"):
    mesh_lib.make_mesh({"data": 3, "fsdp": 2, "tensor": 1})
  with pytest.raises(ValueError, match="does not divide"):
    mesh_lib.make_mesh({"data": -1, "fsdp": 3, "tensor": 1})


def test_rules_name_missing_mesh_axis():
  config = tiny_config()
  config.mesh = {"data": -1}
  mesh = mesh_lib.make_mesh(dict(config.mesh))
  with pytest.raises(ValueError, match="mesh axis 'fsdp'"):
    stages_lib.validate(config, mesh)


def test_stages_must_chain():
  config = tiny_config()
  config.stages.sr.lowres_resolution = 8
  with pytest.raises(ValueError, match="must equal the previous stage's resolution"):
    stages_lib.validate(config, mesh_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}))


# ---- Sharded training equals single-device training. ----

MESH_4X2 = {"data": 4, "fsdp": 2, "tensor": 1}
MESH_1 = {"data": 1, "fsdp": 1, "tensor": 1}


def one_level_config(config=None):
  """`config` (default: configs/shapes.py:tiny) with one-level U-Nets (self- and
  cross-attention at that level) in every stage: what a mesh does to a train step does not
  depend on depth, and compiling the tiny config's two-level U-Nets for two meshes took
  ~70 s a stage on 2 cores. The convolutions keep 16 input channels: fsdp shards them."""
  return one_level(tiny_config() if config is None else config)


_RUNNERS = {}


def runner(stage, mesh_shape):
  """One StageRunner of `one_level_config()` per stage and mesh for the whole session
  (module-wide). Building one
  traces, compiles and initialises its train state (a sharded runner takes the one-device
  runner's); runs never change it (`run` takes and returns states)."""
  key = (stage, tuple(mesh_shape.items()))
  if key not in _RUNNERS:
    devices = jax.devices()[:math.prod(mesh_shape.values())]
    like = None if mesh_shape == MESH_1 else runner(stage, MESH_1)
    _RUNNERS[key] = StageRunner(one_level_config(), stage, mesh_shape, devices, like=like)
  return _RUNNERS[key]


def test_sr_steps_on_4x2_mesh_equal_one_device():
  # The SR stage: the base stage's step plus the low-res conditioning and its noise
  # augmentation, so this covers both. (tests/test_multislice.py runs the minimal base
  # stage on two slices, batch over slice x data x fsdp, against one device.) Each mesh's
  # train step costs ~12 s of compilation.
  sharded = runner("sr", MESH_4X2)
  single = runner("sr", MESH_1)
  # The batch really is split over 8 devices, and the params over fsdp where rules say so.
  assert len(jax.tree.leaves(sharded.state.params)[0].devices()) == 8
  specs = [x.sharding.spec for x in jax.tree.leaves(sharded.state.params)]
  assert any("fsdp" in str(s) for s in specs), "no parameter is sharded over fsdp"

  # Three steps: with a zero-initialised output conv and a warmup that starts at lr 0,
  # the first two steps move only the output conv; the third moves the whole U-Net.
  state_a, losses_a = sharded.run(sharded.state, [1, 2, 3])
  state_b, losses_b = single.run(single.state, [1, 2, 3])
  # Tolerance: float32 reductions are ordered differently across 8 shards (all-reduces
  # of partial sums); observed differences are ~1e-7 relative.
  np.testing.assert_allclose(losses_a, losses_b, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(state_a.params), jax.tree.leaves(state_b.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
  for a, b in zip(jax.tree.leaves(state_a.ema_params), jax.tree.leaves(state_b.ema_params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
  # And training moved the parameters (the comparison above is not vacuous).
  moved = [float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in
           zip(jax.tree.leaves(state_b.params), jax.tree.leaves(single.state.params))]
  assert np.mean([m > 1e-4 for m in moved]) > 0.5, moved


# ---- Save -> restore -> the next step is identical. ----

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def test_checkpoint_round_trip_next_step_identical(tmp_path):
  sr = runner("sr", MESH_4X2)
  state, _ = sr.run(sr.state, [1])
  manager = ckpt.stage_manager(str(tmp_path), "sr")
  compiles = []

  def count_compiles(event, duration, **kwargs):
    if event == COMPILE_EVENT:
      compiles.append(duration)

  jax.monitoring.register_event_duration_secs_listener(count_compiles)
  try:
    manager.save(1, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()
  finally:
    jax.monitoring.unregister_event_duration_listener(count_compiles)
  # One process on CPU: every array is written whole, without a compiled slice per replica
  # (ckpt.save_whole_arrays_on_cpu).
  assert compiles == []
  continued, loss_a = sr.run(state, [2])

  fresh = ckpt.stage_manager(str(tmp_path), "sr")
  restored, step = ckpt.restore_latest(fresh, sr.state, sr.shardings)
  assert step == 1 and int(restored.step) == 1
  for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(state.params)):
    assert a.sharding == b.sharding
  resumed, loss_b = sr.run(restored, [2])
  assert loss_a == loss_b
  for a, b in zip(jax.tree.leaves(continued), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(_as_array(a), _as_array(b))


def _as_array(x):
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    return np.asarray(jax.random.key_data(x))
  return np.asarray(x)


def test_optimizer_clips_and_warms_up():
  cfg = stages_lib.stage_spec(tiny_config(), "base").optimizer
  opt = make_optimizer(cfg)
  params = {"w": np.ones(4, np.float32)}
  state = opt.init(params)
  updates, _ = opt.update({"w": np.full(4, 1e6, np.float32)}, state, params)
  # Step 0 of a linear warmup has learning rate 0.
  assert float(optax.tree.norm(updates)) == 0.0


def test_cosine_schedule_decays_to_the_end_fraction():
  """Closed form: lr(s) = end + (peak - end) (1 + cos(pi (s - w) / (D - w))) / 2 after warmup w."""
  from imagen_jax.train.state import learning_rate_schedule
  cfg = stages_lib.stage_spec(tiny_config(), "base").optimizer
  cfg = cfg.__class__(**{**cfg.__dict__, "learning_rate": 1e-3, "warmup_steps": 10,
                         "lr_schedule": "cosine", "decay_steps": 110, "end_lr_fraction": 0.1})
  lr = learning_rate_schedule(cfg)
  peak, end = 1e-3, 1e-4
  for s in (10, 35, 60, 85, 110, 500):
    u = min(s - 10, 100) / 100
    expected = end + (peak - end) * (1 + np.cos(np.pi * u)) / 2
    np.testing.assert_allclose(float(lr(s)), expected, rtol=1e-5)
  np.testing.assert_allclose(float(lr(5)), 0.5e-3, rtol=1e-5)  # linear warmup


def test_cosine_schedule_needs_decay_steps_past_warmup():
  config = tiny_config()
  config.stages.base.optimizer.update(lr_schedule="cosine", decay_steps=1)
  mesh = mesh_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  with pytest.raises(ValueError, match=r"config.stages.base.optimizer.decay_steps=1 must exceed"):
    stages_lib.validate(config, mesh)


T5X_TINY = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "t5x_tiny_t5_1_1")


def _t5x_tiny_text_config(config):
  config.text.update(checkpoint=os.path.abspath(T5X_TINY), d_model=8, num_layers=2, num_heads=4,
                     head_dim=3, mlp_dim=16, vocab_size=32128)
  return config


@pytest.mark.skipif(not os.path.isdir(T5X_TINY), reason="../shared/data is not checked out")
def test_run_uses_a_pretrained_t5x_encoder_and_saves_it(tmp_path):
  config = _t5x_tiny_text_config(shapes_config.get_config("tiny"))
  module, params = ckpt.frozen_text_encoder(config, str(tmp_path))
  assert module.config.d_model == 8
  # The weights are T5X's own: compare with the raw msgpack, read without our loader.
  with open(os.path.join(T5X_TINY, "checkpoint"), "rb") as f:
    raw = flax.serialization.msgpack_restore(f.read())["optimizer"]["target"]
  np.testing.assert_array_equal(np.asarray(params["token_embedder"]["embedding"]),
                                raw["token_embedder"]["embedding"])
  # Saved with the run: a second call (sampling, resume) restores the same weights.
  again_module, again = ckpt.frozen_text_encoder(config, str(tmp_path))
  assert again_module.config == module.config
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.skipif(not os.path.isdir(T5X_TINY), reason="../shared/data is not checked out")
def test_pretrained_encoder_must_match_config_text(tmp_path):
  config = _t5x_tiny_text_config(shapes_config.get_config("tiny"))
  config.text.d_model = 16
  with pytest.raises(ValueError, match=r"config.text.d_model=16 \(the checkpoint has 8\)"):
    ckpt.frozen_text_encoder(config, str(tmp_path))
