"""Golden sharding specs: the mesh layout of every parameter kind of the U-Nets (base and
Efficient SR) and the T5 encoder under the default logical axis rules, on three meshes of
the 8 test devices; and the mesh / batch mistakes that must fail before anything compiles.

Nothing here allocates a parameter: shapes come from `jax.eval_shape`.
"""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import shapes as shapes_config
from imagen_jax.models import UNet
from imagen_jax.parallel import axes
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.text import pretrained
from imagen_jax.train import stages as stages_lib
from imagen_jax.train.loop import example_inputs
from imagen_jax.train.state import (abstract_train_state, boxed_train_state, make_optimizer,
                                    train_state_shardings)

MESHES = {
    "data8": {"data": 8, "fsdp": 1, "tensor": 1},
    "data2_fsdp4": {"data": 2, "fsdp": 4, "tensor": 1},
    "data2_fsdp2_tensor2": {"data": 2, "fsdp": 2, "tensor": 2},
}
RULES = axes.DEFAULT_RULES

# The mesh axes of each parameter kind (its logical axis names) under DEFAULT_RULES: FSDP
# over model width and conv input channels, tensor parallelism over heads, MLP width,
# conv output channels and the vocabulary; norms and per-head dims replicated. A
# dimension that a mesh axis does not divide is replicated instead (mesh.fit_spec).
KIND_SPECS = {
    # U-Net
    ("conv_height", "conv_width", "conv_in", "conv_out"): (None, None, "fsdp", "tensor"),
    ("conv_out",): ("tensor",),                              # conv bias
    ("embed", "mlp"): ("fsdp", "tensor"),                    # dense in (time MLP, FiLM, text proj)
    ("mlp",): ("tensor",),                                   # its bias
    ("mlp", "embed"): ("tensor", "fsdp"),                    # dense out
    ("embed",): ("fsdp",),                                   # its bias, attn out bias, null vectors
    ("embed", "heads", "kv"): ("fsdp", "tensor", None),      # attention q / k / v
    ("heads", "kv", "embed"): ("tensor", None, "fsdp"),      # attention out
    ("heads", "kv"): ("tensor", None),                       # attention-pool query
    ("norm",): (None,),                                      # GroupNorm / LayerNorm / RMSNorm
    # T5 encoder (T5X layout: q/k/v/out kernels are 2-D, heads folded into one dim)
    ("vocab", "embed"): ("tensor", "fsdp"),                  # token embedding
    ("embed", "heads"): ("fsdp", "tensor"),                  # q / k / v
    ("heads", "embed"): ("tensor", "fsdp"),                  # attention out
    ("heads", "relpos_buckets"): ("tensor", None),           # relative-position bias table
}

# Golden: (PartitionSpec, per-device shard shape) of representative parameters of each
# kind, on each mesh, in the shapes config's U-Nets and T5 encoder (the tiny base's stem
# shows a dimension too small to split).
GOLDEN = {
    # conv 3x3 kernel [3, 3, 32, 64] and its bias
    ("base", "down1_res0/conv1/kernel"): {
        "data8": ((None, None, "fsdp", "tensor"), (3, 3, 32, 64)),
        "data2_fsdp4": ((None, None, "fsdp", "tensor"), (3, 3, 8, 64)),
        "data2_fsdp2_tensor2": ((None, None, "fsdp", "tensor"), (3, 3, 16, 32))},
    ("base", "down1_res0/conv1/bias"): {
        "data8": (("tensor",), (64,)),
        "data2_fsdp4": (("tensor",), (64,)),
        "data2_fsdp2_tensor2": (("tensor",), (32,))},
    # 1x1 skip conv [1, 1, 32, 64]
    ("base", "down1_res0/skip/kernel"): {
        "data8": ((None, None, "fsdp", "tensor"), (1, 1, 32, 64)),
        "data2_fsdp4": ((None, None, "fsdp", "tensor"), (1, 1, 8, 64)),
        "data2_fsdp2_tensor2": ((None, None, "fsdp", "tensor"), (1, 1, 16, 32))},
    # stem on 2x2 space-to-depth RGB [3, 3, 12, 32]; output conv [3, 3, 32, 12]
    ("base", "stem/kernel"): {
        "data8": ((None, None, "fsdp", "tensor"), (3, 3, 12, 32)),
        "data2_fsdp4": ((None, None, "fsdp", "tensor"), (3, 3, 3, 32)),
        "data2_fsdp2_tensor2": ((None, None, "fsdp", "tensor"), (3, 3, 6, 16))},
    ("base", "out_conv/kernel"): {
        "data8": ((None, None, "fsdp", "tensor"), (3, 3, 32, 12)),
        "data2_fsdp4": ((None, None, "fsdp", "tensor"), (3, 3, 8, 12)),
        "data2_fsdp2_tensor2": ((None, None, "fsdp", "tensor"), (3, 3, 16, 6))},
    # an RGB stem [3, 3, 3, 16]: 3 input channels do not split 4 or 2 ways -> replicated
    ("tiny_base", "stem/kernel"): {
        "data8": ((None, None, "fsdp", "tensor"), (3, 3, 3, 16)),
        "data2_fsdp4": ((None, None, None, "tensor"), (3, 3, 3, 16)),
        "data2_fsdp2_tensor2": ((None, None, None, "tensor"), (3, 3, 3, 8))},
    # dense layers: FiLM [128, 64] + bias; time MLP out [128, 128] + bias
    ("base", "down0_res0/film/kernel"): {
        "data8": (("fsdp", "tensor"), (128, 64)),
        "data2_fsdp4": (("fsdp", "tensor"), (32, 64)),
        "data2_fsdp2_tensor2": (("fsdp", "tensor"), (64, 32))},
    ("base", "down0_res0/film/bias"): {
        "data8": (("tensor",), (64,)),
        "data2_fsdp4": (("tensor",), (64,)),
        "data2_fsdp2_tensor2": (("tensor",), (32,))},
    ("base", "time_embed/dense_out/kernel"): {
        "data8": (("tensor", "fsdp"), (128, 128)),
        "data2_fsdp4": (("tensor", "fsdp"), (128, 32)),
        "data2_fsdp2_tensor2": (("tensor", "fsdp"), (64, 64))},
    ("base", "time_embed/dense_out/bias"): {
        "data8": (("fsdp",), (128,)),
        "data2_fsdp4": (("fsdp",), (32,)),
        "data2_fsdp2_tensor2": (("fsdp",), (64,))},
    # self-attention q/k/v [128, 4 heads, 32], out [4, 32, 128] + bias
    ("base", "mid_self_attn/query"): {
        "data8": (("fsdp", "tensor", None), (128, 4, 32)),
        "data2_fsdp4": (("fsdp", "tensor", None), (32, 4, 32)),
        "data2_fsdp2_tensor2": (("fsdp", "tensor", None), (64, 2, 32))},
    ("base", "mid_self_attn/key"): {
        "data8": (("fsdp", "tensor", None), (128, 4, 32)),
        "data2_fsdp4": (("fsdp", "tensor", None), (32, 4, 32)),
        "data2_fsdp2_tensor2": (("fsdp", "tensor", None), (64, 2, 32))},
    ("base", "mid_self_attn/value"): {
        "data8": (("fsdp", "tensor", None), (128, 4, 32)),
        "data2_fsdp4": (("fsdp", "tensor", None), (32, 4, 32)),
        "data2_fsdp2_tensor2": (("fsdp", "tensor", None), (64, 2, 32))},
    ("base", "mid_self_attn/out_kernel"): {
        "data8": (("tensor", None, "fsdp"), (4, 32, 128)),
        "data2_fsdp4": (("tensor", None, "fsdp"), (4, 32, 32)),
        "data2_fsdp2_tensor2": (("tensor", None, "fsdp"), (2, 32, 64))},
    ("base", "mid_self_attn/out_bias"): {
        "data8": (("fsdp",), (128,)),
        "data2_fsdp4": (("fsdp",), (32,)),
        "data2_fsdp2_tensor2": (("fsdp",), (64,))},
    # cross-attention: query from 64 image channels, key from the 128-wide text
    ("base", "down1_0_cross_attn/query"): {
        "data8": (("fsdp", "tensor", None), (64, 4, 32)),
        "data2_fsdp4": (("fsdp", "tensor", None), (16, 4, 32)),
        "data2_fsdp2_tensor2": (("fsdp", "tensor", None), (32, 2, 32))},
    ("base", "down1_0_cross_attn/key"): {
        "data8": (("fsdp", "tensor", None), (128, 4, 32)),
        "data2_fsdp4": (("fsdp", "tensor", None), (32, 4, 32)),
        "data2_fsdp2_tensor2": (("fsdp", "tensor", None), (64, 2, 32))},
    # attention pooling of the text: learned query [4, 32], null vector [128]
    ("base", "text_pool/query"): {
        "data8": (("tensor", None), (4, 32)),
        "data2_fsdp4": (("tensor", None), (4, 32)),
        "data2_fsdp2_tensor2": (("tensor", None), (2, 32))},
    ("base", "text_pool/null_vector"): {
        "data8": (("fsdp",), (128,)),
        "data2_fsdp4": (("fsdp",), (32,)),
        "data2_fsdp2_tensor2": (("fsdp",), (64,))},
    # norms: replicated everywhere
    ("base", "down1_res0/norm2/scale"): {
        "data8": ((None,), (64,)),
        "data2_fsdp4": ((None,), (64,)),
        "data2_fsdp2_tensor2": ((None,), (64,))},
    ("base", "text_norm/bias"): {
        "data8": ((None,), (128,)),
        "data2_fsdp4": ((None,), (128,)),
        "data2_fsdp2_tensor2": ((None,), (128,))},
    # Efficient U-Net (SR): stem on 4x4 space-to-depth of image + low-res [3, 3, 96, 64],
    # the noise-augmentation embedding
    ("sr", "stem/kernel"): {
        "data8": ((None, None, "fsdp", "tensor"), (3, 3, 96, 64)),
        "data2_fsdp4": ((None, None, "fsdp", "tensor"), (3, 3, 24, 64)),
        "data2_fsdp2_tensor2": ((None, None, "fsdp", "tensor"), (3, 3, 48, 32))},
    ("sr", "lowres_aug_embed/dense_in/kernel"): {
        "data8": (("fsdp", "tensor"), (64, 128)),
        "data2_fsdp4": (("fsdp", "tensor"), (16, 128)),
        "data2_fsdp2_tensor2": (("fsdp", "tensor"), (32, 64))},
    # T5 encoder (d_model 128, 4 heads x 32, MLP 256, vocabulary 32128)
    ("t5", "token_embedder/embedding"): {
        "data8": (("tensor", "fsdp"), (32128, 128)),
        "data2_fsdp4": (("tensor", "fsdp"), (32128, 32)),
        "data2_fsdp2_tensor2": (("tensor", "fsdp"), (16064, 64))},
    ("t5", "encoder/layers_0/attention/query/kernel"): {
        "data8": (("fsdp", "tensor"), (128, 128)),
        "data2_fsdp4": (("fsdp", "tensor"), (32, 128)),
        "data2_fsdp2_tensor2": (("fsdp", "tensor"), (64, 64))},
    ("t5", "encoder/layers_0/attention/key/kernel"): {
        "data8": (("fsdp", "tensor"), (128, 128)),
        "data2_fsdp4": (("fsdp", "tensor"), (32, 128)),
        "data2_fsdp2_tensor2": (("fsdp", "tensor"), (64, 64))},
    ("t5", "encoder/layers_0/attention/value/kernel"): {
        "data8": (("fsdp", "tensor"), (128, 128)),
        "data2_fsdp4": (("fsdp", "tensor"), (32, 128)),
        "data2_fsdp2_tensor2": (("fsdp", "tensor"), (64, 64))},
    ("t5", "encoder/layers_0/attention/out/kernel"): {
        "data8": (("tensor", "fsdp"), (128, 128)),
        "data2_fsdp4": (("tensor", "fsdp"), (128, 32)),
        "data2_fsdp2_tensor2": (("tensor", "fsdp"), (64, 64))},
    ("t5", "encoder/layers_1/mlp/wi_0/kernel"): {
        "data8": (("fsdp", "tensor"), (128, 256)),
        "data2_fsdp4": (("fsdp", "tensor"), (32, 256)),
        "data2_fsdp2_tensor2": (("fsdp", "tensor"), (64, 128))},
    ("t5", "encoder/layers_1/mlp/wi_1/kernel"): {
        "data8": (("fsdp", "tensor"), (128, 256)),
        "data2_fsdp4": (("fsdp", "tensor"), (32, 256)),
        "data2_fsdp2_tensor2": (("fsdp", "tensor"), (64, 128))},
    ("t5", "encoder/layers_1/mlp/wo/kernel"): {
        "data8": (("tensor", "fsdp"), (256, 128)),
        "data2_fsdp4": (("tensor", "fsdp"), (256, 32)),
        "data2_fsdp2_tensor2": (("tensor", "fsdp"), (128, 64))},
    ("t5", "encoder/layers_0/pre_attention_layer_norm/scale"): {
        "data8": ((None,), (128,)),
        "data2_fsdp4": ((None,), (128,)),
        "data2_fsdp2_tensor2": ((None,), (128,))},
    ("t5", "encoder/encoder_norm/scale"): {
        "data8": ((None,), (128,)),
        "data2_fsdp4": ((None,), (128,)),
        "data2_fsdp2_tensor2": ((None,), (128,))},
    ("t5", "encoder/relpos_bias/rel_embedding"): {
        "data8": (("tensor", None), (4, 32)),
        "data2_fsdp4": (("tensor", None), (4, 32)),
        "data2_fsdp2_tensor2": (("tensor", None), (2, 32))},
}


def _flat(tree, is_leaf=None):
  """{"a/b/c": leaf} of a nested dict tree."""
  return {"/".join(str(k.key) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]}


def _is_spec(x):
  return isinstance(x, P)


class Model:
  """One model's abstract params: logical names, shapes and, per mesh, shardings."""

  def __init__(self, name, abstract_boxed, shardings_fn):
    import flax.linen as nn
    self.name = name
    self.logical = _flat(nn.get_partition_spec(abstract_boxed), _is_spec)
    self.shapes = {k: v.shape for k, v in _flat(nn.meta.unbox(abstract_boxed)).items()}
    self.shardings = {mesh_name: _flat(shardings_fn(mesh_lib.make_mesh(shape)))
                      for mesh_name, shape in MESHES.items()}


def _unet_model(name, config, stage):
  spec = {s.name: s for s in stages_lib.validate(config, mesh_lib.make_mesh(MESHES["data8"]))}[stage]
  unet = UNet(spec.unet)
  inputs = example_inputs(spec, config.text.d_model, config.text.max_length)
  # One trace of the train state for every mesh (its shardings are what abstract_train_state
  # returns: train_state_shardings of this boxed state).
  state = boxed_train_state(unet, inputs, make_optimizer(spec.optimizer),
                            mesh=mesh_lib.make_mesh(MESHES["data8"]), rules=RULES)
  boxed = state.params

  def shardings(mesh):
    return train_state_shardings(state, mesh, RULES).params

  return Model(name, boxed, shardings)


@pytest.fixture(scope="module")
def models():
  config, tiny = shapes_config.get_config(), shapes_config.get_config("tiny")
  t5 = stages_lib.t5_config(config)
  from imagen_jax.text.t5 import abstract_params
  return {
      "base": _unet_model("base", config, "base"),
      "sr": _unet_model("sr", config, "sr"),
      "tiny_base": _unet_model("tiny_base", tiny, "base"),
      "t5": Model("t5", abstract_params(t5),
                  lambda mesh: pretrained.param_shardings(t5, mesh, RULES)),
  }


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_golden_specs(models, mesh_name):
  for (model, path), per_mesh in GOLDEN.items():
    m = models[model]
    assert path in m.shapes, f"{model}: no parameter {path} (renamed? update GOLDEN)"
    sharding = m.shardings[mesh_name][path]
    want_spec, want_shard = per_mesh[mesh_name]
    assert tuple(sharding.spec) == want_spec, (model, path, mesh_name, sharding.spec)
    assert sharding.shard_shape(m.shapes[path]) == want_shard, (model, path, mesh_name)


def test_every_parameter_has_a_golden_kind(models):
  """Every parameter of every model is of a kind in KIND_SPECS (a new kind needs its
  golden spec), and each of its dimensions is on that kind's mesh axis wherever the axis
  divides it, replicated otherwise, on every mesh."""
  kinds_seen = set()
  for m in models.values():
    for path, logical in m.logical.items():
      kind = tuple(logical)
      assert kind in KIND_SPECS, f"{m.name}/{path}: new parameter kind {kind}; add it to KIND_SPECS"
      kinds_seen.add(kind)
      for mesh_name, mesh_shape in MESHES.items():
        want = tuple(axis if axis is None or dim % mesh_shape[axis] == 0 else None
                     for axis, dim in zip(KIND_SPECS[kind], m.shapes[path]))
        got = tuple(m.shardings[mesh_name][path].spec)
        assert got == want, (m.name, path, mesh_name, got, want)
  assert kinds_seen == set(KIND_SPECS), set(KIND_SPECS) - kinds_seen
  # Every golden example is checked in test_golden_specs; every kind has one.
  golden_kinds = {tuple(models[model].logical[path]) for model, path in GOLDEN}
  assert golden_kinds == set(KIND_SPECS), set(KIND_SPECS) - golden_kinds


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_train_state_follows_the_params(mesh_name):
  """Adam's moments and the EMA are sharded like the params; step, rng and the skipped-step
  count are replicated; batches split over (data, fsdp)."""
  config = shapes_config.get_config()
  mesh = mesh_lib.make_mesh(MESHES[mesh_name])
  spec = {s.name: s for s in stages_lib.validate(config, mesh)}["base"]
  _, shardings = abstract_train_state(
      UNet(spec.unet), example_inputs(spec, config.text.d_model, config.text.max_length),
      make_optimizer(spec.optimizer), mesh=mesh, rules=RULES)
  params = jax.tree.structure(shardings.params)
  mirrors = [shardings.ema_params]
  mirrors += [t for t in jax.tree.leaves(shardings.opt_state,
                                         is_leaf=lambda x: jax.tree.structure(x) == params)
              if jax.tree.structure(t) == params]
  assert len(mirrors) == 3  # EMA, Adam mu, Adam nu
  for tree in mirrors:
    assert jax.tree.leaves(tree) == jax.tree.leaves(shardings.params)
  for name in ("step", "rng", "skipped_steps"):
    assert getattr(shardings, name).spec == P()
  assert mesh_lib.batch_sharding(mesh, RULES).spec == P(("data", "fsdp"))
  assert mesh_lib.data_parallel_size(mesh, RULES) == MESHES[mesh_name]["data"] * \
      MESHES[mesh_name]["fsdp"]


# ---- Mesh and batch mistakes fail before compiling, naming the fix. ----

def test_mesh_must_use_every_device():
  with pytest.raises(ValueError, match=r"needs 4 devices but 8 are available; set one axis to "
                                       r"-1 \(e\.g\. --config\.mesh\.data=-1\)"):
    mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 1})
  with pytest.raises(ValueError, match=r"needs 16 devices but 8.*--distributed"):
    mesh_lib.make_mesh({"data": 2, "fsdp": 8, "tensor": 1})


def test_mesh_rest_axis():
  assert dict(mesh_lib.make_mesh({"data": -1, "fsdp": 2, "tensor": 2}).shape) == {
      "data": 2, "fsdp": 2, "tensor": 2}
  with pytest.raises(ValueError, match="at most one axis may be -1"):
    mesh_lib.make_mesh({"data": -1, "fsdp": -1, "tensor": 1})
  with pytest.raises(ValueError, match="fixed axes use 3 devices, which does not divide the 8"):
    mesh_lib.make_mesh({"data": -1, "fsdp": 3, "tensor": 1})
  with pytest.raises(ValueError, match="must be positive or -1"):
    mesh_lib.make_mesh({"data": 0, "fsdp": -1, "tensor": 1})


@pytest.mark.parametrize("mesh_shape,batch,suggest", [
    ({"data": 2, "fsdp": 4, "tensor": 1}, 12, 8),     # 8 data-parallel devices
    ({"data": 2, "fsdp": 2, "tensor": 2}, 6, 4),      # tensor does not split the batch: 4
])
def test_batch_must_split_over_the_data_axes(mesh_shape, batch, suggest):
  config = shapes_config.get_config("tiny")
  config.stages.base.train.batch_size = batch
  with pytest.raises(ValueError, match=rf"config\.stages\.base\.train\.batch_size={batch} is not "
                                       rf"divisible by the {suggest} data-parallel devices.*"
                                       rf"use a multiple of {suggest}"):
    stages_lib.validate(config, mesh_lib.make_mesh(mesh_shape))


def test_rules_must_name_mesh_axes():
  config = shapes_config.get_config("tiny")
  config.mesh = {"data": -1, "fsdp": 1}
  with pytest.raises(ValueError, match="maps 'act_heads' to mesh axis 'tensor'.*add it to config.mesh"):
    stages_lib.validate(config, mesh_lib.make_mesh(dict(config.mesh)))


def _fake_hosts(num_hosts):
  """Pretends the 8 test devices belong to `num_hosts` hosts, in id order."""
  per_host = jax.device_count() // num_hosts
  return {"num_hosts": num_hosts, "process_of": lambda d: d.id // per_host}


def test_each_host_holds_the_rows_it_reads():
  """Host p reads rows [p L, (p + 1) L) of every global batch (data/pipeline.py); the mesh
  must put exactly those rows on host p's devices."""
  good = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  for hosts in (1, 2, 4):
    mesh_lib.check_host_batch_layout(good, RULES, 8, **_fake_hosts(hosts))
  assert mesh_lib.process_batch_rows(good, RULES, 16, 1, _fake_hosts(4)["process_of"]) == (4, 8)
  # Tensor parallelism across hosts: both hosts hold every row, each reads half of them.
  across = mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 8})
  with pytest.raises(ValueError, match=r"gives host 0 the rows \(0, 8\).*model-parallel axes.*"
                                       r"divides the devices of one host \(4\)"):
    mesh_lib.check_host_batch_layout(across, RULES, 8, **_fake_hosts(2))
  # Devices not in host order (an explicit device list): rows land on the wrong host.
  devices = jax.devices()
  shuffled = mesh_lib.make_mesh({"data": 8, "fsdp": 1, "tensor": 1},
                                [devices[i] for i in (0, 4, 1, 5, 2, 6, 3, 7)])
  with pytest.raises(ValueError, match="not one block"):
    mesh_lib.check_host_batch_layout(shuffled, RULES, 8, **_fake_hosts(2))


def test_make_mesh_orders_devices_by_host():
  mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  ids = [d.id for d in mesh.devices.flat]
  assert ids == sorted(ids)
  assert [d.process_index for d in mesh.devices.flat] == sorted(
      d.process_index for d in mesh.devices.flat)
  np.testing.assert_array_equal(mesh.devices.shape, (2, 2, 2))
