"""One JAX device per CPU core, for training on a laptop or a CPU host.

JAX gives a CPU host one device. XLA runs the convolutions and matmuls of that device on
all cores, but much of a small U-Net's step (GroupNorm, FiLM, activations, the optimizer
update) runs on one thread. Split into one device per core, with the batch sharded over
`data`, all of the step runs on every core. On the 2-core machine of this repository the
shapes base stage trains at 84 img/s instead of 69, its SR stage at 64 instead of 49
(bench/README.md, "CPU devices").

`config.cpu_devices`: 0 (or absent) leaves JAX's default; -1 asks for one device per core
this process may use; a positive number asks for that many. The count is lowered to the
largest one that divides every stage's batch, so that `data: -1` still shards each batch
evenly; a `config.mesh` without -1 sets the count itself (e.g. `--config.mesh.data=1`
trains on one device). It sets the device count of JAX's CPU client only (a GPU or TPU
host's own devices are untouched), unless XLA_FLAGS already sets
`--xla_force_host_platform_device_count` (the tests simulate 8 devices that way), and only
before JAX has created its clients; otherwise it is skipped with a log line.
"""
from __future__ import annotations

import math
import os

import jax
from absl import logging

_COUNT_FLAG = "--xla_force_host_platform_device_count"


def available_cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def _batch_sizes(config) -> list[int]:
  return [int(stage.train.batch_size) for stage in config.get("stages", {}).values()]


def device_count(config, cores: int | None = None) -> int:
  """The CPU device count `config.cpu_devices` asks for (0: leave JAX's default)."""
  wanted = config.get("cpu_devices", 0) or 0
  if not isinstance(wanted, int) or isinstance(wanted, bool) or wanted < -1:
    raise ValueError(f"config.cpu_devices={wanted!r}: give 0 (JAX's default, one CPU device), "
                     "-1 (one device per core) or a positive number of devices.")
  if wanted == -1:
    wanted = cores or available_cores()
  sizes = list(config.get("mesh", {}).values())
  if wanted and sizes and -1 not in sizes:
    wanted = math.prod(sizes)  # a mesh without -1 names its device count itself
  if wanted <= 1:
    return 0
  batches = _batch_sizes(config)
  # The largest count <= wanted that divides every stage's batch.
  common = math.gcd(*batches) if batches else wanted
  return max(d for d in range(1, wanted + 1) if common % d == 0)


def apply(config) -> int:
  """Sets JAX's CPU device count from `config.cpu_devices`; returns it (0: unchanged).
  Call before anything touches a device."""
  count = device_count(config)
  if not count:
    return 0
  if _COUNT_FLAG in os.environ.get("XLA_FLAGS", ""):
    logging.info("config.cpu_devices: XLA_FLAGS already sets %s; leaving it.", _COUNT_FLAG)
    return 0
  try:
    # Only JAX's CPU client reads this: on a GPU or TPU host it changes nothing they use.
    jax.config.update("jax_num_cpu_devices", count)
  except RuntimeError:  # JAX refuses once its clients exist
    logging.warning("config.cpu_devices=%s skipped: JAX's devices were created before it "
                    "could apply.", config.cpu_devices)
    return 0
  logging.info("config.cpu_devices: %d CPU devices (%d cores).", count, available_cores())
  return count
