"""Host input pipeline: a seqio task -> padded, batched numpy examples for one host.

Training batches are a pure function of (seed, stream, step): global batch s holds the
positions [s B, (s + 1) B) of an endless stream whose epoch e (positions [e n, (e + 1) n)
of a split of n examples) visits the split in a pseudorandom order drawn from (seed,
stream, e). Each host reads its slice of every global batch by example index, so a run
resumed at step s sees exactly the batches an uninterrupted run sees from step s on, with
nothing replayed, and the stream does not depend on the number of hosts.
`parallel.mesh.host_to_global` assembles the global arrays.
"""
from __future__ import annotations

import collections.abc
import contextlib
import dataclasses
import os
import re
import struct
import threading
import zlib

import jax
import numpy as np
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from imagen_jax.data import embeddings, shapes_tfds, tasks

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
  task = tasks.register_shapes_task(int(match.group(1)), data_dir=data_dir, task_name=task_name,
                                    **dict(config.shapes))
  prepare_data(config, task_name)
  return task


def prepare_data(config, task_name: str) -> None:
  """Renders a built-in `shapes_<R>` set into config.data_dir unless it is there (a no-op
  for other tasks). Safe to run in a background thread while another set is used."""
  match = _SHAPES_TASK.match(task_name)
  if match:
    builder = shapes_tfds.Shapes(
        config=shapes_tfds.make_config(int(match.group(1)), **dict(config.shapes)),
        data_dir=config.data_dir or DEFAULT_DATA_DIR)
    builder.download_and_prepare()  # no-op when present


def register_embeddings_task(config, stage: str) -> seqio.Task:
  """Registers `<stage>_embeddings`: the precomputed embeddings of
  config.stages.<stage>.embeddings_dir (see embeddings.py), padded to
  config.text.max_length, images at the stage's resolution."""
  s = config.stages[stage]
  return tasks.register_embeddings_task(
      f"{stage}_embeddings", s.embeddings_dir, width=config.text.d_model,
      max_length=config.text.max_length, resolution=s.resolution)


_TFDS_READ_CONFIG_LOCK = threading.Lock()


@contextlib.contextmanager
def _without_tfds_autocache():
  """Datasets built inside read TFDS splits without TFDS's in-memory cache.

  Both seqio (`try_in_mem_cache`) and TFDS (`ReadConfig.try_autocache`) cache a small split
  read in file order. Callers of `dataset` read a prefix (`first_examples`), and a cache
  read in part is thrown away with a warning of "unexpected truncation" per cache at every
  call. seqio takes a TFDS read config only process-wide, so it is set while the dataset is
  built (the read config is consumed then) and put back after.
  """
  with _TFDS_READ_CONFIG_LOCK:
    previous = seqio.utils._TFDS_DATA_READ_CONFIG_OVERRIDE  # seqio has a setter only
    base = dataclasses.replace(previous) if previous is not None else tfds.ReadConfig()
    seqio.utils.set_tfds_read_config_override(dataclasses.replace(base, try_autocache=False))
    try:
      yield
    finally:
      seqio.utils.set_tfds_read_config_override(previous)


def _pad_tokens(max_length: int):
  def pad(ex):
    if "text_tokens" not in ex:  # precomputed embeddings come padded
      return ex
    tokens = ex["text_tokens"][:max_length]
    ex["text_tokens"] = tf.pad(tokens, [[0, max_length - tf.shape(tokens)[0]]])
    ex["text_tokens"] = tf.ensure_shape(ex["text_tokens"], [max_length])
    return ex
  return pad


def dataset(task: seqio.Task, split: str, *, max_length: int, shuffle: bool, seed: int | None,
            num_epochs: int | None, keys=("image", "text_tokens"),
            shard_by_host: bool = True) -> tf.data.Dataset:
  """This host's shard of the task (all of it if not shard_by_host), tokens padded to
  max_length (pad id 0)."""
  host, hosts = (jax.process_index(), jax.process_count()) if shard_by_host else (0, 1)
  with _without_tfds_autocache():
    ds = task.get_dataset(
        sequence_length={"text_tokens": max_length}, split=split, shuffle=shuffle,
        seed=seed, num_epochs=num_epochs,
        shard_info=seqio.ShardInfo(index=host, num_shards=hosts), try_in_mem_cache=False)
  ds = ds.map(_pad_tokens(max_length), num_parallel_calls=tf.data.AUTOTUNE)
  return ds.map(lambda ex: {k: ex[k] for k in keys})


def train_batches(task: seqio.Task, split: str, *, global_batch_size: int, max_length: int,
                  seed: int, stream: str = "", start_step: int = 0,
                  keys=("image", "text_tokens", "key")):
  """Endless iterator of this host's share of global batches start_step, start_step + 1, ...

  Each batch: {"image", "text_tokens", "key"} (key: the example's unique id, bytes); for
  a task of precomputed embeddings, keys=embeddings.TRAIN_KEYS gives {"image",
  "text_embedding", "text_mask", "key"}. `stream` names an independent order of the same
  split (the stage name, say).
  """
  local = global_batch_size // jax.process_count()
  reader = SplitReader(task, split)
  ds = _host_positions(start_step, global_batch_size, local, jax.process_index())
  ds = ds.map(reader.index_fn(seed, stream))
  ds = reader.examples(ds, max_length, keys)
  ds = ds.batch(local, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  return ds.as_numpy_iterator()


def _host_positions(start_step: int, global_batch: int, local_batch: int, host: int):
  """The global stream positions this host reads, in order, from batch start_step on."""
  ds = tf.data.Dataset.counter(start_step * local_batch, dtype=tf.int64)
  return ds.map(lambda q: (q // local_batch) * global_batch + host * local_batch
                + q % local_batch)


class SplitReader:
  """Random access to the examples of a seqio task's split, preprocessed by the task.

  seqio reads splits front to back; starting the stream at any step without replaying it
  needs example i of the split directly. The split must be TFRecord files (a TFDS
  dataset, or a seqio.TFExampleDataSource such as precomputed embeddings), which have no
  index: shards of precomputed embeddings store their record offsets next to them (no
  read at start-up); other files are read once at start-up for the offset of every
  record (a full read: fine for the shapes sets, not for terabytes).

  Bad records never reach training. Before a record is used it is checked (images must
  decode fully; a source with a `check_record(record) -> (key, reason)` method, such as
  embeddings.ShardsSource, adds its own checks: embedding width, length, byte size,
  finiteness). A bad record is counted (`num_bad`), logged once with its key, and its
  place in the stream goes to the next good record of the split (index i + 1, i + 2, ...
  cyclically): a function of the data alone, so batch s still depends only on (seed,
  stream, s) and a resumed run sees exactly the batches an uninterrupted one sees.
  """

  _UNCHECKED, _GOOD, _BAD = 0, 1, 2

  def __init__(self, task: seqio.Task, split: str):
    self.task, self.split = task, split
    files, self.features, self._deserialize, self._check, stored_offsets = _record_source(
        task, split)
    self._files, ids, offsets, lengths = [], [], [], []
    for filename, skip, take in files:
      # Offsets written next to the file (precomputed embeddings) spare reading it whole.
      stored = stored_offsets(filename) if stored_offsets else None
      file_offsets, file_lengths = stored if stored is not None else _record_offsets(filename)
      take = take if take >= 0 else len(file_offsets) - skip
      part = slice(skip, skip + take)
      ids.append(np.full(take, len(self._files), np.int32))
      offsets.append(file_offsets[part])
      lengths.append(file_lengths[part])
      self._files.append(filename)
    self._ids, self._offsets, self._lengths = (np.concatenate(x) for x in (ids, offsets, lengths))
    self.num_examples = len(self._ids)
    if not self.num_examples:
      raise ValueError(f"Task {task.name!r} split {split!r} has no examples.")
    self._open_files = threading.local()  # tf.data calls read() from several threads
    self._status = np.zeros(self.num_examples, np.int8)  # _UNCHECKED / _GOOD / _BAD
    self._lock = threading.Lock()
    self.num_bad = 0
    self.bad = {}  # split index -> (key, reason)

  def read(self, indices) -> np.ndarray:
    """The serialized examples of the split at `indices` (a vector), as bytes objects; a
    bad record's place goes to the next good one (see the class docstring)."""
    handles = getattr(self._open_files, "handles", None)
    if handles is None:
      handles = self._open_files.handles = {}
    records = np.empty(len(indices), object)
    for n, i in enumerate(indices):
      records[n] = self._good_record(int(i), handles)
    return records

  def _record(self, i: int, handles) -> bytes:
    name = self._files[self._ids[i]]
    if name not in handles:
      handles[name] = tf.io.gfile.GFile(name, "rb")
    handles[name].seek(int(self._offsets[i]))
    return handles[name].read(int(self._lengths[i]))

  def _good_record(self, i: int, handles) -> bytes:
    n = self.num_examples
    for j in range(i, i + n):
      j %= n
      if self._status[j] == self._BAD:
        continue
      record = self._record(j, handles)
      if self._status[j] == self._GOOD or self._is_good(j, record):
        return record
    raise ValueError(f"Task {self.task.name!r} split {self.split!r}: all {n} records are bad "
                     "(warnings above).")

  def _is_good(self, j: int, record: bytes) -> bool:
    try:
      key, reason = self._check(record)
    except Exception as e:  # pylint: disable=broad-except  (a record that breaks the check)
      key, reason = "?", f"{type(e).__name__}: {e}"
    if reason is None:
      self._status[j] = self._GOOD
      return True
    with self._lock:
      if self._status[j] != self._BAD:
        self._status[j] = self._BAD
        self.num_bad += 1
        self.bad[j] = (key, reason)
        logging.warning(
            "Task %s split %s: skipping bad record %s (index %d of %d): %s. The next good record "
            "takes its place in the stream; %d bad record(s) so far.", self.task.name,
            self.split, key, j, self.num_examples, reason, self.num_bad)
    return False

  def index_fn(self, seed: int, stream: str = ""):
    """fn(position) -> split index: epoch position // n is a permutation of range(n)."""
    n = self.num_examples
    salt = zlib.crc32(stream.encode()) & 0x7FFFFFFF

    def index(position):
      key = tf.random.experimental.stateless_fold_in(tf.constant([seed, salt], tf.int64),
                                                     position // n)  # one key per epoch
      return tf.random.experimental.index_shuffle(position % n, key, tf.constant(n - 1, tf.int64))

    return index

  def examples(self, indices: tf.data.Dataset, max_length: int,
               keys=("image", "text_tokens", "key")) -> tf.data.Dataset:
    """Split indices -> the task's preprocessed examples, tokens padded to max_length."""
    def read(chunk):
      records = tf.numpy_function(self.read, [chunk], tf.string, stateful=False)
      return tf.ensure_shape(records, [None])

    # Python reads records; in chunks, because each call into Python costs ~0.5 ms.
    ds = indices.batch(64).map(read, num_parallel_calls=tf.data.AUTOTUNE).unbatch()
    ds = ds.map(self._deserialize, num_parallel_calls=tf.data.AUTOTUNE)
    sequence_length = {"text_tokens": max_length}
    # The task's own preprocessing, as task.get_dataset applies it (seeded preprocessors
    # would restart their random streams on resume; the shapes tasks have none).
    ds = self.task.preprocess_precache(ds)
    ds = self.task.preprocess_postcache(ds, sequence_length=sequence_length)
    ds = seqio.utils.trim_dataset(ds, sequence_length, self.task.output_features)
    ds = ds.map(_pad_tokens(max_length), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.map(lambda ex: {k: ex[k] for k in keys})


def _tfds_builder_and_split(task: seqio.Task, split: str):
  source = task.source
  if not isinstance(source, seqio.TfdsDataSource):
    raise NotImplementedError(
        f"Task {task.name!r}: exact resume reads examples by index, which is implemented for "
        f"TFDS sources and TFRecord TFExampleDataSources only (this one is a "
        f"{type(source).__name__}).")
  splits = source.splits
  tfds_split = splits.get(split, split) if isinstance(splits, collections.abc.Mapping) else split
  if not isinstance(tfds_split, str):
    raise NotImplementedError(f"Task {task.name!r}: split {split!r} maps to another dataset "
                              f"({tfds_split}); index reads need one TFDS dataset.")
  return source.tfds_dataset.builder, tfds_split


def _record_source(task: seqio.Task, split: str):
  """(files as (filename, skip, take), TFDS features or None, deserialize fn, check fn,
  stored-offsets fn or None).

  A TFExampleDataSource may add `check_record(record) -> (key, reason or None)` and
  `record_offsets(filename) -> (offsets, lengths) or None` (embeddings.ShardsSource does).
  """
  source = task.source
  if isinstance(source, seqio.TFExampleDataSource) and source.reader_cls is tf.data.TFRecordDataset:
    files = [(name, 0, -1) for name in source.list_shards(split)]
    check = getattr(source, "check_record", None) or (lambda record: ("?", None))
    description = source.feature_description
    return (files, None, lambda record: tf.io.parse_single_example(record, description), check,
            getattr(source, "record_offsets", None))
  builder, tfds_split = _tfds_builder_and_split(task, split)
  if str(builder.info.file_format.value) != "tfrecord":
    raise NotImplementedError(
        f"Task {task.name!r}: exact resume reads examples by index from TFRecord files; "
        f"this dataset is stored as {builder.info.file_format.value}.")
  files = [(fi.filename, fi.skip, fi.take)
           for fi in builder.info.splits[tfds_split].file_instructions]
  features = builder.info.features
  return files, features, features.deserialize_example, _tfds_check(features), None


def _tfds_check(features):
  """check(record) -> (key, reason or None) for a TFDS split: its top-level Image features
  must decode fully, at their declared height and width."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  images = {name: f.shape for name, f in features.items() if isinstance(f, tfds.features.Image)}

  def check(record):
    fields = tf.train.Example.FromString(record).features.feature
    key = fields["key"].bytes_list.value[0].decode("utf-8", "replace") if (
        "key" in fields and fields["key"].bytes_list.value) else "?"
    for name, shape in images.items():
      values = fields[name].bytes_list.value if name in fields else []
      static = shape[:2] if shape and None not in shape[:2] else None
      reason = embeddings.check_image(values[0] if values else None, static)
      if reason:
        return key, f"{name}: {reason}"
    return key, None

  return check


def _record_offsets(filename: str, chunk: int = 1 << 24) -> tuple[np.ndarray, np.ndarray]:
  """(data offset, length) of every record of a TFRecord file.

  A record is: uint64 length, uint32 CRC of the length, the data, uint32 CRC of the data.
  The file is read in large chunks (one request per chunk on GCS, not one per record);
  a record longer than a chunk costs one seek.
  """
  offsets, lengths = [], []
  with tf.io.gfile.GFile(filename, "rb") as f:
    size, position = f.size(), 0
    buffer, buffer_start = b"", 0  # bytes of the file from buffer_start on
    while position < size:
      if position + 12 > buffer_start + len(buffer):
        f.seek(position)
        buffer, buffer_start = f.read(chunk), position
        if len(buffer) < 12:
          raise ValueError(f"{filename}: truncated TFRecord header at byte {position}.")
      (length,) = struct.unpack_from("<Q", buffer, position - buffer_start)
      offsets.append(position + 12)
      lengths.append(length)
      position += 12 + length + 4
  if position != size:
    raise ValueError(f"{filename}: the last TFRecord ends at byte {position}, the file at {size}.")
  return np.asarray(offsets, np.int64), np.asarray(lengths, np.int64)


def first_examples(task: seqio.Task, split: str, n: int, *, max_length: int) -> dict:
  """The first n examples of a split as one numpy batch (for sample grids and eval); the
  same on every host."""
  ds = dataset(task, split, max_length=max_length, shuffle=False, seed=None, num_epochs=1,
               keys=("image", "text_tokens", "caption", "attributes", "key"),
               shard_by_host=False)
  examples = list(ds.take(n).as_numpy_iterator())
  if len(examples) < n:
    raise ValueError(f"Task {task.name!r} split {split!r} has only {len(examples)} examples, "
                     f"{n} requested.")
  return {k: np.stack([ex[k] for ex in examples]) for k in examples[0]}
