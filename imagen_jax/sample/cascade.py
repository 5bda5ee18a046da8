"""The cascade sampler: prompt -> T5 -> stage 1 -> stage 2 -> ... -> images.

Everything is rebuilt from a training workdir: the run's config (config.json), the frozen
text encoder it trained with, and every stage's EMA weights from its latest checkpoint.
"""
from __future__ import annotations

import dataclasses
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
from imagen_jax.train.step import float_to_images, text_features


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
    text_params, t5 = ckpt.load_text_encoder(workdir, T5Config)
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
    samplers = [make_stage_sampler(UNet(s.unet), s.sample, schedule=s.diffusion.schedule,
                                   prediction=s.diffusion.prediction, resolution=s.resolution,
                                   lowres_resolution=s.lowres_resolution) for s in self.specs]
    outputs = [[] for _ in self.specs]
    batches = range(0, len(prompts), batch_size)
    bar = tqdm(total=len(batches) * len(self.specs), disable=not progress, unit="stage-batch")
    key = jax.random.key(seed)
    for start in batches:
      chunk = list(prompts[start:start + batch_size])
      n = len(chunk)
      # Pad the last batch to a full one so each stage compiles once.
      padded = chunk + [chunk[-1]] * (min(batch_size, len(prompts)) - n)
      text, mask = self.encode(padded)
      images = None
      for i, (spec, run) in enumerate(zip(self.specs, samplers)):
        bar.set_description(f"{spec.name} {spec.resolution}px")
        rng = jax.random.fold_in(jax.random.fold_in(key, start), i)
        images = run(self.stage_params[spec.name], rng, text, mask, images)
        outputs[i].append(np.asarray(float_to_images(images))[:n])
        bar.update(1)
    bar.close()
    return [np.concatenate(o) for o in outputs]
