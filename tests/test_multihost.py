"""Several hosts on one machine: 3 and then 2 local processes on CPU (2 and 3 simulated
devices each, 6 in all) train the tiny base stage (with the one-level U-Net of
tests/small_configs.py) through `python -m imagen_jax.train --coordinator_address=...`,
and must match one process with the same global 3 x 2 mesh (the same command with 6
simulated devices): the same examples at every step, each host reading only its share;
the same losses and train state; one TensorBoard writer and one sample grid writer (host
0); checkpoints written by all hosts. A SIGTERM to one of the 3 hosts stops every host at the
same step, and 2 hosts resume that checkpoint and still match.

One run of 3 hosts that is preempted and resumed on 2 covers both layouts: each process
costs ~28 CPU-seconds of imports, compilation and training on 2 cores in the suite (~45
with 4 hosts of 2 devices, what this test ran before: 322 CPU-s alone, 202 with 3 hosts;
hosts other than 0 never find their programs in JAX's persistent compilation cache,
which only process 0 writes; JAX's jax_share_binary_between_hosts, which would compile on
host 0 only, hangs here: the hosts also compile host-local programs that host 0 does
not). So 3 hosts rather than 4: every multi-host path is the same, for one process less.
The processes run in the background lane (tests/background.py) from the start of the
session; the test compares what they leave at the end.

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
from imagen_jax.data import pipeline
from imagen_jax.train import faults

import background
from fast_compile import xla_flags
from small_configs import minimal_base_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 5
DEVICES = 6                # in every layout: 1 x 6, 3 x 2 and 2 x 3 (hosts x local devices)
BATCH = 6                  # one example per device
MESH = {"data": 3, "fsdp": -1, "tensor": 1}  # 3 x 2 over the 6 devices of every layout
TRAIN = {"num_steps": NUM_STEPS, "log_every": 1, "checkpoint_every": NUM_STEPS,
         "sample_every": 0, "log_example_keys": True, "batch_size": BATCH}
# The one-process run keeps the state of every step, to compare the preempted run's with.
REFERENCE_TRAIN = dict(TRAIN, checkpoint_every=1, keep_checkpoints=NUM_STEPS)


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _command(workdir, data_dir, train, extra=()):
  flags = "--config.stages.base.train."
  return [sys.executable, "-m", "imagen_jax.train", "--config=configs/shapes.py:tiny",
          f"--workdir={workdir}", "--stage=base", f"--config.data_dir={data_dir}",
          *minimal_base_flags(), *(f"--config.mesh.{k}={v}" for k, v in MESH.items()),
          *(f"{flags}{k}={v}" for k, v in train.items()),
          # The whole config is validated on the mesh, the SR stage's batch too.
          f"--config.stages.sr.train.batch_size={BATCH}", *extra]


def _env(local_devices):
  return dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
              XLA_FLAGS=xla_flags(local_devices),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def _launch(num_hosts, workdir, data_dir, extra=()):
  """Starts the hosts of one run; host 0's stderr is a pipe, the others' go to files."""
  port = _free_port()
  command = [*_command(workdir, data_dir, TRAIN, extra),
             f"--coordinator_address=localhost:{port}", f"--num_processes={num_hosts}"]
  hosts, logs = [], []
  for i in range(num_hosts):
    log = f"{workdir}.{num_hosts}_hosts.host{i}.log"
    logs.append(log)
    stderr = subprocess.PIPE if i == 0 else open(log, "w")
    hosts.append(background.popen(command + [f"--process_id={i}"], cwd=REPO,
                                  env=_env(DEVICES // num_hosts), stdout=subprocess.DEVNULL,
                                  stderr=stderr, text=True))
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


def _assert_states_match(workdir, reference, step):
  """The saved train state of `step` (params, EMA, Adam moments, step, rng) is the
  one-process run's."""
  want, got = _state(reference, step), _state(workdir, step)
  assert sorted(want) == sorted(got)
  for path, a in want.items():
    b = got[path]
    assert a.shape == b.shape and a.dtype == b.dtype, path
    if a.dtype.kind == "f":
      np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5, err_msg=f"step {step}: {path}")
    else:
      np.testing.assert_array_equal(b, a, err_msg=f"step {step}: {path}")


def _launch_log(logs):
  return "\n".join(log[-3000:] for log in logs)


def three_hosts_then_two(tmp_path):
  """One process (the reference), then 3 hosts, host 2 of which gets SIGTERM after the first
  step, then 2 hosts that resume the 3 hosts' checkpoint and train to the end with a sample
  grid. Returns the workdirs, the runs' ([exit codes], [logs]) and what the preempted
  run's checkpoint directory held before the resume."""
  data_dir = str(tmp_path / "tfds")
  config = shapes_config.get_config("tiny")
  config.data_dir = data_dir
  tfds.disable_progress_bar()
  pipeline.prepare_data(config, "shapes_16")  # generated once, read by every process
  reference, workdir = str(tmp_path / "one_process"), str(tmp_path / "hosts")
  one = background.run(_command(reference, data_dir, REFERENCE_TRAIN), cwd=REPO, env=_env(DEVICES),
                       timeout=600)

  def sigterm_host2(line, hosts):
    if f"step 1/{NUM_STEPS}  loss" in line:
      hosts[2].send_signal(signal.SIGTERM)

  three = _run(3, workdir, data_dir, on_host0_line=sigterm_host2)
  checkpoints = os.path.join(workdir, "base", "checkpoints")
  saved = {}  # {entry of checkpoints/: the files of its `default` item, if any}
  for entry in os.listdir(checkpoints) if os.path.isdir(checkpoints) else ():
    item = os.path.join(checkpoints, entry, "default")
    saved[entry] = sorted(os.listdir(item)) if os.path.isdir(item) else None
  two = _run(2, workdir, data_dir, extra=[f"--config.stages.base.train.sample_every={NUM_STEPS}"])
  return reference, workdir, one, three, saved, two


@pytest.mark.background.with_args(three_hosts_then_two)
def test_three_hosts_preempted_then_two_hosts_resume_equal_one_process():
  """3 hosts train; host 2 alone gets SIGTERM after the first step; all 3 stop at the same
  step (the boundary after they shared it), save it together and exit 75. 2 hosts then
  resume that checkpoint, train to the end with a sample grid, and every step's examples
  and loss, and the train state at the stop and at the end, are the one-process run's."""
  reference, workdir, one, (codes, logs), saved, two = background.result(three_hosts_then_two)
  assert one.returncode == 0, one.stderr[-3000:]
  assert f"Trained {{'base': {NUM_STEPS}}}" in one.stderr, one.stderr[-3000:]

  assert codes == [faults.EXIT_PREEMPTED] * 3, _launch_log(logs)
  assert "Mesh {'data': 3, 'fsdp': 2, 'tensor': 1} over 6 devices (3 hosts)" in logs[0]
  stops = [re.findall(r"SIGTERM received: stage base stopped at step (\d+), its checkpoint "
                      r"saved", log) for log in logs]
  assert all(s == stops[0] for s in stops) and len(stops[0]) == 1, _launch_log(logs)
  stop = int(stops[0][0])
  # The signal came after step 1; the hosts agree on it one or two boundaries later.
  assert 2 <= stop < NUM_STEPS, stop
  assert list(saved) == [str(stop)], saved
  # Every host wrote its part of the checkpoint, and it is the one-process state.
  assert [f for f in saved[str(stop)] if f.startswith("ocdbt.process_")] == [
      f"ocdbt.process_{i}" for i in range(3)]
  _assert_states_match(workdir, reference, stop)

  # 2 hosts resumed it, with a sample grid at the end: every host samples, host 0 writes it.
  codes, logs = two
  assert codes == [0, 0], _launch_log(logs)
  assert "Mesh {'data': 3, 'fsdp': 2, 'tensor': 1} over 6 devices (2 hosts)" in logs[0]
  assert f"at step {stop}." in logs[0] and "Restored" in logs[0]
  assert f"Trained {{'base': {NUM_STEPS}}}" in logs[0]
  assert not any("Trained" in log for log in logs[1:])  # the other host only warns
  assert os.listdir(os.path.join(workdir, "base", "samples")) == [f"step_{NUM_STEPS:07d}.png"]

  # Each host read its own third (3 hosts) / half (2 hosts) of every global batch, in
  # host order.
  one = _keys(reference, 0)
  assert sorted(one) == list(range(NUM_STEPS)) and all(len(k) == BATCH for k in one.values())
  for step, names in one.items():
    num_hosts = 3 if step < stop else 2
    assert sum((_keys(workdir, h)[step] for h in range(num_hosts)), []) == names, step
  # The same losses at every step, from the TensorBoard events of host 0 of each run.
  events = glob.glob(os.path.join(workdir, "base", "tensorboard", "events.*"))
  assert len(events) == 2, events
  want, got = _losses(reference), _losses(workdir)
  assert sorted(want) == sorted(got) == list(range(1, NUM_STEPS + 1))
  np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)],
                             rtol=1e-5)
  _assert_states_match(workdir, reference, NUM_STEPS)
