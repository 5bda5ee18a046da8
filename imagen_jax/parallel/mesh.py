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
    raise ValueError(
        f"config.mesh {shape} needs {known} devices but {num_devices} are available; set one "
        "axis to -1 (e.g. --config.mesh.data=-1) or change the sizes so their product is "
        f"{num_devices}.")
  return shape


def make_mesh(mesh_shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds a mesh with Auto axis types (Explicit axes break linen logical partitioning)."""
  devices = list(jax.devices() if devices is None else devices)
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
  replicated (see fit_spec).
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
    raise ValueError(f"{field}={batch_size} is not divisible by the {jax.process_count()} hosts.")


def host_to_global(batch, mesh: Mesh, rules: Rules):
  """Assembles each host's share of a batch into globally sharded arrays."""
  sharding = batch_sharding(mesh, rules)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      batch)
