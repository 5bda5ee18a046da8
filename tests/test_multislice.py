"""Several TPU slices (issue 5, "Mesh and sharding"): a `slice` mesh axis whose devices are
grouped by slice, the batch split over (slice, data, fsdp) and nothing else over slices.

CPU devices have no `slice_index`: make_mesh then cuts the devices, in host order, into
equal consecutive blocks, one per slice (one process per slice on several processes,
runs of consecutive ids on one), and tests inject other groupings with `slice_of`.
Fake devices stand in for TPUs where only the grouping is under test.
"""
import dataclasses
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.experimental import mesh_utils
from jax.sharding import PartitionSpec as P
from small_configs import minimal_base
from test_train import StageRunner  # real train steps on meshes

from configs import shapes as shapes_config
from imagen_jax.config_files import load_sibling
from imagen_jax.models import UNet
from imagen_jax.parallel import axes
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.text import pretrained
from imagen_jax.text.t5 import abstract_params
from imagen_jax.train import stages as stages_lib
from imagen_jax.train.loop import example_inputs
from imagen_jax.train.state import abstract_train_state, make_optimizer

SLICES = {"slice": 2, "data": 2, "fsdp": 2, "tensor": 1}
RULES = axes.MULTISLICE_RULES
common = load_sibling(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                  "configs", "imagen_common.py"), "imagen_common")


def _multislice_tiny(num_slices=2):
  return common.multislice(shapes_config.get_config("tiny"), num_slices)


# ---- Golden specs: the batch over (slice, data, fsdp); params never over slice. ----

# (PartitionSpec, per-device shard shape) on SLICES of representative params of each kind
# in the tiny shapes config's base U-Net and T5 encoder: exactly their specs on one slice
# (fsdp 2, tensor 1), replicated across the two slices.
GOLDEN = {
    ("unet", "down1_res0/conv1/kernel"): ((None, None, "fsdp", "tensor"), (3, 3, 8, 32)),
    ("unet", "down1_res0/conv1/bias"): (("tensor",), (32,)),
    ("unet", "stem/kernel"): ((None, None, None, "tensor"), (3, 3, 3, 16)),  # 3 RGB: no split
    ("unet", "down1_res0/film/kernel"): (("fsdp", "tensor"), (32, 64)),
    ("unet", "mid_self_attn/query"): (("fsdp", "tensor", None), (16, 2, 16)),
    ("unet", "mid_self_attn/out_kernel"): (("tensor", None, "fsdp"), (2, 16, 16)),
    ("unet", "mid_self_attn/out_bias"): (("fsdp",), (16,)),
    ("unet", "down1_0_cross_attn/key"): (("fsdp", "tensor", None), (32, 2, 16)),
    ("unet", "null_text_token"): (("fsdp",), (32,)),
    ("unet", "mid_res0/norm1/scale"): ((None,), (32,)),
    ("t5", "token_embedder/embedding"): (("tensor", "fsdp"), (32128, 32)),
    ("t5", "encoder/layers_0/attention/query/kernel"): (("fsdp", "tensor"), (32, 64)),
    ("t5", "encoder/layers_0/mlp/wo/kernel"): (("tensor", "fsdp"), (128, 32)),
    ("t5", "encoder/relpos_bias/rel_embedding"): (("tensor", None), (2, 32)),
    ("t5", "encoder/encoder_norm/scale"): ((None,), (64,)),
}


def _flat(tree):
  return {"/".join(str(k.key) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def param_shardings():
  """{model: {path: (shape, sharding on SLICES, sharding on one slice's mesh)}}."""
  config = shapes_config.get_config("tiny")
  spec = stages_lib.stage_spec(config, "base")
  unet, t5 = UNet(spec.unet), stages_lib.t5_config(config)
  inputs = example_inputs(spec, config.text.d_model, config.text.max_length)
  one_slice = mesh_lib.make_mesh({"data": 4, "fsdp": 2, "tensor": 1})
  out = {}
  for name, fn in {
      "unet": lambda mesh, rules: abstract_train_state(
          unet, inputs, make_optimizer(spec.optimizer), mesh=mesh, rules=rules),
      "t5": lambda mesh, rules: (abstract_params(t5),
                                 pretrained.param_shardings(t5, mesh, rules)),
  }.items():
    abstract, multi = fn(mesh_lib.make_mesh(SLICES), RULES)
    _, single = fn(one_slice, axes.DEFAULT_RULES)
    if name == "unet":
      abstract, multi, single = abstract.params, multi.params, single.params
    shapes = {k: v.shape for k, v in _flat(nn.meta.unbox(abstract)).items()}
    multi, single = _flat(multi), _flat(single)
    out[name] = {k: (shapes[k], multi[k], single[k]) for k in shapes}
  return out


def test_golden_param_specs_on_two_slices(param_shardings):
  for (model, path), (want_spec, want_shard) in GOLDEN.items():
    shape, sharding, _ = param_shardings[model][path]
    assert tuple(sharding.spec) == want_spec, (model, path, sharding.spec)
    assert sharding.shard_shape(shape) == want_shard, (model, path)


def test_params_are_replicated_across_slices(param_shardings):
  """No parameter names `slice`; each has its one-slice spec, and the devices at the same
  (data, fsdp, tensor) position of the two slices hold the same shard of it."""
  mesh = mesh_lib.make_mesh(SLICES)
  for model, params in param_shardings.items():
    for path, (shape, multi, single) in params.items():
      assert "slice" not in str(multi.spec), (model, path, multi.spec)
      assert tuple(multi.spec) == tuple(single.spec), (model, path)
      index = multi.devices_indices_map(shape)
      for d0, d1 in zip(mesh.devices[0].flat, mesh.devices[1].flat):
        assert index[d0] == index[d1], (model, path)


def test_batch_is_split_over_slices_first():
  mesh = mesh_lib.make_mesh(SLICES)
  sharding = mesh_lib.batch_sharding(mesh, RULES)
  assert sharding.spec == P(("slice", "data", "fsdp"))
  assert mesh_lib.data_parallel_size(mesh, RULES) == 8
  # Slice s holds rows [8 s, 8 s + 8) of a batch of 16: a contiguous half each, 2 rows per
  # device, in device order within the slice.
  rows = sharding.devices_indices_map((16,))
  for s in range(2):
    got = [rows[d][0].indices(16)[:2] for d in mesh.devices[s].flat]
    assert got == [(8 * s + 2 * i, 8 * s + 2 * i + 2) for i in range(4)], got


# ---- Devices are grouped by slice. ----

def test_each_slice_row_is_one_contiguous_group():
  # ConfigDict lists config.mesh alphabetically; the slice axis goes first wherever it is.
  mesh = mesh_lib.make_mesh({"data": -1, "fsdp": 2, "slice": 2, "tensor": 1})
  assert mesh.axis_names == ("slice", "data", "fsdp", "tensor")
  assert dict(mesh.shape) == SLICES
  assert [[d.id for d in row.flat] for row in mesh.devices] == [[0, 1, 2, 3], [4, 5, 6, 7]]
  # An injected grouping (as slice_index would on TPU) decides, not the device ids.
  odd_even = mesh_lib.make_mesh(SLICES, slice_of=lambda d: d.id % 2)
  assert [[d.id for d in row.flat] for row in odd_even.devices] == [[0, 2, 4, 6], [1, 3, 5, 7]]
  # Hosts (fake, 2 or 4 of them) each hold the block of every batch they read: each
  # slice's hosts split its half of the batch.
  for hosts in (2, 4):
    per_host = 8 // hosts
    mesh_lib.check_host_batch_layout(mesh, RULES, 16, num_hosts=hosts,
                                     process_of=lambda d, n=per_host: d.id // n)


def test_one_slice_is_the_single_slice_layout():
  """slice=1 (or no slice axis): the same devices in the same places, and the batch rows
  on the same devices, as the mesh without a slice axis under DEFAULT_RULES."""
  plain = mesh_lib.make_mesh({"data": -1, "fsdp": 2, "tensor": 2})
  one = mesh_lib.make_mesh({"slice": 1, "data": -1, "fsdp": 2, "tensor": 2})
  assert one.devices.shape == (1, 2, 2, 2)
  assert list(one.devices.flat) == list(plain.devices.flat)
  assert (mesh_lib.batch_sharding(one, RULES).devices_indices_map((8,))
          == mesh_lib.batch_sharding(plain, axes.DEFAULT_RULES).devices_indices_map((8,)))


@dataclasses.dataclass(frozen=True)
class FakeDevice:  # a CPU device: no slice_index
  id: int
  process_index: int
  platform: str = "cpu"
  device_kind: str = "cpu"


@dataclasses.dataclass(frozen=True)
class FakeSlicedDevice(FakeDevice):  # a device that knows its slice, as TPUs do
  slice_index: int = 0


def _fakes(num, per_process, per_slice=None):
  if per_slice is None:
    return [FakeDevice(i, i // per_process) for i in range(num)]
  return [FakeSlicedDevice(i, i // per_process, slice_index=i // per_slice) for i in range(num)]


def test_grouping_by_slice_index_or_by_process():
  # Devices with slice_index (as on TPU) are grouped by it, whatever their order.
  devices = _fakes(16, per_process=4, per_slice=8)
  shuffled = devices[8:12] + devices[:4] + devices[12:] + devices[4:8]
  groups = mesh_lib.slice_groups(shuffled, 2)
  assert [[d.slice_index for d in g] for g in groups] == [[1] * 8, [0] * 8]
  # ... exactly as JAX's hybrid mesh does (ici: one slice's shape, dcn: the slices), where
  # slices come in host order (JAX numbers the processes slice by slice).
  ours = mesh_lib.slice_device_array(devices, 2, (2, 2, 2))
  jax_hybrid = mesh_utils.create_hybrid_device_mesh((1, 2, 2, 2), (2, 1, 1, 1), devices)
  assert ours.shape == jax_hybrid.shape == (2, 2, 2, 2)
  assert [d.id for d in ours.flat] == [d.id for d in jax_hybrid.flat]
  # Without slice_index: equal blocks in host order, i.e. one or more whole processes each.
  groups = mesh_lib.slice_groups(_fakes(8, per_process=4), 2)
  assert [{d.process_index for d in g} for g in groups] == [{0}, {1}]
  groups = mesh_lib.slice_groups(_fakes(8, per_process=2), 2)
  assert [{d.process_index for d in g} for g in groups] == [{0, 1}, {2, 3}]


# ---- Mistakes fail before compiling, naming the field and the fix. ----

def test_slice_count_must_fit_the_devices():
  with pytest.raises(ValueError, match=r"config\.mesh\.slice=3 does not divide the 8 devices"):
    mesh_lib.make_mesh({"slice": 3, "data": -1, "fsdp": 1, "tensor": 1})
  with pytest.raises(ValueError, match=r"config\.mesh\.slice=-1: give the number of TPU slices"):
    mesh_lib.make_mesh({"slice": -1, "data": 2, "fsdp": 2, "tensor": 1})
  with pytest.raises(ValueError, match="needs 16 devices but 8 are available"):
    mesh_lib.make_mesh({"slice": 2, "data": 4, "fsdp": 2, "tensor": 1})
  # On TPU the slice count is the number of slices the devices are in (slice_index).
  tpus = [dataclasses.replace(d, platform="tpu", device_kind="TPU v4")
          for d in _fakes(16, per_process=4, per_slice=4)]
  with pytest.raises(ValueError, match=r"config\.mesh\.slice=2, but the 16 devices are in 4 "
                                       r"slice\(s\) \(slice_index \[0, 1, 2, 3\]\); set "
                                       r"--config\.mesh\.slice=4"):
    mesh_lib.slice_groups(tpus, 2)
  one_slice = [dataclasses.replace(d, slice_index=0) for d in tpus]
  with pytest.raises(ValueError, match=r"are in 1 slice\(s\).*--config\.mesh\.slice=1"):
    mesh_lib.slice_groups(one_slice, 2)
  uneven = [dataclasses.replace(d, slice_index=int(d.id >= 4)) for d in tpus]
  with pytest.raises(ValueError, match="slices hold different numbers of devices"):
    mesh_lib.slice_groups(uneven, 2)


def test_rules_must_split_only_the_batch_over_slices():
  mesh = mesh_lib.make_mesh(SLICES)
  with pytest.raises(ValueError, match=r"config\.mesh\.slice=2, but config\.axis_rules shards "
                                       r"'batch' over \('data', 'fsdp'\).*axes\.MULTISLICE_RULES"):
    mesh_lib.check_rules(axes.DEFAULT_RULES, mesh)
  after = [(n, ("data", "slice", "fsdp") if n == axes.BATCH else t) for n, t in RULES]
  with pytest.raises(ValueError, match="split over 'slice' first"):
    mesh_lib.check_rules(after, mesh)
  fsdp_over_slices = [(n, ("slice", "fsdp") if n == axes.EMBED else t) for n, t in RULES]
  with pytest.raises(ValueError, match=r"maps 'embed' to mesh axis 'slice': only the batch"):
    mesh_lib.check_rules(fsdp_over_slices, mesh)
  with pytest.raises(ValueError, match=r"maps 'batch' to mesh axis 'slice'.*add it to config\.mesh"):
    mesh_lib.check_rules(RULES, mesh_lib.make_mesh({"data": -1, "fsdp": 2, "tensor": 1}))
  # With one slice, rules without `slice` are fine (today's configs plus slice=1).
  mesh_lib.check_rules(axes.DEFAULT_RULES, mesh_lib.make_mesh({"slice": 1, "data": -1,
                                                               "fsdp": 2, "tensor": 1}))


def test_config_validation_on_two_slices():
  config = _multislice_tiny()
  assert dict(config.mesh) == {"data": -1, "fsdp": 1, "slice": 2, "tensor": 1}
  assert axes.with_slices(config.axis_rules) == RULES == axes.with_slices(RULES)
  mesh = mesh_lib.make_mesh(dict(config.mesh))
  assert dict(mesh.shape) == {"slice": 2, "data": 4, "fsdp": 1, "tensor": 1}
  stages_lib.validate(config, mesh)
  config.stages.base.train.batch_size = 12
  config.mesh.fsdp = 2
  with pytest.raises(ValueError, match=r"config\.stages\.base\.train\.batch_size=12 is not "
                                       r"divisible by the 8 data-parallel devices.*batch axes "
                                       r"\('slice', 'data', 'fsdp'\)"):
    stages_lib.validate(config, mesh_lib.make_mesh(dict(config.mesh)))
  # The slice axis without the slice-aware rules is refused before anything compiles.
  plain_rules = shapes_config.get_config("tiny")
  plain_rules.mesh = dict(config.mesh)
  with pytest.raises(ValueError, match="must be split over 'slice' first"):
    stages_lib.validate(plain_rules, mesh_lib.make_mesh(dict(plain_rules.mesh)))


# ---- Two slices train exactly what one device trains. ----

def test_steps_on_two_slices_equal_one_device():
  # The minimal base U-Net (tests/small_configs.py): what the slice axis does to a train
  # step (the batch and the gradient all-reduce over it, params replicated across it) does
  # not depend on the model, and compiling the steps is most of this test's time. Its
  # convolutions still shard over fsdp. On one device the multi-slice rules and the plain
  # ones compute the same thing.
  single = StageRunner(minimal_base(shapes_config.get_config("tiny")), "base",
                       {"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  sliced = StageRunner(minimal_base(_multislice_tiny()), "base", SLICES, jax.devices(),
                       like=single)
  assert sliced.mesh.axis_names[0] == "slice"
  assert [x.sharding.spec for x in jax.tree.leaves(sliced.state.params)
          if "slice" in str(x.sharding.spec)] == []
  # Three steps: the warmup starts at lr 0 and the output conv at zero, so step 2 moves
  # only the output conv and step 3 the whole U-Net.
  state_a, losses_a = sliced.run(sliced.state, [1, 2, 3])
  state_b, losses_b = single.run(single.state, [1, 2, 3])
  # Tolerance as for the 4x2 mesh (tests/test_train.py): float32 sums over 8 devices (the
  # loss mean and the gradient all-reduce over slice x data x fsdp) in another order than
  # on one device; observed: losses ~1e-7 relative, params that train (moved ~6e-4) within
  # 4e-7. Params whose exact gradient is zero (a bias right before a GroupNorm, which
  # removes it) move by float32 noise alone, which Adam scales up to ~1e-7 .. 1e-6 in a
  # different direction on each mesh: for those, both runs must merely stay that close to
  # their initial values.
  np.testing.assert_allclose(losses_a, losses_b, rtol=1e-5)
  init = jax.tree.leaves(single.state.params)
  trained = 0
  for a, b, p0 in zip(jax.tree.leaves(state_a.params), jax.tree.leaves(state_b.params), init):
    a, b, p0 = np.asarray(a), np.asarray(b), np.asarray(p0)
    if np.abs(b - p0).max() < 1e-6:
      assert np.abs(a - p0).max() < 5e-6
    else:
      trained += 1
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  for a, b in zip(jax.tree.leaves(state_a.ema_params), jax.tree.leaves(state_b.ema_params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
  # Training moved most parameters (the comparison above is not vacuous).
  assert trained > 0.7 * len(init), (trained, len(init))
