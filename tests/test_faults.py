"""Preemption and faults: exact data resume, SIGTERM, SIGKILL, NaN/Inf, bad checkpoints,
failing saves. The tiny base stage with a one-level U-Net (tests/small_configs.py: these
are properties of the loop, not of the model); subprocesses only for the kill test."""
import concurrent.futures
import dataclasses
import errno
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import shapes as shapes_config
from imagen_jax.data import pipeline, tasks
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.text import T5Encoder, init_params
from imagen_jax.train import faults
from imagen_jax.train import stages as stages_lib
from imagen_jax.train.loop import prepare_stage, train_stage

import background
from fast_compile import xla_flags
from small_configs import minimal_base, minimal_base_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  tfds.disable_progress_bar()
  yield str(tmp_path_factory.mktemp("tfds"))
  tasks.register_shapes_task(16)  # give the standard task back its default data_dir


def tiny_config(data_dir=""):
  config = shapes_config.get_config("tiny")
  config.data_dir = data_dir
  return config


# ---- The data stream: a function of (seed, stream, step). ----

def test_reader_reads_every_record_by_index(data_dir):
  task = pipeline.register_task(tiny_config(data_dir), "shapes_16")
  reader = pipeline.SplitReader(task, "train")
  builder = task.source.tfds_dataset.builder
  in_order = [ex["key"].decode() for ex in
              builder.as_dataset(split="train", shuffle_files=False).as_numpy_iterator()]
  assert reader.num_examples == len(in_order) == 256
  backwards = np.arange(reader.num_examples)[::-1]  # random access, not a sequential scan
  by_index = [reader.features.deserialize_example(record)["key"].numpy().decode()
              for record in reader.read(backwards)][::-1]
  assert by_index == in_order


def test_each_epoch_is_a_permutation(data_dir):
  task = pipeline.register_task(tiny_config(data_dir), "shapes_16")
  reader = pipeline.SplitReader(task, "train")
  n = reader.num_examples
  index = reader.index_fn(seed=0, stream="base")
  epochs = [[int(index(tf.constant(p, tf.int64))) for p in range(e * n, (e + 1) * n)]
            for e in range(2)]
  assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(n))
  assert epochs[0] != epochs[1] and epochs[0] != list(range(n))
  other = reader.index_fn(seed=0, stream="sr")
  assert [int(other(tf.constant(p, tf.int64))) for p in range(n)] != epochs[0]


def test_resumed_stream_equals_uninterrupted(data_dir):
  task = pipeline.register_task(tiny_config(data_dir), "shapes_16")

  def batches(start_step):
    return pipeline.train_batches(task, "train", global_batch_size=8, max_length=16, seed=0,
                                  stream="base", start_step=start_step)

  # 32 batches of 8 make an epoch of 256: start inside the first epoch and across its end.
  full = batches(0)
  reference = [next(full) for _ in range(36)]
  epoch = [k.decode() for batch in reference[:32] for k in batch["key"]]
  assert len(set(epoch)) == 256, "an example was repeated or skipped within an epoch"
  for start in (5, 30):
    resumed = batches(start)
    for step in range(start, 36):
      got = next(resumed)
      for name in ("key", "image", "text_tokens"):
        np.testing.assert_array_equal(got[name], reference[step][name])
  assert set(reference[0]) == {"image", "text_tokens", "key"}
  assert reference[0]["image"].shape == (8, 16, 16, 3)


def test_hosts_read_their_slice_of_each_global_batch():
  def positions(host):
    ds = pipeline._host_positions(start_step=3, global_batch=8, local_batch=4, host=host)
    return [int(p) for p in ds.take(8)]
  assert positions(0) == [24, 25, 26, 27, 32, 33, 34, 35]
  assert positions(1) == [28, 29, 30, 31, 36, 37, 38, 39]


# ---- The loop, in process, on one device with batches that depend on the step only. ----

# The loop tests' stages differ only in checkpointing and fault settings, not in model,
# optimizer or batch shapes: their compiled train step and initial state are built once
# (loop.prepare_stage: what train_stage takes for a stage prepared in the background,
# tests/test_prepare_stage.py) and shared, saving each run ~4 s of tracing and compiling.
# {(model, diffusion, optimizer, batch shape): PreparedStage}
_PREPARED = {}


class Stage:
  """The tiny base stage and everything train_stage needs, with synthetic batches.

  reuse_compiled: train with the module's shared compiled step and (a copy of) its initial
  state; otherwise each run builds its own, as `python -m imagen_jax.train` does."""

  def __init__(self, reuse_compiled=False, **train):
    self.reuse_compiled = reuse_compiled
    config = minimal_base(tiny_config())
    config.stages.base.train.update(dict(log_every=1, checkpoint_every=2, sample_every=0,
                                         keep_checkpoints=2), **train)
    self.mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    self.rules = mesh_lib.rules_from_config(config.axis_rules)
    self.spec = {s.name: s for s in stages_lib.validate(config, self.mesh)}["base"]
    self.max_length = config.text.max_length
    t5 = stages_lib.t5_config(config)
    self.encoder = T5Encoder(t5)
    self.text_params = jax.device_put(init_params(t5, 0), NamedSharding(self.mesh, P()))

  def batch(self, step):
    rng = np.random.default_rng(step)
    b, r = self.spec.train.batch_size, self.spec.resolution
    tokens = rng.integers(2, 32000, (b, self.max_length)).astype(np.int32)
    tokens[:, -3:] = 0
    tokens[:, -4] = 1
    return {"image": rng.integers(0, 256, (b, r, r, 3), dtype=np.uint8), "text_tokens": tokens}

  def batches(self, start_step, on_step=None):
    step = start_step
    while True:
      if on_step:
        on_step(step)
      yield self.batch(step)
      step += 1

  def train(self, workdir, num_steps, text_params=None, on_step=None):
    spec = dataclasses.replace(self.spec, train=dataclasses.replace(self.spec.train,
                                                                    num_steps=num_steps))
    sample = dict(self.batch(0), caption=np.asarray([b"x"] * self.spec.train.batch_size))
    return train_stage(
        spec, workdir=str(workdir), mesh=self.mesh, rules=self.rules, text_encoder=self.encoder,
        text_params=self.text_params if text_params is None else text_params,
        make_batches=lambda start: self.batches(start, on_step), sample_batch=sample, seed=0,
        max_length=self.max_length, prepared=self._prepared() if self.reuse_compiled else None)

  def _prepared(self):
    """A (done) Future of the shared PreparedStage, with a fresh copy of its initial state
    (the compiled step donates the state it is given)."""
    spec = self.spec
    key = repr((spec.unet, spec.diffusion, spec.optimizer, spec.train.batch_size,
                spec.resolution))
    if key not in _PREPARED:
      _PREPARED[key] = prepare_stage(spec, mesh=self.mesh, rules=self.rules,
                                     text_encoder=self.encoder, text_params=self.text_params,
                                     seed=0, max_length=self.max_length)
    prepared = _PREPARED[key]
    future = concurrent.futures.Future()
    future.set_result(dataclasses.replace(
        prepared, initial_state=jax.tree.map(lambda x: x.copy(), prepared.initial_state)))
    return future

  def nan_text_params(self):
    return jax.tree.map(lambda x: x * jnp.nan, self.text_params)


@pytest.fixture(scope="module")
def stage():
  return Stage(reuse_compiled=True)


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
  """An uninterrupted 6-step run that keeps every checkpoint: (final state, workdir)."""
  workdir = tmp_path_factory.mktemp("clean")
  return Stage(reuse_compiled=True, keep_checkpoints=3).train(workdir, 6), workdir


def assert_states_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def restored_leaves(workdir, step):
  """The leaves of a stage checkpoint as saved (numpy; PRNG keys as their key data)."""
  restored = ocp.StandardCheckpointer().restore(
      os.path.join(workdir, "base", "checkpoints", str(step), "default"))
  return [np.asarray(jax.random.key_data(x)) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
          else np.asarray(x) for x in jax.tree.leaves(restored)]


def steps_on_disk(workdir):
  directory = os.path.join(workdir, "base", "checkpoints")
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


# ---- NaN / Inf. ----

def test_nonfinite_updates_are_skipped_and_counted(stage, tmp_path):
  state = stage.train(tmp_path, 2, text_params=stage.nan_text_params())
  assert int(state.step) == 2 and int(state.skipped_steps) == 2
  # Nothing moved: params, Adam's moments and the EMA are those of initialisation.
  fresh = stage.train(tmp_path / "fresh", 0)
  for name in ("params", "opt_state", "ema_params"):
    assert_states_equal(getattr(state, name), getattr(fresh, name))
  # Finite batches again: training goes on from there, and the count is kept.
  state = stage.train(tmp_path, 4)
  assert int(state.skipped_steps) == 2
  assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(state.params))
  moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state.params),
                                                    jax.tree.leaves(fresh.params))]
  assert any(moved)


def test_stops_after_k_consecutive_nonfinite_steps(stage, tmp_path, caplog):
  limited = Stage(reuse_compiled=True, max_consecutive_nonfinite=3)
  with pytest.raises(faults.NonfiniteError,
                     match=r"steps 1\.\.3 all had a non-finite loss.*"
                           r"max_consecutive_nonfinite=3.*train state is that of step 0"):
    limited.train(tmp_path, 10, text_params=limited.nan_text_params())
  assert "update skipped (1 in a row" in caplog.text
  # The checkpoint of step 2 holds the untouched initial params, not NaNs.
  assert steps_on_disk(tmp_path) == [2]
  assert all(np.isfinite(x).all() for x in restored_leaves(tmp_path, 2) if x.dtype.kind == "f")


# ---- SIGTERM (in process): save at the next step boundary, stop, resume exactly. ----

def test_sigterm_saves_stops_and_resumes_exactly(stage, clean_run, tmp_path):
  def send_sigterm(step):
    if step == 3:
      os.kill(os.getpid(), signal.SIGTERM)  # arrives while step 3 is being prepared

  with pytest.raises(faults.Preempted, match="stopped at step 4, its checkpoint saved") as e:
    stage.train(tmp_path, 6, on_step=send_sigterm)
  assert e.value.saved_step == 4 and steps_on_disk(tmp_path) == [2, 4]
  resumed = stage.train(tmp_path, 6)
  assert_states_equal(resumed, clean_run[0])


# ---- Checkpoints that do not restore, saves that fail. ----

def _truncate_files(directory):
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _copy_checkpoints(clean_workdir, workdir, steps):
  for step in steps:
    shutil.copytree(os.path.join(clean_workdir, "base", "checkpoints", str(step)),
                    os.path.join(workdir, "base", "checkpoints", str(step)))


def test_unreadable_latest_checkpoint_falls_back(stage, clean_run, tmp_path, caplog):
  _copy_checkpoints(clean_run[1], tmp_path, [2, 4])
  checkpoints = os.path.join(tmp_path, "base", "checkpoints")
  _truncate_files(os.path.join(checkpoints, "4"))
  # And a save that a kill interrupted: orbax's temporary directory, never finalized.
  os.makedirs(os.path.join(checkpoints, "6.orbax-checkpoint-tmp-1234", "default"))
  with caplog.at_level(logging.WARNING):
    resumed = stage.train(tmp_path, 6)
  assert "4 does not restore" in caplog.text
  assert "Resuming" in caplog.text and "from step 2" in caplog.text
  assert os.path.isdir(os.path.join(checkpoints, "4.unreadable"))  # kept for inspection
  assert steps_on_disk(tmp_path) == [4, 6]
  assert_states_equal(resumed, clean_run[0])


def test_no_readable_checkpoint_is_an_error(stage, clean_run, tmp_path):
  _copy_checkpoints(clean_run[1], tmp_path, [2])
  _truncate_files(os.path.join(tmp_path, "base", "checkpoints", "2"))
  with pytest.raises(RuntimeError, match="No checkpoint in .* restores"):
    stage.train(tmp_path, 4)


def _fail_saves(monkeypatch, steps, when):
  """Makes the saves of `steps` fail: at once ("start") or while committing ("commit")."""
  if when == "start":
    original = ocp.CheckpointManager.save

    def save(self, step, *args, **kwargs):
      if step in steps:
        raise PermissionError(errno.EACCES, "Permission denied", str(self.directory))
      return original(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    return
  from orbax.checkpoint._src.path import atomicity  # the tmp -> final rename of a save
  original_rename = atomicity.async_path.rename

  async def rename(src, dst):
    if os.path.basename(str(dst)) in {str(s) for s in steps}:
      raise OSError(errno.ENOSPC, "No space left on device", str(dst))
    return await original_rename(src, dst)

  monkeypatch.setattr(atomicity.async_path, "rename", rename)


@pytest.mark.parametrize("when", ["start", "commit"])
def test_failing_saves_keep_the_last_good_checkpoint(stage, clean_run, tmp_path, monkeypatch,
                                                      caplog, when):
  one = Stage(reuse_compiled=True, keep_checkpoints=1)  # the most a failing save could destroy
  _fail_saves(monkeypatch, {4, 6}, when)
  with caplog.at_level(logging.ERROR):
    state = one.train(tmp_path, 6)
  assert int(state.step) == 6  # training went on
  assert_states_equal(state, clean_run[0])
  assert "Checkpoint at step 4" in caplog.text and "Checkpoint at step 6" in caplog.text
  assert "the last complete checkpoint is step 2" in caplog.text
  assert steps_on_disk(tmp_path) == [2]
  # The last good checkpoint is intact: it restores and equals step 2 of the clean run.
  monkeypatch.undo()
  for a, b in zip(restored_leaves(tmp_path, 2), restored_leaves(clean_run[1], 2)):
    np.testing.assert_array_equal(a, b)


# ---- The command line: SIGKILL at random moments, then SIGTERM, then to the end. ----
# Its subprocesses run in the background lane (tests/background.py) from the start of the
# session; the test compares what they leave at the end.

NUM_STEPS = 12


def _train_command(workdir, data_dir):
  train = "--config.stages.base.train."
  return [sys.executable, "-m", "imagen_jax.train", "--config=configs/shapes.py:tiny",
          f"--workdir={workdir}", "--stage=base", f"--config.data_dir={data_dir}",
          *minimal_base_flags(),
          f"{train}num_steps={NUM_STEPS}", f"{train}checkpoint_every=3", f"{train}log_every=1",
          f"{train}sample_every=0", f"{train}log_example_keys=True", "--config.cpu_devices=0"]


# One CPU device (config.cpu_devices=0): what these runs prove does not depend on the
# devices, and one device's train step compiles faster than a partitioned one. The
# persistent compilation cache of conftest.py.
ENV = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS=xla_flags(),
           JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def _start(workdir, data_dir, stderr=subprocess.PIPE):
  return background.popen(_train_command(workdir, data_dir), cwd=REPO, env=ENV,
                          stderr=stderr, stdout=subprocess.DEVNULL, text=True)


def _run_until(workdir, data_dir, kill_after=None, sig=signal.SIGKILL):
  """Runs training; sends `sig` once it has logged `kill_after` steps (counted from where it
  resumed, so that it never finishes first). Returns (returncode, log)."""
  process = _start(workdir, data_dir)
  log, steps = [], 0
  try:
    for line in process.stderr:
      log.append(line)
      steps += f"/{NUM_STEPS}  loss" in line
      if steps == kill_after:
        process.send_signal(sig)
        kill_after = None
    return process.wait(timeout=600), "".join(log)
  finally:
    if process.poll() is None:
      process.kill()


def _wait_for_line(process, log, text, timeout=300):
  """Waits until `log` holds `text`, or `process` has ended."""
  deadline = time.monotonic() + timeout
  while process.poll() is None and time.monotonic() < deadline:
    if text in log.read_text():
      return
    time.sleep(0.2)


def _trained_keys(workdir):
  """{step: keys} of the key log; a step trained again after a resume: its last line."""
  keys = {}
  with open(os.path.join(workdir, "base", "example_keys.process_0.txt")) as f:
    for line in f:
      if line.endswith("\n"):
        step, *names = line.split()
        keys[int(step)] = names
  return keys


def kill_and_resume(tmp_path):
  """An uninterrupted run, and beside it (its own workdir; most of a run's start is
  single-threaded) a run SIGKILLed twice after 1-3 logged steps, SIGTERMed once, then run
  to the end. Returns the two workdirs, where the kills landed and [(what, expected exit
  code, exit code, log)] of each interrupted run."""
  data_dir = str(tmp_path / "tfds")
  tfds.disable_progress_bar()
  pipeline.prepare_data(tiny_config(data_dir), "shapes_16")  # once, before both runs
  reference, interrupted = str(tmp_path / "reference"), str(tmp_path / "interrupted")
  # Kill after 1-3 logged steps: with a checkpoint every 3 steps and asynchronous saves,
  # the kill lands before, during or after a save; the SIGTERM run then stops at its
  # first step boundary after the signal.
  rng = random.Random()
  kills = [rng.randint(1, 3), rng.randint(1, 3)]
  points = f"SIGKILL after {kills} logged steps, then SIGTERM"
  runs = []
  # The uninterrupted run's log goes to a file, which unlike a pipe never fills up.
  with open(tmp_path / "reference.log", "w") as reference_log:
    uninterrupted = _start(reference, data_dir, stderr=reference_log)
  try:
    # The interrupted runs start once this one has compiled (and cached) its programs,
    # rather than compiling them a second time beside it.
    _wait_for_line(uninterrupted, tmp_path / "reference.log", f"step 1/{NUM_STEPS}  loss")
    for kill_after in kills:
      runs.append(("SIGKILL", -signal.SIGKILL,
                   *_run_until(interrupted, data_dir, kill_after)))
    runs.append(("SIGTERM", faults.EXIT_PREEMPTED,
                 *_run_until(interrupted, data_dir, 1, signal.SIGTERM)))
    runs.append(("to the end", 0, *_run_until(interrupted, data_dir)))
    runs.append(("uninterrupted", 0, uninterrupted.wait(timeout=600),
                 (tmp_path / "reference.log").read_text()))
  finally:
    if uninterrupted.poll() is None:
      uninterrupted.kill()
  return reference, interrupted, points, runs


@pytest.mark.background.with_args(kill_and_resume)
def test_killed_and_preempted_run_equals_uninterrupted():
  reference, interrupted, points, runs = background.result(kill_and_resume)
  for what, expected, code, log in runs:
    assert code == expected, f"{points}, {what}: {log[-3000:]}"
  logs = {what: log for what, _, _, log in runs}
  assert "SIGTERM received: stage base stopped at step" in logs["SIGTERM"], logs["SIGTERM"][-3000:]
  assert "Restored" in logs["to the end"]

  # Bit for bit: params, Adam state, EMA, step, rng.
  for a, b in zip(restored_leaves(reference, NUM_STEPS), restored_leaves(interrupted, NUM_STEPS)):
    np.testing.assert_array_equal(a, b, err_msg=points)
  # The same examples at every step: none seen twice, none skipped.
  keys = _trained_keys(reference)
  assert sorted(keys) == list(range(NUM_STEPS))
  assert len({k for names in keys.values() for k in names}) == NUM_STEPS * 8
  assert _trained_keys(interrupted) == keys, points
