"""Orbax checkpoints: the train state of each stage, and the frozen text encoder.

Layout of a workdir:
  config.json                 the full run config (sampling rebuilds the cascade from it)
  text_encoder/               T5 params (orbax) + t5_config.json
  <stage>/checkpoints/<step>/ TrainState of that stage (orbax, async, keep N)
  <stage>/samples/            sample grids written during training
  <stage>/tensorboard/        event files
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from imagen_jax.text import T5Config, T5Encoder, init_params
from imagen_jax.train import stages


def abstract_like(tree, shardings):
  """ShapeDtypeStructs carrying target shardings: restore lands directly in that layout."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def stage_manager(workdir: str, stage: str, *, keep: int, async_save: bool = True):
  directory = os.path.abspath(os.path.join(workdir, stage, "checkpoints"))
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(directory, options=options)


def restore_latest(manager: ocp.CheckpointManager, target, shardings):
  """Restores the newest checkpoint onto `shardings`; returns (state, step) or (None, None)."""
  step = manager.latest_step()
  if step is None:
    return None, None
  state = manager.restore(step, args=ocp.args.StandardRestore(abstract_like(target, shardings)))
  logging.info("Restored %s at step %d.", manager.directory, step)
  return state, step


def save_text_encoder(workdir: str, params, t5_config) -> None:
  directory = os.path.abspath(os.path.join(workdir, "text_encoder"))
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(directory, "params"), params)
  checkpointer.wait_until_finished()
  if jax.process_index() == 0:
    with open(os.path.join(directory, "t5_config.json"), "w") as f:
      fields = dataclasses.asdict(t5_config)
      fields["dtype"] = str(np.dtype(fields["dtype"]))  # e.g. "bfloat16"; JSON-friendly
      json.dump(fields, f, indent=2)


def text_encoder_saved(workdir: str) -> bool:
  return os.path.exists(os.path.join(workdir, "text_encoder", "t5_config.json"))


def load_text_encoder(workdir: str, config_cls):
  """Returns (params, t5_config) saved by `save_text_encoder`."""
  directory = os.path.abspath(os.path.join(workdir, "text_encoder"))
  with open(os.path.join(directory, "t5_config.json")) as f:
    t5_config = config_cls(**json.load(f))
  params = ocp.StandardCheckpointer().restore(os.path.join(directory, "params"))
  return params, t5_config


def frozen_text_encoder(config, workdir: str) -> tuple[T5Encoder, object]:
  """The run's T5 encoder: restored from the workdir, else created and saved there.

  Its weights are saved with the run so that sampling later sees the same text features.
  """
  if text_encoder_saved(workdir):
    params, t5 = load_text_encoder(workdir, T5Config)
    if t5 != stages.t5_config(config):
      raise ValueError(f"config.text differs from the encoder saved in {workdir}/text_encoder "
                       f"({t5}); use a new workdir or the original config.")
    return T5Encoder(t5), params
  t5 = stages.t5_config(config)
  if config.text.checkpoint:
    params, t5 = _pretrained_text_encoder(config.text.checkpoint, t5)
  else:
    params = init_params(t5, config.text.init_seed)
  save_text_encoder(workdir, params, t5)
  return T5Encoder(t5), params


# Fields of config.text that must agree with a pretrained checkpoint's architecture.
_ARCHITECTURE_FIELDS = ("vocab_size", "d_model", "num_layers", "num_heads", "head_dim", "mlp_dim",
                        "relative_attention_num_buckets", "relative_attention_max_distance")


def _pretrained_text_encoder(path: str, wanted: T5Config):
  """(params, T5Config) of a T5X / Hugging Face / converted checkpoint, checked against the
  architecture config.text describes (the U-Nets' text width is config.text.d_model)."""
  from imagen_jax.text.pretrained import PretrainedT5Encoder  # pylint: disable=import-outside-toplevel
  encoder = PretrainedT5Encoder.from_pretrained(
      path, dtype=wanted.dtype, max_distance=wanted.relative_attention_max_distance)
  found = encoder.config
  wrong = [f"config.text.{f}={getattr(wanted, f)} (the checkpoint has {getattr(found, f)})"
           for f in _ARCHITECTURE_FIELDS if getattr(wanted, f) != getattr(found, f)]
  if wrong:
    raise ValueError(f"config.text does not describe the encoder in {path}: " + "; ".join(wrong)
                     + ". Set those fields to the checkpoint's values.")
  return encoder.params, found
