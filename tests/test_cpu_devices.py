"""config.cpu_devices (parallel/cpu_devices.py): one JAX device per core on a CPU host."""
import os
import subprocess
import sys
import textwrap

import ml_collections
import pytest

from imagen_jax.parallel import cpu_devices


def _config(cpu_devices_value, *batches):
  return ml_collections.ConfigDict(dict(
      cpu_devices=cpu_devices_value,
      stages={f"s{i}": {"train": {"batch_size": b}} for i, b in enumerate(batches)}))


@pytest.mark.parametrize("value,batches,cores,expected", [
    (-1, (32, 32), 2, 2),      # one per core
    (-1, (32, 32), 6, 4),      # lowered to a divisor of the batch
    (-1, (32, 24), 16, 8),     # ... of every stage's batch (gcd 8)
    (3, (32, 24), 16, 2),      # an explicit count, lowered the same way
    (-1, (32,), 1, 0),         # one core: nothing to change
    (0, (32,), 8, 0),          # off
])
def test_device_count(value, batches, cores, expected):
  assert cpu_devices.device_count(_config(value, *batches), cores=cores) == expected


@pytest.mark.parametrize("mesh,expected", [({"data": 1, "fsdp": 1}, 0), ({"data": 2, "fsdp": 2}, 4),
                                           ({"data": -1, "fsdp": 2}, 8)])
def test_a_mesh_without_minus_one_sets_the_count(mesh, expected):
  config = _config(-1, 32)
  config.mesh = mesh
  assert cpu_devices.device_count(config, cores=8) == expected


def test_a_config_without_the_field_is_left_alone():
  assert cpu_devices.device_count(ml_collections.ConfigDict({"stages": {}}), cores=8) == 0


@pytest.mark.parametrize("value", [-2, 1.5, True, "cores"])
def test_bad_values_name_the_field(value):
  with pytest.raises(ValueError, match="config.cpu_devices"):
    cpu_devices.device_count(_config(value, 32), cores=2)


def test_xla_flags_that_set_the_count_win():
  # This test process simulates 8 devices through XLA_FLAGS (conftest.py).
  assert "--xla_force_host_platform_device_count" in os.environ["XLA_FLAGS"]
  assert cpu_devices.apply(_config(2, 32)) == 0


_CHILD = textwrap.dedent("""
    import sys, jax, ml_collections
    from imagen_jax.parallel import cpu_devices
    config = ml_collections.ConfigDict(dict(cpu_devices=3, stages={"b": {"train": {"batch_size": 12}}}))
    if sys.argv[1] == "late":
      jax.devices()  # the CPU client exists already: too late to split it
    print(cpu_devices.apply(config), jax.device_count())
""")


@pytest.mark.parametrize("when,expected", [("early", "3 3"), ("late", "0 1")])
def test_apply_splits_the_cpu_before_devices_exist(when, expected):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  run = subprocess.run([sys.executable, "-c", _CHILD, when], env=env, capture_output=True,
                       text=True, timeout=120)
  assert run.returncode == 0, run.stderr
  assert run.stdout.split("\n")[-2] == expected
  if when == "late":
    assert "skipped: JAX's devices were created" in run.stderr
