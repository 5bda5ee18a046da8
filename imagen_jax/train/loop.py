"""The training loop of one cascade stage, in named sections (after big_vision's)."""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import io
import os
import tempfile
import time
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from imagen_jax.models import UNet
from imagen_jax.parallel import distributed
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.sample.grid import make_grid
from imagen_jax.sample.stage_sampler import make_stage_sampler
from imagen_jax.train import checkpoint as ckpt
from imagen_jax.train import faults
from imagen_jax.train import paths
from imagen_jax.train.compile_options import run_rarely_options
from imagen_jax.train.metrics import MetricWriter
from imagen_jax.train.stages import StageSpec
from imagen_jax.train.state import abstract_train_state, init_train_state, make_optimizer
from imagen_jax.train.step import (downsample, float_to_images, images_to_float,
                                   make_train_step, text_features)


def example_inputs(spec: StageSpec, text_dim: int, max_length: int, batch: int = 1) -> tuple:
  """Dummy U-Net inputs of the right shapes (for init and tracing)."""
  r = spec.resolution
  cond = {"text": jnp.zeros((batch, max_length, text_dim)),
          "text_mask": jnp.ones((batch, max_length), bool)}
  if spec.lowres_resolution:
    lr = spec.lowres_resolution
    cond.update(lowres=jnp.zeros((batch, lr, lr, 3)), lowres_aug_t=jnp.zeros((batch,)))
  return jnp.zeros((batch, r, r, 3)), jnp.zeros((batch,)), cond


def _format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def train_stage(spec: StageSpec, *, workdir: str, mesh, rules, text_encoder: nn.Module,
                text_params, make_batches, sample_batch, seed: int, max_length: int,
                prepared: "concurrent.futures.Future | None" = None, on_started=None):
  """Trains one stage to spec.train.num_steps, resuming from the workdir if possible.

  make_batches: fn(start_step) -> iterator of host-local numpy batches
    {"image", "text_tokens"[, "key"]}, from the batch of step start_step on (an exact
    resume needs batch s to depend on s only).
  sample_batch: a fixed host-local batch (captions + images) for the periodic sample grids.
  prepared: a Future of `prepare_stage(spec, ...)` (made in the background while an earlier
    stage trained): its model, initial state and compiled step are used, not rebuilt.
  on_started: called once the first train step of this stage has been dispatched.
  Returns the final TrainState. Raises faults.Preempted after a SIGTERM, once the
  checkpoint of the current step is saved, and faults.NonfiniteError after
  spec.train.max_consecutive_nonfinite skipped updates in a row.
  """
  is_host0 = jax.process_index() == 0
  stage_dir = os.path.join(workdir, spec.name)
  writer = MetricWriter(os.path.join(stage_dir, "tensorboard"), enabled=is_host0)

  # ---- Model, optimizer and the sharded train state. ----
  if prepared is not None:
    t0 = time.time()
    prepared = prepared.result()  # re-raises a failure of the background preparation
    logging.info("Stage %s: prepared in the background (waited %.1fs).", spec.name,
                 time.time() - t0)
    unet, optimizer, inputs = prepared.unet, prepared.optimizer, prepared.inputs
    abstract, shardings = prepared.abstract, prepared.shardings
  else:
    unet = UNet(spec.unet)
    optimizer = make_optimizer(spec.optimizer)
    inputs = example_inputs(spec, text_encoder.config.d_model, max_length)
    abstract, shardings = abstract_train_state(unet, inputs, optimizer, mesh=mesh, rules=rules)
  num_params = sum(x.size for x in jax.tree.leaves(abstract.params))
  logging.info("Stage %s: U-Net with %.2fM parameters.", spec.name, num_params / 1e6)

  # ---- Resume, or initialise. ----
  manager = ckpt.stage_manager(workdir, spec.name)
  state = _resume(manager, abstract, shardings)
  if state is not None and int(state.step) >= spec.train.num_steps:
    logging.info("Stage %s already trained to step %d.", spec.name, int(state.step))
    manager.close()
    return state
  start_step = 0 if state is None else int(state.step)
  if state is None and prepared is not None:
    state = prepared.initial_state
  elif state is None:
    rng = jax.random.fold_in(jax.random.key(seed), zlib_hash(spec.name))
    init = functools.partial(init_train_state, unet, inputs, optimizer, rng=rng, mesh=mesh,
                             rules=rules, shardings=shardings)
    if jax.process_count() == 1:
      # Initialising compiles a program of its own; on one host it compiles (and runs) in
      # a thread beside the train step's compilation, as both are mostly single-threaded.
      pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="init_state")
      state = pool.submit(init)
      pool.shutdown(wait=False)
    else:
      state = init()
  saver = ckpt.Saver(manager, keep=spec.train.keep_checkpoints)
  with faults.handle_sigterm():
    try:
      state = _compile_and_loop(spec, state, abstract, shardings, saver, start_step=start_step,
                                unet=unet, optimizer=optimizer,
                                text_encoder=text_encoder, text_params=text_params,
                                make_batches=make_batches, sample_batch=sample_batch, mesh=mesh,
                                rules=rules, stage_dir=stage_dir, writer=writer, seed=seed,
                                compiled=None if prepared is None else prepared.compiled,
                                on_started=on_started)
    finally:
      saver.close()  # waits for the last save; a failed one is logged, never raised
      writer.flush()
  return state


def compile_train_step(spec, unet, optimizer, text_encoder, text_params, abstract, shardings,
                       global_batch, *, mesh, rules):
  """The stage's train step compiled for `global_batch` (arrays or ShapeDtypeStructs)."""
  train_step = make_train_step(unet, text_encoder, spec.diffusion, optimizer,
                               ema_decay=spec.optimizer.ema_decay,
                               lowres_resolution=spec.lowres_resolution,
                               train_crop=spec.train_crop)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    return jax.jit(
        train_step, in_shardings=(shardings, mesh_lib.batch_sharding(mesh, rules), None),
        out_shardings=(shardings, None), donate_argnums=(0,),
    ).lower(ckpt.abstract_like(abstract, shardings), global_batch, text_params).compile()


def _avals(batch) -> dict:
  return {k: (tuple(v.shape), str(v.dtype)) for k, v in batch.items()}


@dataclasses.dataclass
class PreparedStage:
  """A stage's model, abstract state, initial state and compiled step, built ahead."""
  unet: nn.Module
  optimizer: object
  inputs: tuple
  abstract: object
  shardings: object
  initial_state: object  # the TrainState of step 0 (used only if no checkpoint exists)
  compiled: tuple        # (compiled step, the abstract batch it was compiled for)


def prepare_stage(spec: StageSpec, *, mesh, rules, text_encoder: nn.Module, text_params,
                  seed: int, max_length: int) -> PreparedStage:
  """Builds what `train_stage` needs before its first step, for batches of token ids
  (the stage's built-in task, not precomputed embeddings): run it in a background thread
  while an earlier stage trains (single host: it compiles and runs programs of its own)."""
  t0 = time.time()
  unet = UNet(spec.unet)
  optimizer = make_optimizer(spec.optimizer)
  inputs = example_inputs(spec, text_encoder.config.d_model, max_length)
  abstract, shardings = abstract_train_state(unet, inputs, optimizer, mesh=mesh, rules=rules)
  rng = jax.random.fold_in(jax.random.key(seed), zlib_hash(spec.name))
  initial = init_train_state(unet, inputs, optimizer, rng=rng, mesh=mesh, rules=rules,
                             shardings=shardings)
  sharding = mesh_lib.batch_sharding(mesh, rules)
  b, r = spec.train.batch_size, spec.resolution
  batch = {"image": jax.ShapeDtypeStruct((b, r, r, 3), jnp.uint8, sharding=sharding),
           "text_tokens": jax.ShapeDtypeStruct((b, max_length), jnp.int32, sharding=sharding)}
  compiled = compile_train_step(spec, unet, optimizer, text_encoder, text_params, abstract,
                                shardings, batch, mesh=mesh, rules=rules)
  logging.info("Stage %s: initialised and compiled in the background in %.1fs.", spec.name,
               time.time() - t0)
  return PreparedStage(unet, optimizer, inputs, abstract, shardings, initial, (compiled, batch))


def _resume(manager, abstract, shardings):
  """The newest readable checkpoint's state, or None; unreadable newer ones are moved
  aside, so that their steps can be saved again."""
  restored, step = ckpt.restore_latest(manager, abstract, shardings)
  if restored is None:
    return None
  newer = [s for s in manager.all_steps() if s > step]
  if newer:
    ckpt.set_aside(manager, newer)
  return restored


def _compile_and_loop(spec, state, abstract, shardings, saver, *, start_step, unet, optimizer,
                      text_encoder, text_params, make_batches, sample_batch, mesh, rules,
                      stage_dir, writer, seed, compiled=None, on_started=None):
  """`state`: the TrainState of start_step, or a Future of it (initialising meanwhile).
  `compiled`: (the step compiled ahead for an abstract batch, that batch), or None."""
  # ---- Compile the step ahead of the loop. ----
  key_log = _KeyLog(stage_dir, spec.train.log_example_keys)
  batches = make_batches(start_step)
  global_batch = _global_batch(next(batches), start_step, mesh, rules, key_log)
  t0 = time.time()
  if compiled is not None and _avals(compiled[1]) != _avals(global_batch):
    logging.warning("Stage %s: the batch %s differs from the one the step was compiled for "
                    "in the background (%s); compiling again.", spec.name,
                    _avals(global_batch), _avals(compiled[1]))
    compiled = None
  if compiled is None:
    compiled = compile_train_step(spec, unet, optimizer, text_encoder, text_params, abstract,
                                  shardings, global_batch, mesh=mesh, rules=rules)
    logging.info("Stage %s: train step compiled in %.1fs.", spec.name, time.time() - t0)
  else:
    compiled = compiled[0]
  if isinstance(state, concurrent.futures.Future):
    state = state.result()
    logging.info("Stage %s: train state initialised (%.1fs after the compile started).",
                 spec.name, time.time() - t0)
  distributed.barrier("run_train_step")  # several hosts: start it together (distributed.py)
  write_samples = _sample_writer(spec, unet, text_encoder, text_params, sample_batch, mesh,
                                 rules, stage_dir, writer, seed)

  # ---- The loop. ----
  guard = faults.NonfiniteGuard(spec.name, spec.train.max_consecutive_nonfinite)
  preemption = faults.PreemptionCheck()  # the same stop step on every host
  images_per_step = spec.train.batch_size
  t_last, step_last = time.time(), start_step
  batch = global_batch  # the one used for compilation is the first trained on
  for step in range(start_step, spec.train.num_steps):
    if preemption.check():  # a step boundary: the state is that of `step`
      _stop_for_preemption(spec.name, state, step, saver)
    if step > start_step:
      batch = _global_batch(next(batches), step, mesh, rules, key_log)
    state, metrics = compiled(state, batch, text_params)
    if on_started is not None and step == start_step:
      on_started()
    done = step + 1
    guard.push(done, metrics)

    if done % spec.train.log_every == 0 or done == spec.train.num_steps:
      metrics = jax.device_get(metrics)
      elapsed = time.time() - t_last
      steps_per_s = (done - step_last) / max(elapsed, 1e-9)
      img_s = steps_per_s * images_per_step
      eta = (spec.train.num_steps - done) / max(steps_per_s, 1e-9)
      skipped = f"  skipped {metrics['skipped_steps']}" if metrics["skipped_steps"] else ""
      logging.info("[%s] step %d/%d  loss %.4f  grad_norm %.3f%s  %.1f img/s (%.1f/device)  "
                   "ETA %s", spec.name, done, spec.train.num_steps, metrics["loss"],
                   metrics["grad_norm"], skipped, img_s, img_s / jax.device_count(),
                   _format_eta(eta))
      writer.scalars(done, {**metrics, "img_per_s": img_s,
                            "img_per_s_per_device": img_s / jax.device_count()})
      t_last, step_last = time.time(), done

    if done % spec.train.checkpoint_every == 0 or done == spec.train.num_steps:
      saver.save(done, state)

    if spec.train.sample_every and (done % spec.train.sample_every == 0
                                    or done == spec.train.num_steps):
      write_samples(state.ema_params, done)
      t_last = time.time()  # sampling time is not training throughput
  guard.finish()
  return state


def _stop_for_preemption(stage: str, state, step: int, saver: ckpt.Saver):
  """Saves the state of `step` (unless it is on disk), waits for it, raises Preempted."""
  logging.warning("[%s] SIGTERM received: saving the checkpoint of step %d, then stopping.",
                  stage, step)
  if step != saver.last_started and step not in saver.manager.all_steps():
    saver.save(step, state)
  saver.settle()
  raise faults.Preempted(stage, step, saver.latest_complete())


def _global_batch(host_batch: dict, step: int, mesh, rules, key_log: "_KeyLog"):
  """Global arrays of a host batch; its example keys (strings) go to the key log only."""
  key_log.write(step, host_batch.pop("key", None))
  return mesh_lib.host_to_global(host_batch, mesh, rules)


class _KeyLog:
  """Debug (train.log_example_keys): a line "<step> <key> <key> ..." per trained batch in
  <stage>/example_keys.process_<i>.txt, <step> being the state's step before the update.

  Written before the step runs and closed each time, so a killed run loses no line of a
  step it trained; a resumed run appends the steps it trains again after the checkpoint.
  A bucket (gs://) has no appends: with a workdir there, the file goes to this host's
  temporary directory instead.
  """

  def __init__(self, stage_dir: str, enabled: bool):
    self.path = None
    if enabled:
      if paths.is_url(stage_dir):
        local = os.path.join(tempfile.gettempdir(), "imagen_jax_example_keys",
                             os.path.basename(stage_dir.rstrip("/")))
        logging.warning("train.log_example_keys: %s is not a local directory; writing the "
                        "example keys to %s on each host.", stage_dir, local)
        stage_dir = local
      os.makedirs(stage_dir, exist_ok=True)
      self.path = os.path.join(stage_dir, f"example_keys.process_{jax.process_index()}.txt")

  def write(self, step: int, keys) -> None:
    if self.path is None or keys is None:
      return
    names = [k.decode() if isinstance(k, bytes) else str(k) for k in keys]
    with open(self.path, "a") as f:
      f.write(f"{step} {' '.join(names)}\n")


def zlib_hash(name: str) -> int:
  """A stable (unlike hash()) 31-bit integer for a stage name, to fold into the run key."""
  return zlib.crc32(name.encode()) & 0x7FFFFFFF


def _sample_writer(spec, unet, text_encoder, text_params, sample_batch, mesh, rules, stage_dir,
                   writer, seed):
  """Returns fn(ema_params, step) writing a captioned sample grid of the stage.

  SR stages are conditioned on the down-sampled real images of the same captions, so the
  grid shows what the stage itself adds.
  """
  run = make_stage_sampler(unet, spec.sample, schedule=spec.diffusion.schedule,
                           prediction=spec.diffusion.prediction, resolution=spec.resolution,
                           lowres_resolution=spec.lowres_resolution)
  n = min(spec.train.num_sample_images, len(sample_batch["text_tokens"]))
  # The sample batch is the same on every host (pipeline.first_examples): replicated
  # over the mesh, it joins the global params in one program across hosts.
  replicated = NamedSharding(mesh, P())
  tokens = distributed.put(sample_batch["text_tokens"][:n], replicated)
  captions = [c.decode() if isinstance(c, bytes) else str(c) for c in sample_batch["caption"][:n]]
  lowres = None
  if spec.lowres_resolution:
    lowres = downsample(images_to_float(jnp.asarray(sample_batch["image"][:n])),
                        spec.lowres_resolution)
    lowres = distributed.put(lowres, replicated)
  key = jax.jit(lambda: jax.random.key(seed), out_shardings=replicated)()

  compiled = None
  encode = jax.jit(lambda params, ids: text_features(text_encoder, params, ids))

  def write(ema_params, step):
    nonlocal compiled
    t0 = time.time()
    # Every host runs the sampler (the params are global arrays); host 0 writes.
    # Several hosts: they meet between compiling each program and its first run.
    if compiled is None:
      compiled = [encode.lower(text_params, tokens).compile(), None]
      distributed.barrier("run_text_encoder")
    text, mask = compiled[0](text_params, tokens)
    if compiled[1] is None:  # a few small batches per run: compile for compile speed
      compiled[1] = run.lower(ema_params, key, text, mask, lowres).compile(
          compiler_options=run_rarely_options())
      distributed.barrier("run_sampler")
    t_sample = time.time()
    images = compiled[1](ema_params, key, text, mask, lowres)
    images = distributed.fetch(float_to_images(images))
    t_sampled = time.time()
    if jax.process_index() != 0:
      return
    grid = make_grid(images, captions)
    png = io.BytesIO()
    grid.save(png, format="PNG")
    paths.makedirs(os.path.join(stage_dir, "samples"))  # local or gs://
    paths.write_bytes(os.path.join(stage_dir, "samples", f"step_{step:07d}.png"), png.getvalue())
    writer.image(step, "samples", np.asarray(grid))
    logging.info("Stage %s: sample grid of step %d in %.1fs (compile %.1fs, sampling %.1fs).",
                 spec.name, step, time.time() - t0, t_sample - t0, t_sampled - t_sample)

  return write
