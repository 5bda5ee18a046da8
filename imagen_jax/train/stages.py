"""Reads a cascade config into plain dataclasses, and validates it before anything compiles.

This is the one place that knows the config's layout; everything below train/ takes the
dataclasses built here.
"""
from __future__ import annotations

import dataclasses

from imagen_jax import diffusion
from imagen_jax.models import UNetConfig
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.sample.stage_sampler import SampleSettings
from imagen_jax.text import T5Config
from imagen_jax.train.state import OptimizerConfig
from imagen_jax.train.step import DiffusionSettings

_SCHEDULES = ("cosine", "linear")
_PREDICTIONS = ("eps", "v", "x0")
_THRESHOLDING = ("none", "static", "dynamic")
_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class TrainSettings:
  batch_size: int
  num_steps: int
  log_every: int = 50
  checkpoint_every: int = 500
  keep_checkpoints: int = 2
  sample_every: int = 1000
  num_sample_images: int = 16
  max_consecutive_nonfinite: int = 10  # stop after this many skipped updates in a row
  log_example_keys: bool = False       # debug: append each step's example keys to a file


@dataclasses.dataclass(frozen=True)
class StageSpec:
  name: str
  resolution: int
  lowres_resolution: int   # 0 for the base stage
  task: str
  train_split: str
  unet: UNetConfig
  diffusion: DiffusionSettings
  optimizer: OptimizerConfig
  train: TrainSettings
  sample: SampleSettings


def dtype(name: str, field: str) -> str:
  if name not in _DTYPES:
    raise ValueError(f"{field}={name!r}: use one of {_DTYPES}.")
  return name


def t5_config(config) -> T5Config:
  text = dict(config.text)
  text = {k: v for k, v in text.items() if k not in ("checkpoint", "init_seed", "max_length")}
  text["dtype"] = dtype(text.get("dtype", "float32"), "config.text.dtype")
  return T5Config(**text)


def stage_spec(config, name: str) -> StageSpec:
  if name not in config.stages:
    raise ValueError(f"Unknown stage {name!r}; the config has stages {list(config.stages)}.")
  s = config.stages[name]
  unet = UNetConfig(**dict(s.unet),  # UNetConfig turns JSON lists back into tuples
                    text_dim=config.text.d_model,
                    lowres_cond=bool(s.lowres_resolution),
                    dtype=dtype(s.dtype, f"config.stages.{name}.dtype"))
  return StageSpec(
      name=name, resolution=s.resolution, lowres_resolution=s.lowres_resolution, task=s.task,
      train_split=s.train_split, unet=unet,
      diffusion=DiffusionSettings(**dict(s.diffusion)),
      optimizer=OptimizerConfig(**dict(s.optimizer)),
      train=TrainSettings(**dict(s.train)), sample=SampleSettings(**dict(s.sample)))


def _check_choice(value, choices, field):
  if value not in choices:
    raise ValueError(f"{field}={value!r} is not one of {choices}.")


def validate(config, mesh) -> list[StageSpec]:
  """Checks everything that can be checked before compiling; returns the stage specs.

  Errors name the config field and what to change.
  """
  rules = mesh_lib.rules_from_config(config.axis_rules)
  mesh_lib.check_rules(rules, mesh)
  if config.text.max_length < 2:
    raise ValueError("config.text.max_length must be >= 2 (tokens + EOS).")
  specs = []
  for name in config.stage_order:
    spec = stage_spec(config, name)
    field = f"config.stages.{name}"
    _check_choice(spec.diffusion.schedule, _SCHEDULES, f"{field}.diffusion.schedule")
    _check_choice(spec.diffusion.prediction, _PREDICTIONS, f"{field}.diffusion.prediction")
    _check_choice(spec.sample.sampler, diffusion.SAMPLERS, f"{field}.sample.sampler")
    _check_choice(spec.sample.time_grid, diffusion.TIME_GRIDS, f"{field}.sample.time_grid")
    if spec.sample.eta and spec.sample.sampler != "ddim":
      raise ValueError(f"{field}.sample.eta={spec.sample.eta} only applies to the ddim sampler "
                       f"(got sampler={spec.sample.sampler!r}); set it to 0.")
    _check_choice(spec.sample.thresholding, _THRESHOLDING, f"{field}.sample.thresholding")
    try:
      spec.unet.validate(spec.resolution)
    except ValueError as e:
      raise ValueError(f"{field}.unet (resolution {spec.resolution}): {e}") from None
    if spec.lowres_resolution and spec.lowres_resolution >= spec.resolution:
      raise ValueError(f"{field}.lowres_resolution={spec.lowres_resolution} must be smaller "
                       f"than {field}.resolution={spec.resolution}.")
    mesh_lib.check_batch_size(spec.train.batch_size, mesh, rules, f"{field}.train.batch_size")
    if spec.train.num_steps < 0:
      raise ValueError(f"{field}.train.num_steps must be >= 0.")
    if spec.train.max_consecutive_nonfinite < 1:
      raise ValueError(f"{field}.train.max_consecutive_nonfinite="
                       f"{spec.train.max_consecutive_nonfinite} must be >= 1.")
    specs.append(spec)
  # Stages chain at sampling time: each SR stage takes the previous stage's resolution.
  for prev, cur in zip(specs, specs[1:]):
    if cur.lowres_resolution != prev.resolution:
      raise ValueError(
          f"config.stages.{cur.name}.lowres_resolution={cur.lowres_resolution} must equal the "
          f"previous stage's resolution ({prev.name}: {prev.resolution}) for the cascade to chain.")
  if specs and specs[0].lowres_resolution:
    raise ValueError(f"The first stage ({specs[0].name}) must be a base stage "
                     "(lowres_resolution=0).")
  return specs
