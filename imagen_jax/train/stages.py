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
from imagen_jax.train.state import OPTIMIZERS, OptimizerConfig, learning_rate_schedule
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
  # SR stages: > 0 trains on random train_crop x train_crop crops of the images (and the
  # matching low-res regions); sampling still runs at `resolution` (fully convolutional).
  train_crop: int = 0
  # Precomputed T5 embeddings (`python -m imagen_jax.encode_text`) to train on; "" encodes
  # the captions of `task` on the fly. `task` still supplies the sample-grid captions.
  embeddings_dir: str = ""


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
      train=TrainSettings(**dict(s.train)), sample=SampleSettings(**dict(s.sample)),
      train_crop=int(s.get("train_crop", 0)),
      embeddings_dir=str(s.get("embeddings_dir", "") or ""))


def _check_choice(value, choices, field):
  if value not in choices:
    raise ValueError(f"{field}={value!r} is not one of {choices}.")


def _check_crop(spec: StageSpec, field: str) -> None:
  """A training crop must be an SR stage's whole low-res pixels and fit the U-Net."""
  crop, res, low = spec.train_crop, spec.resolution, spec.lowres_resolution
  if not low:
    raise ValueError(f"{field}.train_crop={crop}: crops are for super-resolution stages "
                     "(lowres_resolution > 0); set it to 0.")
  if not 0 < crop <= res:
    raise ValueError(f"{field}.train_crop={crop} must be in (0, resolution={res}].")
  if res % low:
    raise ValueError(f"{field}.train_crop needs resolution={res} to be a multiple of "
                     f"lowres_resolution={low}.")
  if crop % (res // low):
    raise ValueError(f"{field}.train_crop={crop} must be a multiple of resolution / "
                     f"lowres_resolution = {res // low}, so that it covers whole low-res "
                     f"pixels (e.g. {max(res // low, crop // (res // low) * (res // low))}).")
  try:
    spec.unet.validate(crop)
  except ValueError as e:
    raise ValueError(f"{field}.train_crop={crop}: {e}") from None


def _check_embeddings(config, spec: StageSpec, field: str) -> None:
  """Precomputed embeddings must exist, be complete and fit config.text (width, length)."""
  # Imported here: tensorflow, which runs without embeddings (bench/shapes_cascade.py) skip.
  from imagen_jax.data import embeddings  # pylint: disable=import-outside-toplevel
  embeddings.check_for_training(spec.embeddings_dir, spec.train_split,
                                d_model=config.text.d_model, max_length=config.text.max_length,
                                field=f"{field}.embeddings_dir")


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
    _check_choice(spec.optimizer.name, OPTIMIZERS, f"{field}.optimizer.name")
    try:
      spec.unet.validate(spec.resolution)
    except ValueError as e:
      raise ValueError(f"{field}.unet (resolution {spec.resolution}): {e}") from None
    if spec.lowres_resolution and spec.lowres_resolution >= spec.resolution:
      raise ValueError(f"{field}.lowres_resolution={spec.lowres_resolution} must be smaller "
                       f"than {field}.resolution={spec.resolution}.")
    if spec.train_crop:
      _check_crop(spec, field)
    if spec.embeddings_dir:
      _check_embeddings(config, spec, field)
    try:
      learning_rate_schedule(spec.optimizer)
    except ValueError as e:
      raise ValueError(f"{field}.{e}") from None
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
  # A config may hold SR stages alone (the paper trains every stage on its own, e.g.
  # configs/imagen_sr256.py); a cascade's stages chain as checked above.
  return specs
