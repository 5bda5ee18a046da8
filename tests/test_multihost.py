"""Several hosts on one machine: 2 and 4 local processes on CPU (4 and 2 simulated devices
each, 8 in all) train the tiny base stage through `python -m imagen_jax.train
--coordinator_address=...`, and must match one process with the same global 2 x 4 mesh
(this pytest process, 8 devices): the same examples at every step, each host reading only
its share; the same losses and final train state; one TensorBoard writer and one sample
grid writer (host 0); checkpoints written by all hosts. A SIGTERM to one host stops every
host at the same step, and the resumed run still matches.

Tolerance: not bit for bit. The hosts' gradient all-reduce runs over gloo, which sums in
another order than XLA's in-process all-reduce, so values differ in the last bits: losses
by ~1e-7 relative, train state leaves by ~1e-6 absolute after 4 steps (measured on this
machine: 9e-7 at most). Asserted: losses rtol 1e-5, train state |a - b| <= 1e-5 + 1e-5
|a| (an Adam step moves a weight by up to lr = 1e-3); integer leaves (step, Adam's count,
rng key data) exactly.
"""
import glob
import os
import re
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from configs import shapes as shapes_config
from imagen_jax.data import pipeline, tasks
from imagen_jax.train import faults
from imagen_jax.train.cascade import train_cascade

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 4
MESH = {"data": 2, "fsdp": -1, "tensor": 1}  # 2 x 4 over the 8 devices of every layout
TRAIN = {"num_steps": NUM_STEPS, "log_every": 1, "checkpoint_every": NUM_STEPS,
         "sample_every": 0, "log_example_keys": True}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  tfds.disable_progress_bar()
  directory = str(tmp_path_factory.mktemp("tfds"))
  config = shapes_config.get_config("tiny")
  config.data_dir = directory
  pipeline.register_task(config, "shapes_16")  # generated once, read by every process
  yield directory
  tasks.register_shapes_task(16)  # give the standard task back its default data_dir


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
  """One process, the same global mesh: this pytest process and its 8 devices."""
  workdir = str(tmp_path_factory.mktemp("one_process"))
  config = shapes_config.get_config("tiny")
  config.data_dir = data_dir
  config.mesh.update(MESH)
  config.stages.base.train.update(TRAIN)
  assert train_cascade(config, workdir, "base") == {"base": NUM_STEPS}
  return workdir


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(num_hosts, workdir, data_dir, extra=()):
  """Starts the hosts of one run; host 0's stderr is a pipe, the others' go to files."""
  port = _free_port()
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={8 // num_hosts} "
                       "--xla_backend_optimization_level=0",
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
  train = "--config.stages.base.train."
  command = [sys.executable, "-m", "imagen_jax.train", "--config=configs/shapes.py:tiny",
             f"--workdir={workdir}", "--stage=base", f"--config.data_dir={data_dir}",
             *(f"--config.mesh.{k}={v}" for k, v in MESH.items()),
             *(f"{train}{k}={v}" for k, v in TRAIN.items()), *extra,
             f"--coordinator_address=localhost:{port}", f"--num_processes={num_hosts}"]
  hosts, logs = [], []
  for i in range(num_hosts):
    log = f"{workdir}.host{i}.log"
    logs.append(log)
    stderr = subprocess.PIPE if i == 0 else open(log, "w")
    hosts.append(subprocess.Popen(command + [f"--process_id={i}"], cwd=REPO, env=env,
                                  stdout=subprocess.DEVNULL, stderr=stderr, text=True))
  return hosts, logs


def _run(num_hosts, workdir, data_dir, extra=(), on_host0_line=None):
  """Runs one multi-host training to its end: ([exit codes], [logs])."""
  hosts, logs = _launch(num_hosts, workdir, data_dir, extra)
  host0_log = []
  try:
    with open(logs[0], "w") as copy:  # kept for debugging, like the other hosts' logs
      for line in hosts[0].stderr:
        host0_log.append(line)
        copy.write(line)
        if on_host0_line:
          on_host0_line(line, hosts)
    codes = [h.wait(timeout=300) for h in hosts]
  finally:
    for h in hosts:
      if h.poll() is None:
        h.kill()
  texts = ["".join(host0_log)] + [open(log).read() for log in logs[1:]]
  return codes, texts


def _losses(workdir):
  """{step: loss} from the run's TensorBoard event files (written by host 0 only)."""
  losses = {}
  for path in sorted(glob.glob(os.path.join(workdir, "base", "tensorboard", "events.*"))):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.tag == "loss":
          losses[event.step] = float(tf.make_ndarray(value.tensor))
  return losses


def _state(workdir, step):
  """{path: numpy leaf} of a saved train state, whatever mesh and hosts saved it."""
  path = os.path.join(workdir, "base", "checkpoints", str(step), "default")
  checkpointer = ocp.PyTreeCheckpointer()
  metadata = checkpointer.metadata(path)
  metadata = getattr(metadata, "item_metadata", metadata)
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
  restored = checkpointer.restore(path, restore_args=args)
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(restored)[0]}


def _keys(workdir, host):
  """{step: [example keys]} that `host` read; a step trained again after a resume: the
  last line."""
  keys = {}
  with open(os.path.join(workdir, "base", f"example_keys.process_{host}.txt")) as f:
    for line in f:
      step, *names = line.split()
      keys[int(step)] = names
  return keys


def _assert_matches_reference(workdir, reference, num_hosts):
  # Each host read its own quarter / half of every global batch, in host order.
  one = _keys(reference, 0)
  assert sorted(one) == list(range(NUM_STEPS)) and all(len(k) == 8 for k in one.values())
  per_host = [_keys(workdir, h) for h in range(num_hosts)]
  for step, names in one.items():
    assert sum((keys[step] for keys in per_host), []) == names, step
  # The same losses at every step.
  want, got = _losses(reference), _losses(workdir)
  assert sorted(want) == sorted(got) == list(range(1, NUM_STEPS + 1))
  np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)],
                             rtol=1e-5)
  # The same final train state: params, EMA, Adam moments, step, rng.
  want, got = _state(reference, NUM_STEPS), _state(workdir, NUM_STEPS)
  assert sorted(want) == sorted(got)
  for path, a in want.items():
    b = got[path]
    assert a.shape == b.shape and a.dtype == b.dtype, path
    if a.dtype.kind == "f":
      np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5, err_msg=path)
    else:
      np.testing.assert_array_equal(b, a, err_msg=path)
  # Host 0 alone writes TensorBoard events: one file per run.
  events = glob.glob(os.path.join(workdir, "base", "tensorboard", "events.*"))
  return events


def test_four_hosts_equal_one_process(data_dir, reference, tmp_path):
  workdir = str(tmp_path / "four_hosts")
  codes, logs = _run(4, workdir, data_dir)
  assert codes == [0, 0, 0, 0], "\n".join(log[-3000:] for log in logs)
  assert "Mesh {'data': 2, 'fsdp': 4, 'tensor': 1} over 8 devices (4 hosts)" in logs[0]
  assert f"Trained {{'base': {NUM_STEPS}}}" in logs[0]
  assert not any("Trained" in log for log in logs[1:])  # the other hosts only warn
  events = _assert_matches_reference(workdir, reference, 4)
  assert len(events) == 1
  # Every host wrote its part of the checkpoint.
  saved = os.path.join(workdir, "base", "checkpoints", str(NUM_STEPS), "default")
  assert sorted(glob.glob(os.path.join(saved, "ocdbt.process_*"))) == [
      os.path.join(saved, f"ocdbt.process_{i}") for i in range(4)]


def test_sigterm_to_one_host_stops_all_at_one_step(data_dir, reference, tmp_path):
  """Host 1 alone gets SIGTERM, around the first step; both hosts stop at the same step
  (the boundary after they shared it), save it together and exit 75; the rerun resumes
  there and ends equal to the uninterrupted single-process run."""
  workdir = str(tmp_path / "two_hosts")

  def sigterm_host1(line, hosts):
    if "train step compiled" in line:  # both hosts are past the stage's start
      hosts[1].send_signal(signal.SIGTERM)

  codes, logs = _run(2, workdir, data_dir, on_host0_line=sigterm_host1)
  assert codes == [faults.EXIT_PREEMPTED] * 2, "\n".join(log[-3000:] for log in logs)
  stops = [re.findall(r"SIGTERM received: stage base stopped at step (\d+), its checkpoint "
                      r"saved", log) for log in logs]
  assert stops[0] == stops[1] and len(stops[0]) == 1, "\n".join(log[-3000:] for log in logs)
  stop = int(stops[0][0])
  assert 1 <= stop < NUM_STEPS  # one or two steps after the signal (README: measured)
  assert sorted(os.listdir(os.path.join(workdir, "base", "checkpoints"))) == [str(stop)]

  # Resumed, with a sample grid at the end: every host samples, host 0 writes the grid.
  codes, logs = _run(2, workdir, data_dir,
                     extra=[f"--config.stages.base.train.sample_every={NUM_STEPS}"])
  assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
  assert f"at step {stop}." in logs[0] and "Restored" in logs[0]
  events = _assert_matches_reference(workdir, reference, 2)
  assert len(events) == 2  # host 0 of each of the two runs
  assert os.listdir(os.path.join(workdir, "base", "samples")) == [f"step_{NUM_STEPS:07d}.png"]
