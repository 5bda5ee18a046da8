"""Precomputes T5 embeddings of captions into TFRecord shards (`python -m imagen_jax.encode_text`).

Inputs (each an ordered sequence of (key, caption, image bytes) examples):
- `TextFileInput`: one caption per line (no images; blank lines are skipped);
- `TfdsInput`: a TFDS split (e.g. the generated `imagen_shapes` sets), images passed on
  as their stored encoded bytes (never decoded and re-encoded);
- `TFRecordInput`: TFRecord files of tf.train.Example with image and caption features.

The output split is cut into `num_shards` shards, shard i holding a contiguous run of the
input (for TFRecord inputs, shard i is input file i), so that reading the shards in
order gives the input's order. Process p of P writes the shards i with i % P == p: a
deterministic split that needs no coordination between hosts, so each host runs on its
own (no collectives; each encodes on its local devices). A shard is written under a
temporary name and renamed when complete: after a restart, finished shards are skipped
and an unfinished one is written again from its start. The format is in `embeddings.py`.
"""
from __future__ import annotations

import dataclasses
import datetime
import glob as glob_lib
import itertools
import json
import math
import os
import time
from typing import Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf
from absl import logging

from imagen_jax.data import embeddings
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.text import PretrainedT5Encoder
from imagen_jax.text.pretrained import config_to_json

DEFAULT_EXAMPLES_PER_SHARD = 10_000


@dataclasses.dataclass
class Example:
  key: bytes
  caption: str
  image: bytes  # encoded, as given; b"" when the input has none


# ---- Inputs. ----

class TextFileInput:
  """Captions from a text file, one per line; key "<file name>:<line number>"."""

  has_images = False

  def __init__(self, path: str):
    self.path = path
    self.description = f"text file {path}"
    with tf.io.gfile.GFile(path, "r") as f:
      self.num_examples = sum(1 for line in f if line.strip())

  def default_num_shards(self, examples_per_shard: int) -> int:
    return max(1, math.ceil(self.num_examples / examples_per_shard))

  def shard_size(self, index: int, num_shards: int) -> int:
    start, stop = _contiguous(index, num_shards, self.num_examples)
    return stop - start

  def read(self, index: int, num_shards: int) -> Iterator[Example]:
    start, stop = _contiguous(index, num_shards, self.num_examples)
    name = os.path.basename(self.path)
    with tf.io.gfile.GFile(self.path, "r") as f:
      captions = ((n, line.rstrip("\r\n")) for n, line in enumerate(f, 1) if line.strip())
      for line_number, caption in itertools.islice(captions, start, stop):
        yield Example(f"{name}:{line_number}".encode(), caption, b"")


class TfdsInput:
  """A TFDS split; image bytes are read as stored (SkipDecoding)."""

  def __init__(self, builder, split: str, *, image_feature: str = "image",
               caption_feature: str = "caption", key_feature: str = "key"):
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    self.builder, self.split = builder, split
    features = builder.info.features
    if caption_feature not in features:
      raise ValueError(f"TFDS dataset {builder.info.full_name} has no caption feature "
                       f"{caption_feature!r} (features: {sorted(features)}); set --caption_feature.")
    self.caption_feature = caption_feature
    self.image_feature = image_feature if image_feature in features else None
    self.key_feature = key_feature if key_feature in features else None
    self.has_images = self.image_feature is not None
    if split not in builder.info.splits:
      raise ValueError(f"TFDS dataset {builder.info.full_name} has no split {split!r} "
                       f"(splits: {sorted(builder.info.splits)}).")
    self.num_examples = builder.info.splits[split].num_examples
    self.description = f"tfds {builder.info.full_name} split {split}"
    self._decoders = {self.image_feature: tfds.decode.SkipDecoding()} if self.has_images else None
    self._read_config = tfds.ReadConfig(add_tfds_id=self.key_feature is None)

  def default_num_shards(self, examples_per_shard: int) -> int:
    return max(1, math.ceil(self.num_examples / examples_per_shard))

  def shard_size(self, index: int, num_shards: int) -> int:
    start, stop = _contiguous(index, num_shards, self.num_examples)
    return stop - start

  def read(self, index: int, num_shards: int) -> Iterator[Example]:
    start, stop = _contiguous(index, num_shards, self.num_examples)
    if start == stop:
      return
    ds = self.builder.as_dataset(split=f"{self.split}[{start}:{stop}]", shuffle_files=False,
                                 decoders=self._decoders, read_config=self._read_config)
    for ex in ds.as_numpy_iterator():
      key = ex[self.key_feature] if self.key_feature else ex["tfds_id"]
      yield Example(bytes(key), _text(ex[self.caption_feature]),
                    bytes(ex[self.image_feature]) if self.has_images else b"")


class TFRecordInput:
  """TFRecord files of tf.train.Example (image + caption); output shard i = input file i.

  Key: the key feature, else "<file name>:<record number>". A record without a caption is
  skipped with a warning; one without an image is kept with empty image bytes (training
  skips it as a bad record).
  """

  has_images = True

  def __init__(self, pattern: str, *, image_feature: str = "image",
               caption_feature: str = "caption", key_feature: str = "key"):
    files = []
    for part in pattern.split(","):
      matched = tf.io.gfile.glob(part) if "://" in part else glob_lib.glob(part)
      files.extend(sorted(matched))
    if not files:
      raise ValueError(f"--tfrecords={pattern!r} matches no files.")
    self.files = files
    self.features = (image_feature, caption_feature, key_feature)
    self.num_examples = None  # unknown without reading every file
    self.description = f"tfrecords {pattern} ({len(files)} files)"

  def default_num_shards(self, examples_per_shard: int) -> int:
    del examples_per_shard
    return len(self.files)

  def shard_size(self, index: int, num_shards: int) -> None:
    del index, num_shards
    return None

  def read(self, index: int, num_shards: int) -> Iterator[Example]:
    if num_shards != len(self.files):
      raise ValueError(f"TFRecord inputs make one shard per input file ({len(self.files)}); "
                       f"got num_shards={num_shards}.")
    image_feature, caption_feature, key_feature = self.features
    name = os.path.basename(self.files[index])
    for n, record in enumerate(tf.data.TFRecordDataset(self.files[index]).as_numpy_iterator()):
      features = tf.train.Example.FromString(record).features.feature

      def value(feature, features=features):
        values = features[feature].bytes_list.value if feature in features else []
        return values[0] if values else None

      caption = value(caption_feature)
      key = value(key_feature) or f"{name}:{n}".encode()
      if caption is None:
        logging.warning("%s: record %d (%s) has no %r feature; skipped.", self.files[index], n,
                        key, caption_feature)
        continue
      yield Example(key, _text(caption), value(image_feature) or b"")


def _contiguous(index: int, num_shards: int, n: int) -> tuple[int, int]:
  return index * n // num_shards, (index + 1) * n // num_shards


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, (bytes, np.bytes_)) else str(value)


# ---- The encoder, in large jitted batches. ----

class BatchEncoder:
  """Captions -> unpadded embeddings in the storage dtype, `batch_size` at a time.

  One compiled shape [batch_size, max_length]: the last batch of a shard is padded with
  empty rows. The batch is sharded over the data axes of the encoder's mesh (local
  devices); the cast to the storage dtype happens on the device, which halves what comes
  back for 16-bit storage.
  """

  def __init__(self, encoder: PretrainedT5Encoder, *, max_length: int, batch_size: int,
               embedding_dtype: str):
    self.encoder, self.max_length = encoder, max_length
    self.dtype = embeddings.numpy_dtype(embedding_dtype)
    if encoder.tokenizer.vocab_size > encoder.config.vocab_size:
      raise ValueError(f"The tokenizer has {encoder.tokenizer.vocab_size} ids but the encoder's "
                       f"embedding only {encoder.config.vocab_size} rows.")
    self.sharding = None
    if encoder.mesh is not None:
      multiple = mesh_lib.data_parallel_size(encoder.mesh, encoder.rules)
      batch_size = -(-batch_size // multiple) * multiple
      self.sharding = mesh_lib.batch_sharding(encoder.mesh, encoder.rules)
    self.batch_size = batch_size
    module, dtype = encoder.module, jnp.dtype(self.dtype)

    def forward(params, ids, mask):
      out = module.apply({"params": params}, ids, mask)
      return jnp.where(mask[..., None], out, 0.0).astype(dtype)

    self._forward = jax.jit(forward)

  def tokenize(self, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
    ids, mask = self.encoder.tokenizer.encode(captions, self.max_length)
    pad = self.batch_size - len(captions)
    return np.pad(ids, ((0, pad), (0, 0))), np.pad(mask, ((0, pad), (0, 0)))

  def dispatch(self, captions: list[str]):
    """Starts encoding (asynchronously); returns (device array, lengths)."""
    ids, mask = self.tokenize(captions)
    lengths = mask.sum(axis=1)[:len(captions)]
    if self.sharding is None:
      return self._forward(self.encoder.params, ids, mask), lengths
    ids, mask = (jax.make_array_from_callback(x.shape, self.sharding, lambda i, x=x: x[i])
                 for x in (ids, mask))
    with jax.set_mesh(self.encoder.mesh), nn.logical_axis_rules(self.encoder.rules):
      return self._forward(self.encoder.params, ids, mask), lengths

  def probe(self) -> np.ndarray:
    """float32 embedding [length, d_model] of embeddings.PROBE_TEXT (training compares its
    own encoder's output with it)."""
    out, mask = self.encoder.encode([embeddings.PROBE_TEXT], self.max_length)
    return np.asarray(out)[0, :int(mask[0].sum())]

  def encode(self, examples: Iterator[Example]) -> Iterator[tuple[list[Example], np.ndarray, np.ndarray]]:
    """(examples, embeddings [n, max_length, D] in the storage dtype, lengths [n]) per batch.

    Batch k + 1 is dispatched before batch k is fetched, so tokenizing and writing overlap
    the device's work.
    """
    examples, pending = iter(examples), None
    while True:
      chunk = list(itertools.islice(examples, self.batch_size))
      if chunk:
        handle = self.dispatch([ex.caption for ex in chunk])
      if pending is not None:
        done, (out, lengths) = pending
        yield done, np.asarray(out)[:len(done)], lengths
      if not chunk:
        return
      pending = (chunk, handle)


# ---- Loading the encoder. ----

def local_mesh(shape: dict | None):
  """A mesh over this process's devices only: hosts encode independently."""
  return mesh_lib.make_mesh(shape or {"data": -1, "fsdp": 1, "tensor": 1}, jax.local_devices())


def load_encoder(*, config=None, workdir: str | None = None, checkpoint: str | None = None,
                 dtype=None, mesh=None) -> tuple[PretrainedT5Encoder, str]:
  """(encoder, description) from exactly one of: a training config (config.text: its
  checkpoint, or the seeded random weights training would create), a training workdir
  (its text_encoder/), or a checkpoint path (T5X, Hugging Face or converted)."""
  given = [name for name, v in (("config", config), ("workdir", workdir),
                                ("checkpoint", checkpoint)) if v]
  if len(given) != 1:
    raise ValueError(f"Name the encoder with exactly one of --config, --workdir, --checkpoint "
                     f"(got {given or 'none'}).")
  if checkpoint or workdir:
    path = checkpoint or os.path.join(workdir, "text_encoder")
    encoder = PretrainedT5Encoder.from_pretrained(path, dtype=dtype, mesh=mesh)
    return encoder, f"checkpoint {path}"
  # pylint: disable=import-outside-toplevel
  from imagen_jax.text import init_params
  from imagen_jax.train import checkpoint as ckpt
  from imagen_jax.train import stages
  t5 = stages.t5_config(config)
  if dtype is not None:
    t5 = dataclasses.replace(t5, dtype=dtype)
  if config.text.checkpoint:
    params, t5 = ckpt._pretrained_text_encoder(config.text.checkpoint, t5)  # pylint: disable=protected-access
    description = f"config.text.checkpoint {config.text.checkpoint}"
  else:
    params = init_params(t5, config.text.init_seed)
    description = f"config.text random weights, init_seed {config.text.init_seed}"
  return PretrainedT5Encoder(t5, params, mesh=mesh), description


# ---- The pipeline. ----

def _encoder_record(encoder: PretrainedT5Encoder, description: str) -> dict:
  return {"source": description, "config": json.loads(config_to_json(encoder.config))}


def _check_existing(meta: dict, output_dir: str, split: str) -> None:
  """A restart must continue the same encoding; other splits of the directory must come
  from the same encoder, dtype and max_length."""
  for other in embeddings.splits_in(output_dir):
    old = embeddings.read_metadata(output_dir, other)
    fields = (("num_shards", "num_examples", "source", "has_images") if other == split else ())
    fields += ("format", "d_model", "max_length", "embedding_dtype")
    wrong = [f"{f}: {old.get(f)!r} there, {meta[f]!r} now" for f in fields
             if old.get(f) != meta[f]]
    if old["encoder"]["config"] != meta["encoder"]["config"]:
      wrong.append(f"encoder: {old['encoder']} there, {meta['encoder']} now")
    else:
      error = embeddings.probe_error(embeddings.decode_probe(old), embeddings.decode_probe(meta))
      if error > embeddings.PROBE_TOLERANCE:
        wrong.append(f"encoder weights: the probe caption's embedding differs by {error:.0%}")
    if wrong:
      what = "an unfinished encoding of this split" if other == split else f"split {other!r}"
      raise ValueError(f"{output_dir} holds {what} that this run would not match: "
                       + "; ".join(wrong) + ". Use another --output_dir (or the original "
                       "flags to resume).")


def encode_split(inputs, encoder: PretrainedT5Encoder, output_dir: str, *, split: str,
                 max_length: int, batch_size: int = 256, embedding_dtype: str = "bfloat16",
                 num_shards: int | None = None,
                 examples_per_shard: int = DEFAULT_EXAMPLES_PER_SHARD,
                 process_index: int | None = None, process_count: int | None = None,
                 encoder_description: str = "", progress: bool = True) -> dict:
  """Encodes `inputs` into `output_dir`'s shards of `split` that this process owns.

  Returns counts: {"shards_written", "shards_skipped", "examples_written",
  "examples_in_skipped_shards", "inputs_dropped", "seconds"}.
  """
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  t0 = time.time()
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process index {process_index} is not in [0, {process_count}).")
  if num_shards is None:
    num_shards = inputs.default_num_shards(examples_per_shard)
  batcher = BatchEncoder(encoder, max_length=max_length, batch_size=batch_size,
                         embedding_dtype=embedding_dtype)
  probe = batcher.probe()
  meta = {
      "format": embeddings.FORMAT, "split": split, "num_shards": num_shards,
      "num_examples": inputs.num_examples, "source": inputs.description,
      "has_images": inputs.has_images, "d_model": encoder.config.d_model,
      "max_length": max_length, "embedding_dtype": embedding_dtype,
      "encoder": _encoder_record(encoder, encoder_description),
      "probe": {"text": embeddings.PROBE_TEXT, "length": int(probe.shape[0]),
                "embedding": embeddings.encode_probe(probe)},
  }
  tf.io.gfile.makedirs(output_dir)
  _check_existing(meta, output_dir, split)
  if process_index == 0 and embeddings.read_metadata(output_dir, split) is None:
    embeddings.write_json(embeddings.metadata_path(output_dir, split),
                          dict(meta, created=datetime.datetime.now().isoformat(timespec="seconds")))

  mine = list(range(process_index, num_shards, process_count))
  paths = embeddings.shard_paths(output_dir, split, num_shards)
  present = set(tf.io.gfile.listdir(output_dir))  # one listing, not a request per shard
  done = [i for i in mine if os.path.basename(paths[i]) in present]
  todo = [i for i in mine if i not in done]
  stats = {"shards_written": 0, "shards_skipped": len(done), "examples_written": 0,
           "examples_in_skipped_shards": 0, "inputs_dropped": 0}
  for i in done:
    counts_path = paths[i] + ".json"
    if tf.io.gfile.exists(counts_path):
      stats["examples_in_skipped_shards"] += embeddings.read_json(counts_path)["examples"]
  if done:
    logging.info("Process %d: %d of its %d shards of %s are already written; skipping them.",
                 process_index, len(done), len(mine), split)
  sizes = [inputs.shard_size(i, num_shards) for i in todo]
  total = None if any(s is None for s in sizes) else sum(sizes)
  bar = tqdm(total=total, unit="ex", desc=f"encode {split} (process {process_index})",
             disable=not progress, smoothing=0.1)
  for i in todo:
    written, dropped = _write_shard(inputs, batcher, paths[i], i, num_shards, process_index, bar)
    stats["shards_written"] += 1
    stats["examples_written"] += written
    stats["inputs_dropped"] += dropped
  bar.close()
  stats["seconds"] = round(time.time() - t0, 3)
  rate = stats["examples_written"] / max(stats["seconds"], 1e-9)
  logging.info(
      "encode_text: process %d of %d (its %d of the %d shards of split %s): wrote %d examples "
      "in %d shards (%.0f examples/s); %d shards were already done (%d examples); %d inputs "
      "dropped (non-finite embeddings).", process_index, process_count, len(mine), num_shards,
      split, stats["examples_written"], stats["shards_written"], rate, stats["shards_skipped"],
      stats["examples_in_skipped_shards"], stats["inputs_dropped"])
  return stats


def _write_shard(inputs, batcher: BatchEncoder, path: str, index: int, num_shards: int,
                 process_index: int, bar) -> tuple[int, int]:
  """Writes one shard under a temporary name, then its counts, then renames it."""
  tmp = f"{path}.tmp-process{process_index}"
  written = dropped = 0
  record_lengths = []  # the reader's index of the shard (embeddings.stored_record_offsets)
  with tf.io.TFRecordWriter(tmp) as writer:
    for examples, out, lengths in batcher.encode(inputs.read(index, num_shards)):
      for ex, embedding, length in zip(examples, out, lengths):
        embedding = embedding[:length]
        if not np.isfinite(embedding.astype(np.float32)).all():
          logging.warning("Example %s: its embedding has NaN or Inf values (in %s); dropped.",
                          ex.key.decode("utf-8", "replace"), batcher.dtype.name)
          dropped += 1
          continue
        record = embeddings.serialize_example(key=ex.key, caption=ex.caption.encode("utf-8"),
                                              image=ex.image, embedding=embedding)
        writer.write(record)
        record_lengths.append(len(record))
        written += 1
      bar.update(len(examples))
  embeddings.write_json(path + ".json", {"examples": written, "dropped": dropped,
                                         "record_lengths": record_lengths}, indent=None)
  tf.io.gfile.rename(tmp, path, overwrite=True)
  return written, dropped
