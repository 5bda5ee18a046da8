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
