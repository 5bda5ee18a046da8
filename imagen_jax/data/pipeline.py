"""Host input pipeline: a seqio task -> padded, batched numpy examples for one host.

Each host reads only its shard of the data (seqio.ShardInfo) and yields its share of the
global batch; `parallel.mesh.host_to_global` assembles the global arrays.
"""
from __future__ import annotations

import os
import re

import jax
import numpy as np
import seqio
import tensorflow as tf

from imagen_jax.data import shapes_tfds, tasks

_SHAPES_TASK = re.compile(r"^shapes_(\d+)$")
DEFAULT_DATA_DIR = os.path.join(os.path.expanduser("~"), ".cache", "imagen_jax", "tfds")


def register_task(config, task_name: str) -> seqio.Task:
  """Registers the config's version of a built-in task and makes sure its data exists.

  `shapes_<R>` tasks are generated locally on first use (seconds) into config.data_dir,
  with the config's split sizes.
  """
  match = _SHAPES_TASK.match(task_name)
  if not match:
    # Tasks of other datasets are registered by importing their module (seqio convention).
    return seqio.get_mixture_or_task(task_name)
  data_dir = config.data_dir or DEFAULT_DATA_DIR
  sizes = dict(config.shapes)
  task = tasks.register_shapes_task(int(match.group(1)), data_dir=data_dir, task_name=task_name,
                                    **sizes)
  builder = shapes_tfds.Shapes(config=shapes_tfds.make_config(int(match.group(1)), **sizes),
                               data_dir=data_dir)
  builder.download_and_prepare()  # no-op when present; renders the set otherwise
  return task


def _pad_tokens(max_length: int):
  def pad(ex):
    tokens = ex["text_tokens"][:max_length]
    ex["text_tokens"] = tf.pad(tokens, [[0, max_length - tf.shape(tokens)[0]]])
    ex["text_tokens"] = tf.ensure_shape(ex["text_tokens"], [max_length])
    return ex
  return pad


def dataset(task: seqio.Task, split: str, *, max_length: int, shuffle: bool, seed: int | None,
            num_epochs: int | None, keys=("image", "text_tokens")) -> tf.data.Dataset:
  """This host's shard of the task, tokens padded to max_length (pad id 0)."""
  ds = task.get_dataset(
      sequence_length={"text_tokens": max_length}, split=split, shuffle=shuffle, seed=seed,
      num_epochs=num_epochs,
      shard_info=seqio.ShardInfo(index=jax.process_index(), num_shards=jax.process_count()))
  ds = ds.map(_pad_tokens(max_length), num_parallel_calls=tf.data.AUTOTUNE)
  return ds.map(lambda ex: {k: ex[k] for k in keys})


def train_batches(task: seqio.Task, split: str, *, global_batch_size: int, max_length: int,
                  seed: int):
  """Infinite iterator of this host's share of each global batch."""
  local = global_batch_size // jax.process_count()
  ds = dataset(task, split, max_length=max_length, shuffle=True, seed=seed, num_epochs=None)
  ds = ds.batch(local, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  return ds.as_numpy_iterator()


def first_examples(task: seqio.Task, split: str, n: int, *, max_length: int) -> dict:
  """The first n examples of a split as one numpy batch (for sample grids and eval)."""
  ds = dataset(task, split, max_length=max_length, shuffle=False, seed=None, num_epochs=1,
               keys=("image", "text_tokens", "caption", "attributes", "key"))
  examples = list(ds.take(n).as_numpy_iterator())
  if len(examples) < n:
    raise ValueError(f"Task {task.name!r} split {split!r} has only {len(examples)} examples "
                     f"on this host, {n} requested.")
  return {k: np.stack([ex[k] for ex in examples]) for k in examples[0]}
