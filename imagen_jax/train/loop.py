"""The training loop of one cascade stage, in named sections (after big_vision's)."""
from __future__ import annotations

import os
import time
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from imagen_jax.models import UNet
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.sample.grid import make_grid
from imagen_jax.sample.stage_sampler import make_stage_sampler
from imagen_jax.train import checkpoint as ckpt
from imagen_jax.train.metrics import MetricWriter
from imagen_jax.train.stages import StageSpec
from imagen_jax.train.state import create_train_state, make_optimizer
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
                text_params, make_batches, sample_batch, seed: int, max_length: int):
  """Trains one stage to spec.train.num_steps, resuming from the workdir if possible.

  make_batches: fn(start_step) -> iterator of host-local numpy batches
    {"image", "text_tokens"}.
  sample_batch: a fixed host-local batch (captions + images) for the periodic sample grids.
  Returns the final TrainState.
  """
  is_host0 = jax.process_index() == 0
  stage_dir = os.path.join(workdir, spec.name)
  writer = MetricWriter(os.path.join(stage_dir, "tensorboard"), enabled=is_host0)

  # ---- Model, optimizer and the sharded train state. ----
  unet = UNet(spec.unet)
  optimizer = make_optimizer(spec.optimizer)
  text_dim = text_encoder.config.d_model
  rng = jax.random.fold_in(jax.random.key(seed), zlib_hash(spec.name))
  state, shardings = create_train_state(
      unet, example_inputs(spec, text_dim, max_length), optimizer, rng=rng, mesh=mesh,
      rules=rules)
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  logging.info("Stage %s: U-Net with %.2fM parameters.", spec.name, num_params / 1e6)

  # ---- Resume. ----
  manager = ckpt.stage_manager(workdir, spec.name, keep=spec.train.keep_checkpoints)
  restored, _ = ckpt.restore_latest(manager, state, shardings)
  if restored is not None:
    state = restored
  start_step = int(state.step)
  if start_step >= spec.train.num_steps:
    logging.info("Stage %s already trained to step %d.", spec.name, start_step)
    manager.close()
    return state

  # ---- Compile the step ahead of the loop. ----
  batch_sharding = mesh_lib.batch_sharding(mesh, rules)
  train_step = make_train_step(unet, text_encoder, spec.diffusion, optimizer,
                               ema_decay=spec.optimizer.ema_decay,
                               lowres_resolution=spec.lowres_resolution)
  batches = make_batches(start_step)
  first = next(batches)
  global_batch = mesh_lib.host_to_global(first, mesh, rules)
  t0 = time.time()
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    compiled = jax.jit(
        train_step, in_shardings=(shardings, batch_sharding, None),
        out_shardings=(shardings, None), donate_argnums=(0,),
    ).lower(state, global_batch, text_params).compile()
  logging.info("Stage %s: train step compiled in %.1fs.", spec.name, time.time() - t0)
  write_samples = _sample_writer(spec, unet, text_encoder, text_params, sample_batch, mesh,
                                 rules, stage_dir, writer, seed)

  # ---- The loop. ----
  images_per_step = spec.train.batch_size
  t_last, step_last = time.time(), start_step
  batch = global_batch  # the one used for compilation is the first trained on
  for step in range(start_step, spec.train.num_steps):
    if step > start_step:
      batch = mesh_lib.host_to_global(next(batches), mesh, rules)
    state, metrics = compiled(state, batch, text_params)
    done = step + 1

    if done % spec.train.log_every == 0 or done == spec.train.num_steps:
      metrics = jax.device_get(metrics)
      elapsed = time.time() - t_last
      steps_per_s = (done - step_last) / max(elapsed, 1e-9)
      img_s = steps_per_s * images_per_step
      eta = (spec.train.num_steps - done) / max(steps_per_s, 1e-9)
      logging.info("[%s] step %d/%d  loss %.4f  grad_norm %.3f  %.1f img/s (%.1f/device)  ETA %s",
                   spec.name, done, spec.train.num_steps, metrics["loss"], metrics["grad_norm"],
                   img_s, img_s / jax.device_count(), _format_eta(eta))
      writer.scalars(done, {**metrics, "img_per_s": img_s,
                            "img_per_s_per_device": img_s / jax.device_count()})
      t_last, step_last = time.time(), done

    if done % spec.train.checkpoint_every == 0 or done == spec.train.num_steps:
      manager.save(done, args=ocp.args.StandardSave(state))

    if spec.train.sample_every and (done % spec.train.sample_every == 0
                                    or done == spec.train.num_steps):
      write_samples(state.ema_params, done)
      t_last = time.time()  # sampling time is not training throughput

  manager.wait_until_finished()
  manager.close()
  writer.flush()
  return state


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
  tokens = jnp.asarray(sample_batch["text_tokens"][:n])
  captions = [c.decode() if isinstance(c, bytes) else str(c) for c in sample_batch["caption"][:n]]
  lowres = None
  if spec.lowres_resolution:
    lowres = downsample(images_to_float(jnp.asarray(sample_batch["image"][:n])),
                        spec.lowres_resolution)

  def write(ema_params, step):
    # Every host runs the sampler (the params are global arrays); host 0 writes.
    text, mask = text_features(text_encoder, text_params, tokens)
    images = run(ema_params, jax.random.key(seed), text, mask, lowres)
    images = np.asarray(jax.device_get(float_to_images(images)))
    if jax.process_index() != 0:
      return
    grid = make_grid(images, captions)
    os.makedirs(os.path.join(stage_dir, "samples"), exist_ok=True)
    grid.save(os.path.join(stage_dir, "samples", f"step_{step:07d}.png"))
    writer.image(step, "samples", np.asarray(grid))

  return write
