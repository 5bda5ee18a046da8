"""The cascade sampler: prompt -> T5 -> stage 1 -> stage 2 -> ... -> images.

Also text-guided editing through the same stage samplers: `Cascade.upscale` super-resolves
the user's own low-resolution images through the SR stages, `Cascade.inpaint` regenerates
a masked region at every stage (`diffusion.editing`).

Everything is rebuilt from a training workdir: the run's config (config.json), the frozen
text encoder it trained with, and every stage's EMA weights from its latest checkpoint.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from imagen_jax.models import UNet
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.sample.stage_sampler import make_stage_sampler
from imagen_jax.text import T5Config, T5Encoder, Tokenizer
from imagen_jax.train import checkpoint as ckpt
from imagen_jax.train.loop import example_inputs
from imagen_jax.train.stages import StageSpec, stage_spec
from imagen_jax.train.state import abstract_train_state, make_optimizer
from imagen_jax.train.step import (downsample, float_to_images, images_to_float,
                                   text_features)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: is {workdir!r} a training workdir?")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


class Cascade:
  """A trained cascade, ready to sample. Build with `Cascade.from_workdir`."""

  def __init__(self, config, specs: Sequence[StageSpec], stage_params: dict, text_params,
               t5: T5Config, steps: dict):
    self.config = config
    self.specs = list(specs)
    self.stage_params = stage_params
    self.text_params = text_params
    self.text_encoder = T5Encoder(t5)
    self.tokenizer = Tokenizer()
    self.max_length = config.text.max_length
    self.steps = steps  # training step of each stage's checkpoint

  @classmethod
  def from_workdir(cls, workdir: str, stages: Sequence[str] | None = None) -> "Cascade":
    config = load_config(workdir)
    names = list(stages or config.stage_order)
    specs = [stage_spec(config, name) for name in names]
    # Sampling runs on one device: the config's mesh axes, each of size 1.
    mesh = mesh_lib.make_mesh({axis: 1 for axis in config.mesh}, jax.devices()[:1])
    rules = mesh_lib.rules_from_config(config.axis_rules)
    # Onto the sampling device too: restored without a target, the params would land on
    # the devices that saved them (all of the training mesh), which jit refuses to mix.
    text_params, t5 = ckpt.load_text_encoder(
        workdir, T5Config, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    stage_params, steps = {}, {}
    for spec in specs:
      unet = UNet(spec.unet)
      target, shardings = abstract_train_state(
          unet, example_inputs(spec, t5.d_model, config.text.max_length),
          make_optimizer(spec.optimizer), mesh=mesh, rules=rules)
      manager = ckpt.stage_manager(workdir, spec.name, async_save=False)
      state, step = ckpt.restore_latest(manager, target, shardings)
      manager.close()
      if state is None:
        raise FileNotFoundError(
            f"No checkpoint for stage {spec.name!r} in {workdir}; train it first "
            f"(python -m imagen_jax.train --workdir={workdir} --stage={spec.name}).")
      stage_params[spec.name], steps[spec.name] = state.ema_params, step
    return cls(config, specs, stage_params, text_params, t5, steps)

  def with_sample_settings(self, overrides: dict[str, dict]) -> "Cascade":
    """Per-stage overrides of the sample settings, e.g. {"base": {"guidance_weight": 5}}."""
    specs = [dataclasses.replace(s, sample=dataclasses.replace(s.sample, **overrides.get(s.name, {})))
             for s in self.specs]
    new = Cascade.__new__(Cascade)
    new.__dict__.update(self.__dict__, specs=specs)
    return new

  def encode(self, prompts: Sequence[str]):
    ids, _ = self.tokenizer.encode(list(prompts), self.max_length)
    return text_features(self.text_encoder, self.text_params, jnp.asarray(ids))

  def generate(self, prompts: Sequence[str], *, seed: int = 0, batch_size: int = 64,
               progress: bool = True) -> list[np.ndarray]:
    """Samples every stage; returns one uint8 [N, R, R, 3] array per stage."""
    return self._run(prompts, first=0, seed=seed, batch_size=batch_size, progress=progress)

  def upscale(self, images, prompts: Sequence[str], *, from_stage: str | int | None = None,
              seed: int = 0, batch_size: int = 64, progress: bool = True) -> list[np.ndarray]:
    """Super-resolves the user's own images through the SR stages from `from_stage` on.

    images: uint8 [N, h, w, 3] (or one [h, w, 3] for every prompt), or float in [-1, 1];
    resized (anti-aliased) to the low-res resolution of `from_stage` when their size
    differs. prompts: the captions, one per image (or one for all). from_stage: a stage
    name or index, default the first super-resolution stage. Returns one uint8 array per
    stage run (from_stage and every later stage), like `generate`; the noise augmentation
    of the low-res input is the stage's own (SampleSettings.lowres_aug_t).
    """
    first = self._stage_index(from_stage)
    if not self.specs[first].lowres_resolution:
      raise ValueError(f"Stage {self.specs[first].name!r} is a base stage: upscale starts at "
                       "a super-resolution stage (from_stage=...).")
    images, prompts = _pair(_as_float_images(images, "images"), prompts, "images")
    lowres = _resize(images, self.specs[first].lowres_resolution)
    return self._run(prompts, first=first, lowres=lowres, seed=seed, batch_size=batch_size,
                     progress=progress)

  def inpaint(self, images, masks, prompts: Sequence[str], *, seed: int = 0,
              batch_size: int = 64, resample_steps: int = 1,
              progress: bool = True) -> list[np.ndarray]:
    """Text-guided inpainting through the whole cascade.

    images: uint8 [N, H, W, 3] (or one [H, W, 3]), or float in [-1, 1], ideally at the
    final stage's resolution (else resized to it first). masks: [N, H, W] or [N, H, W, 1]
    (or one [H, W]), 1 / True = keep, 0 = generate (binarised at 0.5). The base stage
    inpaints at its resolution with the image and mask resized to it; each SR stage
    upsamples the previous stage's output and inpaints at its own resolution too. A
    resized mask keeps a pixel only if every full-resolution pixel under the resize filter
    is kept (so kept low-res pixels never mix in the content to be replaced). The final
    output equals the (final-resolution) image exactly on the kept pixels. resample_steps:
    RePaint resampling at every stage (`diffusion.editing`). Returns one uint8 array per
    stage, like `generate`.
    """
    if self.specs[0].lowres_resolution:
      raise ValueError(f"inpaint runs the whole cascade from a base stage; this one starts at "
                       f"the super-resolution stage {self.specs[0].name!r}.")
    images = _as_float_images(images, "images")
    masks = np.asarray(masks)
    if masks.ndim == images.ndim:           # [..., H, W, 1]
      if masks.shape[-1] != 1:
        raise ValueError(f"masks of shape {masks.shape}: give [N, H, W] or [N, H, W, 1].")
      masks = masks[..., 0]
    masks = (masks.astype(np.float32) >= 0.5).astype(np.float32)
    if masks.shape[-2:] != images.shape[-3:-1]:
      raise ValueError(f"masks of shape {masks.shape} do not match the images "
                       f"{images.shape} (H, W).")
    if masks.ndim == 2:
      masks = masks[None]
    if len(masks) != len(images):
      if len(masks) == 1:
        masks = np.repeat(masks, len(images), axis=0)
      elif len(images) == 1:
        images = np.repeat(images, len(masks), axis=0)
      else:
        raise ValueError(f"Got {len(images)} images and {len(masks)} masks.")
    final = self.specs[-1].resolution
    images, masks = _resize(images, final), _resize_mask(masks[..., None], final)
    images, prompts = _pair(images, prompts, "images")
    masks, _ = _pair(masks, prompts, "masks")
    return self._run(prompts, first=0, image=images, mask=masks, seed=seed,
                     batch_size=batch_size, progress=progress, resample_steps=resample_steps)

  def _stage_index(self, stage) -> int:
    names = [s.name for s in self.specs]
    if stage is None:
      sr = [i for i, s in enumerate(self.specs) if s.lowres_resolution]
      if not sr:
        raise ValueError(f"This cascade ({names}) has no super-resolution stage.")
      return sr[0]
    if isinstance(stage, (int, np.integer)):
      if not 0 <= stage < len(names):
        raise ValueError(f"Stage index {stage} out of range for {names}.")
      return int(stage)
    if stage not in names:
      raise ValueError(f"Unknown stage {stage!r}; this cascade has {names}.")
    return names.index(stage)

  def _run(self, prompts, *, first: int, seed: int, batch_size: int, progress: bool,
           lowres=None, image=None, mask=None, resample_steps: int = 1) -> list[np.ndarray]:
    """Stages first.. on batches of prompts. lowres: [N, h, w, 3] float, the input of stage
    `first` (an SR stage); image / mask: [N, R, R, 3] / [N, R, R, 1] at the final
    resolution, kept where mask is 1 at every stage. Stage i of batch `start` draws from
    fold_in(fold_in(key(seed), start), i), i its index in the whole cascade."""
    prompts = list(prompts)
    if not prompts:
      raise ValueError("No prompts.")
    specs = list(enumerate(self.specs))[first:]
    samplers = [_stage_sampler(s, resample_steps) for _, s in specs]
    # Per stage: the image and mask at its resolution (the same for every batch).
    known = [None if image is None else (_resize(image, s.resolution),
                                         _resize_mask(mask, s.resolution)) for _, s in specs]
    outputs = [[] for _ in specs]
    batches = range(0, len(prompts), batch_size)
    bar = tqdm(total=len(batches) * len(specs), disable=not progress, unit="stage-batch")
    key = jax.random.key(seed)
    full = min(batch_size, len(prompts))
    for start in batches:
      chunk = prompts[start:start + batch_size]
      n = len(chunk)
      # Pad the last batch to a full one so each stage compiles once.
      padded = chunk + [chunk[-1]] * (full - n)
      take = lambda a: None if a is None else jnp.asarray(_pad_rows(a[start:start + n], full))
      text, text_mask = self.encode(padded)
      images = take(lowres)
      for (i, spec), run, out, stage_known in zip(specs, samplers, outputs, known):
        bar.set_description(f"{spec.name} {spec.resolution}px")
        rng = jax.random.fold_in(jax.random.fold_in(key, start), i)
        edit = () if stage_known is None else tuple(take(a) for a in stage_known)
        images = run(self.stage_params[spec.name], rng, text, text_mask, images, *edit)
        out.append(np.asarray(float_to_images(images))[:n])
        bar.update(1)
    bar.close()
    return [np.concatenate(o) for o in outputs]


def _stage_sampler(spec: StageSpec, resample_steps: int = 1):
  """The jitted sampler of a stage, built once per (stage settings, resample_steps) in a
  process, so cascades of the same config (and every call of one) share its compilations."""
  return _cached_sampler(spec.unet, spec.sample, spec.diffusion.schedule,
                         spec.diffusion.prediction, spec.resolution, spec.lowres_resolution,
                         resample_steps)


@functools.lru_cache(maxsize=32)
def _cached_sampler(unet, sample, schedule, prediction, resolution, lowres_resolution,
                    resample_steps):
  return make_stage_sampler(UNet(unet), sample, schedule=schedule, prediction=prediction,
                            resolution=resolution, lowres_resolution=lowres_resolution,
                            resample_steps=resample_steps)


def _as_float_images(images, name: str) -> np.ndarray:
  """uint8 [0, 255] or float [-1, 1] images, [N, H, W, 3] or one [H, W, 3] -> float32
  [N, H, W, 3] in [-1, 1]."""
  images = np.asarray(images)
  if images.ndim == 3:
    images = images[None]
  if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] != images.shape[2]:
    raise ValueError(f"{name}: expected square RGB images [N, H, W, 3] or [H, W, 3], got "
                     f"shape {images.shape}.")
  if images.dtype == np.uint8:
    return np.asarray(images_to_float(jnp.asarray(images)))
  if not np.issubdtype(images.dtype, np.floating):
    raise ValueError(f"{name}: uint8 [0, 255] or float [-1, 1] images, got {images.dtype}.")
  if images.min() < -1 or images.max() > 1:
    raise ValueError(f"{name}: float images must lie in [-1, 1] (got {images.min()} .. "
                     f"{images.max()}); pass uint8 for [0, 255].")
  return images.astype(np.float32)


def _pair(rows: np.ndarray, prompts, name: str):
  """Matches N rows with M prompts: N == M, or one of them is 1 and is repeated."""
  prompts = [prompts] if isinstance(prompts, str) else list(prompts)
  if len(rows) == len(prompts):
    return rows, prompts
  if len(rows) == 1:
    return np.repeat(rows, len(prompts), axis=0), prompts
  if len(prompts) == 1:
    return rows, prompts * len(rows)
  raise ValueError(f"Got {len(rows)} {name} and {len(prompts)} prompts: give one prompt per "
                   "image, or one of either.")


def _pad_rows(a: np.ndarray, rows: int) -> np.ndarray:
  return np.concatenate([a, np.repeat(a[-1:], rows - len(a), axis=0)]) if len(a) < rows else a


def _resize(images: np.ndarray, resolution: int) -> np.ndarray:
  """Anti-aliased resize of float [N, H, W, C] images (the training pipeline's downsample);
  unchanged when already at `resolution`."""
  if images.shape[1] == resolution:
    return images
  return np.asarray(downsample(jnp.asarray(images), resolution))


def _resize_mask(mask: np.ndarray, resolution: int) -> np.ndarray:
  """Keep-mask [N, H, W, 1] in {0, 1} at `resolution`: a pixel is kept only if the resize
  filter sees nothing but kept pixels (a resized image mixes its neighbours in)."""
  if mask.shape[1] == resolution:
    return mask
  return (_resize(mask, resolution) >= 1.0 - 1e-4).astype(np.float32)
