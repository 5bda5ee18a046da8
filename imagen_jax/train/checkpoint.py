"""Orbax checkpoints: the train state of each stage, and the frozen text encoder.

Layout of a workdir:
  config.json                 the full run config (sampling rebuilds the cascade from it)
  text_encoder/               T5 params (orbax) + t5_config.json
  <stage>/checkpoints/<step>/ TrainState of that stage (orbax, async, keep N)
  <stage>/checkpoints/<step>.unreadable/   a checkpoint that did not restore, set aside
  <stage>/samples/            sample grids written during training
  <stage>/tensorboard/        event files
  <stage>/example_keys.process_<i>.txt    the examples of each step (train.log_example_keys)
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from imagen_jax.parallel import axes, distributed
from imagen_jax.text import T5Config, T5Encoder, init_params
from imagen_jax.text.t5 import param_shapes as t5_param_shapes
from imagen_jax.train import paths, stages


def abstract_like(tree, shardings):
  """ShapeDtypeStructs carrying target shardings: restore lands directly in that layout."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


@functools.cache  # once a process: the registry is orbax's global one
def save_whole_arrays_on_cpu() -> None:
  """In a one-process CPU run, each array is saved whole from one replica, as orbax
  already does on GPU.

  Orbax's default (replica-parallel saving) has every replica of a replicated array write
  a slice of it, so that all hosts share the writing. The slices are cut by a jitted
  `slice_in_dim` per array shape, compiled at the first save: 5.5 s of the first save of
  the tiny U-Net on 8 CPU devices (0.2 s without), and nothing is gained where every
  replica is in one process's memory. TPU, GPU and multi-process runs keep orbax's default.
  """
  if jax.default_backend() == "cpu" and jax.process_count() == 1:
    # Orbax's own default handler, but for replica-parallel: its metadata store is what
    # keeps PRNG key arrays typed keys through a save and restore (a private module; the
    # registry's default is built from it the same way).
    from orbax.checkpoint._src.metadata import array_metadata_store  # pylint: disable=g-import-not-at-top
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(
            use_replica_parallel=False, array_metadata_store=array_metadata_store.Store()),
        override=True)


def stage_manager(workdir: str, stage: str, *, async_save: bool = True):
  """The orbax manager of a stage's checkpoints. It deletes nothing itself: `Saver` prunes
  old checkpoints, and only once a newer one is complete."""
  save_whole_arrays_on_cpu()
  directory = paths.absolute(os.path.join(workdir, stage, "checkpoints"))
  options = ocp.CheckpointManagerOptions(max_to_keep=None, create=True,
                                         enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(directory, options=options)


def restore_latest(manager: ocp.CheckpointManager, target, shardings):
  """Restores the newest readable checkpoint onto `shardings`: (state, step), or (None, None)
  when there is none.

  A checkpoint that does not restore (truncated or missing files: a crash mid-write on a
  filesystem without atomic renames, a damaged disk) is passed over with a warning for the
  one before it. If none restores, this raises rather than silently starting afresh.
  """
  abstract = abstract_like(target, shardings)
  unreadable = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      state = manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as e:  # pylint: disable=broad-except  (orbax/tensorstore raise many types)
      logging.warning("Checkpoint %s/%d does not restore (%s: %s); trying the one before it.",
                      manager.directory, step, type(e).__name__, _brief(e))
      unreadable.append(step)
      continue
    if unreadable:
      logging.warning("Resuming %s from step %d: the newer checkpoint(s) %s are unreadable "
                      "(warnings above).", manager.directory, step, unreadable)
    else:
      logging.info("Restored %s at step %d.", manager.directory, step)
    return state, step
  if unreadable:
    raise RuntimeError(
        f"No checkpoint in {manager.directory} restores (steps {unreadable}; warnings above). "
        "If the config changed the train state's structure, use the original config; to "
        "start afresh, move that directory aside.")
  return None, None


def set_aside(manager: ocp.CheckpointManager, steps) -> None:
  """Renames unreadable checkpoints to <step>.unreadable (kept for inspection, ignored by
  orbax), so that training can save those steps again."""
  if jax.process_index() == 0:
    for step in steps:
      src = os.path.join(str(manager.directory), str(step))
      dst, n = f"{src}.unreadable", 1
      while paths.exists(dst):
        dst, n = f"{src}.unreadable.{n}", n + 1
      try:
        paths.rename(src, dst)
      except Exception as e:  # pylint: disable=broad-except  (e.g. a bucket's directory)
        logging.warning("Could not move the unreadable checkpoint %s aside (%s: %s); delete "
                        "it, or its step will not be saved again.", src, type(e).__name__,
                        _brief(e))
        continue
      logging.warning("Moved the unreadable checkpoint %s to %s.", src, dst)
  distributed.barrier("checkpoint_set_aside")  # the other hosts reload after the renames
  manager.reload()


def _brief(error: BaseException, limit: int = 400) -> str:
  """An exception's message on one line, cut to `limit` characters (orbax's run long)."""
  text = " ".join(str(error).split())
  return text if len(text) <= limit else text[:limit] + " ..."


class Saver:
  """Async checkpoint saves that never stop training and never lose the last good checkpoint.

  A save that fails (disk full, permissions, a lost bucket), at once or in the background,
  is logged and training goes on. Old checkpoints are deleted here, not by orbax's
  max_to_keep, and only once a newer one is complete on disk: orbax schedules deletions
  when a save starts, so consecutive failing saves would delete the last good checkpoint.
  """

  def __init__(self, manager: ocp.CheckpointManager, keep: int):
    self.manager = manager
    self.keep = max(keep, 1)
    self.pending = None       # step of the save in flight
    self.last_started = None  # newest step whose save was started

  def save(self, step: int, state) -> None:
    self.settle()  # also: orbax starts a save only after the previous one finished
    self.last_started = step
    try:
      self.manager.save(step, args=ocp.args.StandardSave(state), force=True)
      self.pending = step
    except Exception as e:  # pylint: disable=broad-except  (any storage error)
      logging.error("Checkpoint at step %d could not be saved (%s: %s). Training continues; "
                    "the last complete checkpoint is step %s.", step, type(e).__name__,
                    _brief(e), self.latest_complete())

  def settle(self) -> None:
    """Waits for the save in flight; reports it if it did not complete; prunes old ones."""
    if self.pending is None:
      return
    step, self.pending = self.pending, None
    error = None
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      error = e
    self.manager.reload()  # what is on disk, not what orbax meant to write
    if error is None and step in self.manager.all_steps():
      self._prune()
      return
    reason = f"{type(error).__name__}: {_brief(error)}" if error else "not found on disk"
    logging.error("Checkpoint at step %d did not complete (%s). Training continues; the last "
                  "complete checkpoint is step %s.", step, reason, self.latest_complete())

  def latest_complete(self) -> int | None:
    steps = self.manager.all_steps()
    return max(steps) if steps else None

  def close(self) -> None:
    self.settle()
    try:
      self.manager.close()
    except Exception as e:  # pylint: disable=broad-except
      logging.error("Closing the checkpoint manager failed (%s: %s).", type(e).__name__,
                    _brief(e))

  def _prune(self) -> None:
    for step in sorted(self.manager.all_steps())[:-self.keep]:
      try:
        self.manager.delete(step)
      except Exception as e:  # pylint: disable=broad-except  (a stale step stays; harmless)
        logging.warning("Could not delete the old checkpoint at step %d (%s: %s).", step,
                        type(e).__name__, _brief(e))


def save_text_encoder(workdir: str, params, t5_config) -> None:
  directory = paths.absolute(os.path.join(workdir, "text_encoder"))
  save_whole_arrays_on_cpu()
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(directory, "params"), params)
  checkpointer.wait_until_finished()
  if jax.process_index() == 0:
    fields = dataclasses.asdict(t5_config)
    fields["dtype"] = str(np.dtype(fields["dtype"]))  # e.g. "bfloat16"; JSON-friendly
    paths.write_text(os.path.join(directory, "t5_config.json"), json.dumps(fields, indent=2))


def text_encoder_saved(workdir: str) -> bool:
  return paths.exists(os.path.join(workdir, "text_encoder", "t5_config.json"))


def load_text_encoder(workdir: str, config_cls, sharding=None):
  """Returns (params, t5_config) saved by `save_text_encoder`; with `sharding` (a tree of
  shardings like the params, or one for every leaf; needed on several hosts) the params
  are restored straight into it."""
  directory = paths.absolute(os.path.join(workdir, "text_encoder"))
  t5_config = config_cls(**json.loads(paths.read_text(os.path.join(directory, "t5_config.json"))))
  target = None
  if sharding is not None:
    shapes = t5_param_shapes(t5_config)
    if isinstance(sharding, jax.sharding.Sharding):
      sharding = jax.tree.map(lambda _: sharding, shapes)
    target = abstract_like(shapes, sharding)
  params = ocp.StandardCheckpointer().restore(os.path.join(directory, "params"), target)
  return params, t5_config


def frozen_text_encoder(config, workdir: str, mesh=None, rules=None) -> tuple[T5Encoder, object]:
  """The run's T5 encoder: restored from the workdir, else created and saved there.

  Its weights are saved with the run so that sampling later sees the same text features.
  With `mesh` (needed on several hosts) the params are sharded over it by the logical
  axis `rules` (default axes.DEFAULT_RULES), each host placing only its devices' shards.
  """
  wanted = stages.t5_config(config)
  rules = axes.DEFAULT_RULES if rules is None else rules
  shardings = None if mesh is None else text_shardings(wanted, mesh, rules)
  # Host 0's view decides, so that every host takes the same (collective) path.
  if distributed.host0_value(text_encoder_saved(workdir)):
    params, t5 = load_text_encoder(workdir, T5Config, shardings)
    if t5 != wanted:
      raise ValueError(f"config.text differs from the encoder saved in {workdir}/text_encoder "
                       f"({t5}); use a new workdir or the original config.")
    return T5Encoder(t5), params
  if config.text.checkpoint:
    params, t5 = _pretrained_text_encoder(config.text.checkpoint, wanted, mesh, rules)
  else:
    t5, params = wanted, init_params(wanted, config.text.init_seed)
    if shardings is not None:  # seeded: the same values on every host
      params = jax.tree.map(distributed.put, params, shardings)
  save_text_encoder(workdir, params, t5)
  return T5Encoder(t5), params


def text_shardings(t5: T5Config, mesh, rules):
  """Shardings of the T5 params over `mesh` by the logical axis rules."""
  from imagen_jax.text.pretrained import param_shardings  # pylint: disable=import-outside-toplevel
  return param_shardings(t5, mesh, rules)


# Fields of config.text that must agree with a pretrained checkpoint's architecture.
_ARCHITECTURE_FIELDS = ("vocab_size", "d_model", "num_layers", "num_heads", "head_dim", "mlp_dim",
                        "relative_attention_num_buckets", "relative_attention_max_distance")


def _pretrained_text_encoder(path: str, wanted: T5Config, mesh=None, rules=axes.DEFAULT_RULES):
  """(params, T5Config) of a T5X / Hugging Face / converted checkpoint, checked against the
  architecture config.text describes (the U-Nets' text width is config.text.d_model).
  With `mesh`, each host reads only the slices its devices hold."""
  from imagen_jax.text.pretrained import PretrainedT5Encoder  # pylint: disable=import-outside-toplevel
  encoder = PretrainedT5Encoder.from_pretrained(
      path, dtype=wanted.dtype, max_distance=wanted.relative_attention_max_distance,
      mesh=mesh, rules=rules)
  found = encoder.config
  wrong = [f"config.text.{f}={getattr(wanted, f)} (the checkpoint has {getattr(found, f)})"
           for f in _ARCHITECTURE_FIELDS if getattr(wanted, f) != getattr(found, f)]
  if wrong:
    raise ValueError(f"config.text does not describe the encoder in {path}: " + "; ".join(wrong)
                     + ". Set those fields to the checkpoint's values.")
  return encoder.params, found
