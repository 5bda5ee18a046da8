"""Several hosts, one program: starting the JAX distributed runtime, and the few decisions
the hosts of a run must take together.

Every host runs the same `python -m imagen_jax.train ...`; after `initialize`,
`jax.devices()` lists the devices of all hosts, the mesh spans them, and every jitted
step is one program across hosts. What a host decides on its own (has a SIGTERM arrived?
is a file there?) must become one answer for all hosts before it changes what they run,
or they stop running the same program and hang. `any_host`, `host0_value` and
`AgreedFlag` do that; on one host they are plain local reads.
"""
from __future__ import annotations

import itertools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None,
               local_device_ids: Sequence[int] | None = None) -> None:
  """Starts the distributed runtime; call once per process before anything touches a device.

  With no arguments JAX finds them in the environment: on a Cloud TPU VM slice (the TPU
  metadata), under SLURM or Open MPI, or from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES
  / JAX_PROCESS_ID. Elsewhere pass all three: the coordinator (host:port of process 0,
  reachable from every host), the number of processes and this one's id.
  """
  given = [coordinator_address is not None, num_processes is not None, process_id is not None]
  if any(given) and not all(given):
    raise ValueError("--coordinator_address, --num_processes and --process_id go together: "
                     "give all three, or none of them to read them from the TPU/SLURM "
                     "environment.")
  try:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               local_device_ids=local_device_ids)
  except ValueError as e:
    if any(given):
      raise
    raise ValueError(f"--distributed: {e} JAX found no TPU slice, SLURM or Open MPI "
                     "environment here; pass --coordinator_address, --num_processes and "
                     "--process_id (or drop --distributed on a single host).") from None
  logging.info("Distributed runtime up: process %d of %d, %d local of %d devices.",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())


def is_multihost() -> bool:
  return jax.process_count() > 1


def is_host0() -> bool:
  return jax.process_index() == 0


# The hosts' agreements below go through the distributed runtime's key-value store, not
# through device collectives: on CPU the first run of a program with collectives waits at
# most ~30 s for the slowest host to join (gloo's rendezvous), while hosts can be minutes
# apart (imports, reading a checkpoint, compiling at different speeds). For the same
# reason the training loop meets at a `barrier` between compiling a program and its
# first run. Every host calls these in the same order, so the n-th call of each host
# uses the same keys.
TIMEOUT_MS = 30 * 60 * 1000
_calls = itertools.count()


def _client():
  from jax._src import distributed as jax_distributed  # pylint: disable=import-outside-toplevel
  return jax_distributed.global_state.client  # jax has no public key-value API


def barrier(name: str) -> None:
  """Waits until every host reaches the barrier of this name (no-op on one host)."""
  if is_multihost():
    _client().wait_at_barrier(f"imagen_jax/{next(_calls)}/{name}", TIMEOUT_MS)


def any_host(flag: bool) -> bool:
  """True on every host if `flag` is True on any host. Blocking; every host must call it."""
  if not is_multihost():
    return bool(flag)
  key = f"imagen_jax/{next(_calls)}/any_host"
  client = _client()
  client.key_value_set(f"{key}/{jax.process_index()}", "1" if flag else "0")
  return any(client.blocking_key_value_get(f"{key}/{p}", TIMEOUT_MS) == "1"
             for p in range(jax.process_count()))


def host0_value(value: bool) -> bool:
  """Host 0's `value` (a bool), on every host. Blocking; every host must call it."""
  if not is_multihost():
    return bool(value)
  key = f"imagen_jax/{next(_calls)}/host0_value"
  client = _client()
  if is_host0():
    client.key_value_set(key, "1" if value else "0")
  return client.blocking_key_value_get(key, TIMEOUT_MS) == "1"


def put(value, sharding) -> jax.Array:
  """A global array of `value`, which every host holds in full (the same everywhere: a
  seeded init, a file all hosts read): each host places the shards of its own devices. No
  communication (jax.device_put would check the hosts' values against each other)."""
  value = np.asarray(value)
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def fetch(x) -> np.ndarray:
  """The whole value of a global array, as numpy on every host (all hosts must call it
  when the array spans several)."""
  if x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def host0_first(fn):
  """fn() on host 0, then on the others once it returned (e.g. preparing files that the
  other hosts then find in place on a shared filesystem). Returns fn()'s result."""
  if not is_multihost():
    return fn()
  if jax.process_index() == 0:
    result = fn()
    barrier("host0_first")
  else:
    barrier("host0_first")
    result = fn()
  return result


class AgreedFlag:
  """A local flag turned into one decision for all hosts, without stalling the device queue.

  `poll(local)` is called by every host at every step boundary, in step with the others.
  It returns True on every host at the same call: the first call after one at which some
  host passed local=True. Each call starts a tiny all-reduce of the hosts' flags and reads
  the previous call's (finished once the step dispatched after it has started), so
  agreement costs no host-device round trip and decides one step later than the signal.
  On one host it returns `local` itself, at once.
  """

  def __init__(self):
    self._pending = None
    if not is_multihost():
      return
    devices = np.asarray(jax.devices())
    self._mesh = Mesh(devices, ("all",), axis_types=(jax.sharding.AxisType.Auto,))
    self._sharding = NamedSharding(self._mesh, P("all"))
    self._local = [d for d in devices if d.process_index == jax.process_index()]
    flags = jax.ShapeDtypeStruct((len(devices),), jnp.int32, sharding=self._sharding)
    self._reduce = jax.jit(jnp.max, out_shardings=NamedSharding(self._mesh, P())).lower(
        flags).compile()
    barrier("agreed_flag")  # the hosts run it together from the first call on

  def poll(self, local: bool) -> bool:
    if not is_multihost():
      return bool(local)
    agreed = self._pending is not None and bool(np.asarray(self._pending))
    value = np.asarray([int(bool(local))], np.int32)
    shards = [jax.device_put(value, d) for d in self._local]
    flags = jax.make_array_from_single_device_arrays((len(self._mesh.devices),),
                                                     self._sharding, shards)
    self._pending = self._reduce(flags)
    return agreed

