"""Device mesh construction and sharding helpers.

A mesh is described by a mapping of axis name -> size, in order, e.g.
`{"data": -1, "fsdp": 1, "tensor": 1}`; -1 means "all the devices the other axes leave".
Logical axis names (see `axes.py`) are mapped to mesh axes by rules, and everything
below is expressed through those rules: model code never sees device counts.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from imagen_jax.parallel import axes

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]


def resolve_mesh_shape(mesh_shape: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Replaces a single -1 with the number of devices left; checks the product."""
  shape = dict(mesh_shape)
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


def make_mesh(mesh_shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds a mesh with Auto axis types (Explicit axes break linen logical partitioning).

  Devices are laid out host by host (sorted by process index, then id): with the batch
  axes leading, each host's devices then hold one contiguous block of every global
  batch, block `jax.process_index()` in host order, which is the block the input
  pipeline reads on that host (`check_host_batch_layout`). An explicit `devices` list is
  laid out in its own order.
  """
  if devices is None:
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  devices = list(devices)
  shape = resolve_mesh_shape(mesh_shape, len(devices))
  device_array = np.asarray(devices).reshape(tuple(shape.values()))
  return Mesh(device_array, tuple(shape.keys()),
              axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def rules_from_config(rules) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
  """Normalises rules read from a config (lists become tuples)."""
  out = []
  for name, target in rules:
    if isinstance(target, list):
      target = tuple(target)
    out.append((name, target))
  return tuple(out)


def check_rules(rules: Rules, mesh: Mesh) -> None:
  """Every mesh axis named by a rule must exist in the mesh."""
  for name, target in rules:
    targets = () if target is None else (target,) if isinstance(target, str) else target
    for axis in targets:
      if axis not in mesh.axis_names:
        raise ValueError(
            f"config.axis_rules maps {name!r} to mesh axis {axis!r}, but the mesh has only "
            f"{mesh.axis_names}; add it to config.mesh (size 1 is fine) or fix the rule.")


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
