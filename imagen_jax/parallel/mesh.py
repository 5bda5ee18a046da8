"""Device mesh construction and sharding helpers.

A mesh is described by a mapping of axis name -> size, in order, e.g.
`{"data": -1, "fsdp": 1, "tensor": 1}`; -1 means "all the devices the other axes leave".
Logical axis names (see `axes.py`) are mapped to mesh axes by rules, and everything
below is expressed through those rules: model code never sees device counts.

Several TPU slices (multi-slice): an axis named `slice` (axes.SLICE) in the mapping, e.g.
`{"slice": 2, "data": -1, "fsdp": 8, "tensor": 1}`, is the number of slices. It is always
the mesh's first (outermost) axis, wherever it appears in the mapping, and its devices are
grouped by slice (`slice_groups`): mesh.devices[s] are the devices of slice s. With rules
that shard only the batch over it (axes.MULTISLICE_RULES, enforced by `check_rules`), the
data-center network between slices carries only the data-parallel gradient all-reduce;
fsdp and tensor collectives stay inside a slice. A mapping without `slice` builds exactly
the mesh it always did.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from imagen_jax.parallel import axes

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]


SLICE = axes.SLICE


def resolve_mesh_shape(mesh_shape: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Replaces a single -1 with the number of devices left; checks the product. A `slice`
  axis (the number of slices, never -1) is moved to the front."""
  shape = dict(mesh_shape)
  if SLICE in shape:
    slices = shape.pop(SLICE)
    if not isinstance(slices, (int, np.integer)) or isinstance(slices, bool) or slices < 1:
      raise ValueError(f"config.mesh.slice={slices}: give the number of TPU slices the run "
                       "spans (1 or more; -1 is not allowed for the slice axis).")
    if num_devices % slices:
      raise ValueError(f"config.mesh.slice={slices} does not divide the {num_devices} devices: "
                       "every slice holds the same number of devices; set it to the number "
                       "of slices the run spans.")
    shape = {SLICE: slices, **shape}
  unknown = [name for name, size in shape.items() if size == -1]
  if len(unknown) > 1:
    raise ValueError(f"config.mesh: at most one axis may be -1, got {unknown}.")
  known = math.prod(size for size in shape.values() if size != -1)
  if any(size == 0 or size < -1 for size in shape.values()):
    raise ValueError(f"config.mesh: axis sizes must be positive or -1, got {shape}.")
  if unknown:
    if num_devices % known:
      raise ValueError(
          f"config.mesh {dict(mesh_shape)}: the fixed axes use {known} devices, which does not "
          f"divide the {num_devices} available; change the fixed axis sizes.")
    shape[unknown[0]] = num_devices // known
  elif known != num_devices:
    hint = ""
    if known > num_devices and jax.process_count() == 1:
      hint = (" (If this is one host of a multi-host TPU slice or GPU cluster, it sees only "
              "its own devices: start every host with --distributed, see launch/.)")
    raise ValueError(
        f"config.mesh {shape} needs {known} devices but {num_devices} are available; set one "
        "axis to -1 (e.g. --config.mesh.data=-1) or change the sizes so their product is "
        f"{num_devices}.{hint}")
  return shape


def make_mesh(mesh_shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None,
              slice_of=None) -> Mesh:
  """Builds a mesh with Auto axis types (Explicit axes break linen logical partitioning).

  Devices are laid out host by host (sorted by process index, then id): with the batch
  axes leading, each host's devices then hold one contiguous block of every global
  batch, block `jax.process_index()` in host order, which is the block the input
  pipeline reads on that host (`check_host_batch_layout`). An explicit `devices` list is
  laid out in its own order.

  With a `slice` axis the devices are first split into slices (`slice_groups`; `slice_of`
  overrides how a device's slice is found), then each slice is laid out as above over
  the other axes: the mesh is [slice, <the other axes>], slice s's devices at index s.
  """
  if devices is None:
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  devices = list(devices)
  shape = resolve_mesh_shape(mesh_shape, len(devices))
  if SLICE in shape:
    device_array = slice_device_array(devices, shape[SLICE], tuple(shape.values())[1:],
                                      slice_of)
  else:
    hardware = _hardware_slice_of(devices)
    if hardware is not None and len({hardware(d) for d in devices}) > 1:
      logging.warning(
          "The %d devices span %d TPU slices but config.mesh %s has no 'slice' axis: fsdp "
          "and tensor collectives may cross the slow data-center network. Add "
          "config.mesh.slice=<number of slices> with axes.MULTISLICE_RULES (BUILD_TPU.md, "
          "Multi-slice).", len(devices), len({hardware(d) for d in devices}), shape)
    device_array = np.asarray(devices).reshape(tuple(shape.values()))
  return Mesh(device_array, tuple(shape.keys()),
              axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def _hardware_slice_of(devices):
  """`device -> slice_index` where the hardware reports slices (TPUs, or any devices with
  more than one distinct slice_index), else None."""
  if not devices or not all(hasattr(d, "slice_index") for d in devices):
    return None
  if devices[0].platform == "tpu" or len({d.slice_index for d in devices}) > 1:
    return lambda d: d.slice_index
  return None


def slice_groups(devices: Sequence, num_slices: int, slice_of=None) -> list[list]:
  """The devices of each of `num_slices` slices, each list in the order of `devices`.

  A device's slice is `slice_of(device)` when given. Otherwise, on TPUs (devices with a
  `slice_index`), it is `device.slice_index`, and the devices must come in exactly
  `num_slices` distinct slice indices. Devices without one (CPU, most GPUs) are cut into
  `num_slices` equal consecutive blocks of `devices`: make_mesh lists them by process,
  then id, so one process per slice (GPU nodes, the tests' processes) makes each
  process's devices a slice, and in one process the slices are runs of consecutive ids.
  Slices come in the order of their first device in `devices` (on TPU: host order, in
  which each slice's hosts hold one block of every batch).
  """
  devices = list(devices)
  if len(devices) % num_slices:
    raise ValueError(f"config.mesh.slice={num_slices} does not divide the {len(devices)} "
                     "devices; set it to the number of slices the run spans.")
  slice_of = slice_of or _hardware_slice_of(devices)
  if slice_of is None:
    per = len(devices) // num_slices
    return [devices[i * per:(i + 1) * per] for i in range(num_slices)]
  groups: dict = {}
  for d in devices:
    groups.setdefault(slice_of(d), []).append(d)
  if len(groups) != num_slices:
    raise ValueError(
        f"config.mesh.slice={num_slices}, but the {len(devices)} devices are in "
        f"{len(groups)} slice(s) (slice_index {sorted(groups)}); set "
        f"--config.mesh.slice={len(groups)}.")
  sizes = {key: len(group) for key, group in groups.items()}
  if len(set(sizes.values())) > 1:
    raise ValueError(f"The slices hold different numbers of devices ({sizes} by slice_index); "
                     "a multi-slice mesh needs slices of one size (one accelerator type).")
  return list(groups.values())


def slice_device_array(devices: Sequence, num_slices: int, slice_shape: Sequence[int],
                       slice_of=None) -> np.ndarray:
  """[num_slices, *slice_shape] array of the devices: index s holds slice s's devices (see
  `slice_groups`), each slice reshaped in its own order. This is
  `jax.experimental.mesh_utils.create_hybrid_device_mesh((1, *slice_shape),
  (num_slices, 1, ...), devices)` except in two orders: slices come in host order, not
  sorted by slice_index (the same where, as on Cloud TPU, processes are numbered slice by
  slice), and within a slice devices keep host order (as on one slice), not TPU topology
  order, which could scatter a host's devices over non-contiguous rows of the batch."""
  groups = slice_groups(devices, num_slices, slice_of)
  per_slice = math.prod(slice_shape)
  if len(groups[0]) != per_slice:
    raise ValueError(f"Each of the {num_slices} slices holds {len(groups[0])} devices, but "
                     f"the other config.mesh axes {tuple(slice_shape)} need {per_slice}.")
  array = np.empty((num_slices, *slice_shape), dtype=object)
  for s, group in enumerate(groups):
    flat = np.empty(len(group), dtype=object)
    flat[:] = group
    array[s] = flat.reshape(tuple(slice_shape))
  return array


def rules_from_config(rules) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
  """Normalises rules read from a config (lists become tuples)."""
  out = []
  for name, target in rules:
    if isinstance(target, list):
      target = tuple(target)
    out.append((name, target))
  return tuple(out)


def check_rules(rules: Rules, mesh: Mesh) -> None:
  """Every mesh axis named by a rule must exist in the mesh. The `slice` axis (several TPU
  slices) may shard the batch only, and must shard it when there is more than one slice."""
  for name, target in rules:
    targets = () if target is None else (target,) if isinstance(target, str) else target
    for axis in targets:
      if axis not in mesh.axis_names:
        raise ValueError(
            f"config.axis_rules maps {name!r} to mesh axis {axis!r}, but the mesh has only "
            f"{mesh.axis_names}; add it to config.mesh (size 1 is fine) or fix the rule.")
    if SLICE in targets and name != axes.BATCH:
      raise ValueError(
          f"config.axis_rules maps {name!r} to mesh axis 'slice': only the batch may be "
          "split over slices (params, optimizer state and activations other than the batch "
          "stay whole within each slice, so that only the gradient all-reduce crosses the "
          "data-center network); remove 'slice' from that rule.")
  if SLICE in mesh.axis_names and mesh.shape[SLICE] > 1:
    batch = batch_axes(rules)
    if not batch or batch[0] != SLICE:
      raise ValueError(
          f"config.mesh.slice={mesh.shape[SLICE]}, but config.axis_rules shards 'batch' over "
          f"{batch}: the batch must be split over 'slice' first, e.g. ['batch', ['slice', "
          "'data', 'fsdp']]; use axes.MULTISLICE_RULES (or axes.with_slices(rules)).")


def fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
  """Drops the mesh axes of any dimension they don't divide (that dimension is replicated).

  A rule like conv_in -> fsdp can't split the 3 input channels of an RGB stem; replicating
  that one small kernel is what a user would do by hand.
  """
  fitted = []
  for dim, axis in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = () if axis is None else (axis,) if isinstance(axis, str) else tuple(axis)
    size = math.prod(mesh.shape[a] for a in names)
    fitted.append(axis if dim % size == 0 else None)
  return P(*fitted)


def logical_sharding(tree, mesh: Mesh, rules: Rules):
  """NamedShardings for a tree of boxed (logically partitioned) abstract arrays.

  Leaves without logical names are replicated; dimensions a mesh axis doesn't divide are
  replicated (see fit_spec). A mesh axis already used by an earlier dimension of a leaf
  is not used again (flax's resolution of the rules).
  """
  specs = nn.logical_to_mesh(nn.get_partition_spec(tree), rules)
  values = nn.meta.unbox(tree)
  return jax.tree.map(lambda spec, x: NamedSharding(mesh, fit_spec(spec, x.shape, mesh)),
                      specs, values, is_leaf=lambda x: isinstance(x, P))


def batch_axes(rules: Rules) -> tuple[str, ...]:
  """The mesh axes the batch dimension is sharded over."""
  for name, target in rules:
    if name == axes.BATCH:
      if target is None:
        return ()
      return (target,) if isinstance(target, str) else tuple(target)
  return ()


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
  """Sharding of a batch: leading dimension over the data axes, the rest replicated."""
  return NamedSharding(mesh, P(batch_axes(rules) or None))


def data_parallel_size(mesh: Mesh, rules: Rules) -> int:
  return math.prod(mesh.shape[a] for a in batch_axes(rules))


def check_batch_size(batch_size: int, mesh: Mesh, rules: Rules, field: str) -> None:
  """The global batch must split evenly over the data-parallel devices and the hosts."""
  size = data_parallel_size(mesh, rules)
  if batch_size % size:
    raise ValueError(
        f"{field}={batch_size} is not divisible by the {size} data-parallel devices of mesh "
        f"{dict(mesh.shape)} (batch axes {batch_axes(rules)}); use a multiple of {size}, "
        "e.g. " + f"{field}={max(size, batch_size // size * size)}.")
  if batch_size % jax.process_count():
    raise ValueError(f"{field}={batch_size} is not divisible by the {jax.process_count()} hosts; "
                     f"use a multiple of {math.lcm(size, jax.process_count())}.")
  if jax.process_count() > 1:
    check_host_batch_layout(mesh, rules, batch_size)


def process_batch_rows(mesh: Mesh, rules: Rules, global_batch: int, process: int | None = None,
                       process_of=lambda device: device.process_index) -> tuple[int, int]:
  """[start, stop) of the global batch rows held by the devices of `process` (default: this
  one). Raises if they are not one contiguous block. `process_of(device)`: its host."""
  process = jax.process_index() if process is None else process
  indices = batch_sharding(mesh, rules).devices_indices_map((global_batch,))
  rows = set()
  for device, index in indices.items():
    if process_of(device) == process:
      rows.update(range(*index[0].indices(global_batch)))
  start, stop = min(rows), max(rows) + 1
  if len(rows) != stop - start:
    raise ValueError(f"The devices of host {process} hold rows {sorted(rows)} of a global batch "
                     f"of {global_batch}, not one block; build the mesh with make_mesh, whose "
                     "devices are in host order.")
  return start, stop


def check_host_batch_layout(mesh: Mesh, rules: Rules, global_batch: int,
                            num_hosts: int | None = None,
                            process_of=lambda device: device.process_index) -> None:
  """Each host p must hold rows [p L, (p + 1) L) of every global batch (L = batch / hosts),
  the rows the input pipeline reads on host p (data/pipeline.py), before anything compiles.
  `num_hosts` and `process_of(device)` default to the running processes."""
  hosts = jax.process_count() if num_hosts is None else num_hosts
  local = global_batch // hosts
  for process in range(hosts):
    rows = process_batch_rows(mesh, rules, global_batch, process, process_of)
    if rows != (process * local, (process + 1) * local):
      raise ValueError(
          f"Mesh {dict(mesh.shape)} with batch axes {batch_axes(rules)} gives host {process} "
          f"the rows {rows} of each global batch of {global_batch}, but hosts read rows "
          f"[p * {local}, (p + 1) * {local}): every host's devices must span whole "
          "data-parallel groups. List the model-parallel axes (mesh axes not in the batch "
          "rule, e.g. tensor) last in config.mesh, with a product that divides the devices "
          f"of one host ({len(mesh.devices.flat) // hosts}).")


def host_to_global(batch, mesh: Mesh, rules: Rules):
  """Assembles each host's share of a batch (rows [p L, (p + 1) L) of the global batch on
  host p, see check_host_batch_layout) into globally sharded arrays."""
  sharding = batch_sharding(mesh, rules)
  if jax.process_count() > 1:
    local = len(next(iter(jax.tree.leaves(batch))))
    _check_layout_once(mesh, rules, local * jax.process_count())
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      batch)


_checked_layouts = set()


def _check_layout_once(mesh: Mesh, rules: Rules, global_batch: int) -> None:
  key = (mesh, tuple(rules), global_batch)
  if key not in _checked_layouts:
    check_host_batch_layout(mesh, rules, global_batch)
    _checked_layouts.add(key)
