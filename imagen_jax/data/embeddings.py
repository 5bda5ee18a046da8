"""Precomputed T5 embeddings: the shard format, its metadata, record checks, reading back.

`python -m imagen_jax.encode_text` (see `precompute.py`) writes, per split, into one
directory (local or gs://):

  {split}.metadata.json                  encoder, dtypes, max_length, shard count, probe
  {split}.tfrecord-00000-of-00016        tf.train.Example records (below)
  {split}.tfrecord-00000-of-00016.json   that shard's counts and record lengths (written
                                         before the shard; the reader's index)

A record (tf.train.Example):
  key        bytes  the example's unique id
  caption    bytes  UTF-8
  image      bytes  the encoded image exactly as given (PNG, JPEG, ...); empty for captions
                    read from a text file
  embedding  bytes  the UNPADDED T5 output [length, width], row-major, little-endian, in the
                    split's `embedding_dtype` (bfloat16, float16 or float32)
  length     int64  tokens, EOS included (1 .. max_length)
  width      int64  the encoder's d_model

Reading back (`ShardsSource` + `decode_fn`, registered as a seqio task by
`tasks.register_embeddings_task`) pads each embedding with zeros to max_length and adds
the mask, so a batch equals one encoded on the fly (the on-the-fly path zeroes padded
positions too). Records that would put garbage into training (an image that does not
decode, an embedding whose width is not config.text.d_model, whose length or byte size is
wrong, or with non-finite values) are found by `check_record` and skipped by the input
pipeline (`pipeline.SplitReader`), deterministically, so exact resume is kept.
"""
from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import posixpath

import ml_dtypes
import numpy as np
import seqio
import tensorflow as tf
from absl import logging

FORMAT = "imagen_jax.text_embeddings.v1"
EMBEDDING_DTYPES = ("bfloat16", "float16", "float32")
PROBE_TEXT = "a photograph of a red circle above a blue square"
# What the train step reads from a precomputed split (the on-the-fly path reads
# ("image", "text_tokens", "key")).
TRAIN_KEYS = ("image", "text_embedding", "text_mask", "key")
# Relative error (max abs over real tokens / max abs of the reference) up to which two
# encoders count as the same: bfloat16 vs float32 compute is ~2.4% (README), a different
# encoder ~100%.
PROBE_TOLERANCE = 0.1


def numpy_dtype(name: str) -> np.dtype:
  if name not in EMBEDDING_DTYPES:
    raise ValueError(f"embedding dtype {name!r}: use one of {EMBEDDING_DTYPES}.")
  return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def _join(directory: str, name: str) -> str:
  return posixpath.join(directory, name) if "://" in directory else os.path.join(directory, name)


def shard_name(split: str, index: int, num_shards: int) -> str:
  return f"{split}.tfrecord-{index:05d}-of-{num_shards:05d}"


def shard_paths(directory: str, split: str, num_shards: int) -> list[str]:
  return [_join(directory, shard_name(split, i, num_shards)) for i in range(num_shards)]


def metadata_path(directory: str, split: str) -> str:
  return _join(directory, f"{split}.metadata.json")


def splits_in(directory: str) -> list[str]:
  """The splits that have metadata in `directory`."""
  if not tf.io.gfile.isdir(directory):
    return []
  suffix = ".metadata.json"
  return sorted(n[:-len(suffix)] for n in tf.io.gfile.listdir(directory) if n.endswith(suffix))


# ---- Metadata. ----

def encode_probe(embedding: np.ndarray) -> str:
  return base64.b64encode(np.asarray(embedding, np.float32).tobytes()).decode()


def decode_probe(meta: dict) -> np.ndarray:
  values = np.frombuffer(base64.b64decode(meta["probe"]["embedding"]), np.float32)
  return values.reshape(meta["probe"]["length"], meta["d_model"])


def write_json(path: str, value: dict, indent: int | None = 2) -> None:
  """Writes JSON through a temporary file and a rename, so a reader never sees half of it."""
  tmp = path + ".tmp"
  with tf.io.gfile.GFile(tmp, "w") as f:
    f.write(json.dumps(value, indent=indent, sort_keys=True))
  tf.io.gfile.rename(tmp, path, overwrite=True)


def read_json(path: str) -> dict:
  with tf.io.gfile.GFile(path, "r") as f:
    return json.loads(f.read())


def read_metadata(directory: str, split: str) -> dict | None:
  path = metadata_path(directory, split)
  return read_json(path) if tf.io.gfile.exists(path) else None


def probe_error(reference: np.ndarray, other: np.ndarray) -> float:
  """Max abs difference over the probe's tokens relative to the reference's max abs."""
  if reference.shape != other.shape:
    return float("inf")
  scale = max(float(np.abs(reference).max()), 1e-12)
  return float(np.abs(reference - other).max()) / scale


def check_encoder(meta: dict, embed, *, field: str) -> float:
  """Checks that embeddings were made by the encoder `embed` stands for.

  embed(ids int32 [1, L]) -> [1, L, D] is the run's encoder (pad id 0). Its output for the
  probe caption stored in `meta` must match the stored one within PROBE_TOLERANCE
  (relative); returns the relative difference.
  """
  from imagen_jax.text import Tokenizer  # pylint: disable=import-outside-toplevel
  ids, mask = Tokenizer().encode([meta["probe"]["text"]], meta["max_length"])
  out = np.asarray(embed(ids), np.float32)[0, :int(mask[0].sum())]
  error = probe_error(decode_probe(meta), out)
  if error > PROBE_TOLERANCE:
    raise ValueError(
        f"{field}: the embeddings there were made by another T5 encoder than this run's "
        f"(config.text, saved in WORKDIR/text_encoder): its output for the probe caption "
        f"differs by {error:.1%} of its scale (tolerance {PROBE_TOLERANCE:.0%}). They came "
        f"from {meta['encoder']['source']}; re-encode with the run's encoder "
        "(`python -m imagen_jax.encode_text --config=<this config>` or `--workdir=WORKDIR`), "
        "or set config.text to that encoder.")
  return error


def check_for_training(directory: str, split: str, *, d_model: int, max_length: int,
                       field: str) -> dict:
  """Checks a split of precomputed embeddings against the config (before compiling).

  Returns its metadata; errors name `field` (config.stages.<stage>.embeddings_dir) or the
  config.text field to change.
  """
  meta = read_metadata(directory, split)
  if meta is None:
    found = splits_in(directory)
    raise ValueError(
        f"{field}={directory!r} has no {split!r} split of precomputed embeddings "
        f"({posixpath.basename(metadata_path(directory, split))} is missing"
        + (f"; it has {found}" if found else "") + "). Write it with `python -m "
        f"imagen_jax.encode_text --config=... --output_dir={directory} --split={split}`, or set "
        f"{field}='' to encode captions on the fly.")
  if meta.get("format") != FORMAT:
    raise ValueError(f"{field}={directory!r}: {split}.metadata.json has format "
                     f"{meta.get('format')!r}, expected {FORMAT!r}; re-encode the split.")
  if meta["d_model"] != d_model:
    raise ValueError(
        f"{field}={directory!r} holds embeddings of width {meta['d_model']}, but "
        f"config.text.d_model={d_model}: the U-Nets take text of config.text.d_model. Use "
        "embeddings of the configured encoder, or set config.text to the encoder that made "
        f"them ({meta['encoder']['config']}).")
  if meta["max_length"] != max_length:
    raise ValueError(
        f"{field}={directory!r} was encoded at max_length={meta['max_length']}, but "
        f"config.text.max_length={max_length}; set config.text.max_length="
        f"{meta['max_length']}, or re-encode with --max_length={max_length}.")
  if not meta.get("has_images", True):
    raise ValueError(
        f"{field}={directory!r} split {split!r} holds captions without images (encoded from "
        "a text file); training needs image+caption pairs (--tfds or --tfrecords input).")
  present = set(tf.io.gfile.listdir(directory))  # one listing, not a request per shard
  missing = [p for p in shard_paths(directory, split, meta["num_shards"])
             if posixpath.basename(p) not in present]
  if missing:
    raise ValueError(
        f"{field}={directory!r}: {len(missing)} of the {meta['num_shards']} shards of split "
        f"{split!r} are missing (e.g. {posixpath.basename(missing[0])}): encode_text has not "
        "finished. Run the same encode_text command again; it resumes.")
  return meta


# ---- Records. ----

def serialize_example(*, key: bytes, caption: bytes, image: bytes, embedding: np.ndarray) -> bytes:
  """One record; `embedding` is the unpadded [length, width] array in its storage dtype."""
  length, width = embedding.shape
  data = np.ascontiguousarray(embedding).tobytes()
  feature = {
      "key": tf.train.Feature(bytes_list=tf.train.BytesList(value=[key])),
      "caption": tf.train.Feature(bytes_list=tf.train.BytesList(value=[caption])),
      "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image])),
      "embedding": tf.train.Feature(bytes_list=tf.train.BytesList(value=[data])),
      "length": tf.train.Feature(int64_list=tf.train.Int64List(value=[length])),
      "width": tf.train.Feature(int64_list=tf.train.Int64List(value=[width])),
  }
  return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def parse_example(record: bytes) -> dict:
  """A record as Python values: key/caption/image/embedding bytes, length/width ints."""
  features = tf.train.Example.FromString(record).features.feature
  out = {}
  for name in ("key", "caption", "image", "embedding"):
    values = features[name].bytes_list.value if name in features else []
    out[name] = values[0] if values else None
  for name in ("length", "width"):
    values = features[name].int64_list.value if name in features else []
    out[name] = int(values[0]) if values else None
  return out


def check_image(data: bytes | None, shape=None) -> str | None:
  """Why encoded image bytes can't be trained on, or None when they decode (fully).

  shape: the (height, width) they must have, or None for any.
  """
  from PIL import Image  # pylint: disable=import-outside-toplevel
  if not data:
    return "no image bytes"
  try:
    with Image.open(io.BytesIO(data)) as im:
      im.verify()  # chunk CRCs (PNG), headers
    with Image.open(io.BytesIO(data)) as im:
      im.load()  # every pixel: truncated or corrupt data raises here
      size = im.size
  except Exception as e:  # pylint: disable=broad-except  (PIL raises many types)
    return f"image does not decode ({type(e).__name__}: {_brief(e)})"
  if shape is not None and (size[1], size[0]) != tuple(shape[:2]):
    return f"image is {size[1]}x{size[0]}, expected {shape[0]}x{shape[1]}"
  return None


def check_record(record: bytes, *, width: int, max_length: int, dtype: np.dtype,
                 check_images: bool = True) -> tuple[str, str | None]:
  """(key, why the record can't be trained on, or None)."""
  try:
    ex = parse_example(record)
  except Exception as e:  # pylint: disable=broad-except
    return "?", f"not a tf.train.Example ({type(e).__name__}: {_brief(e)})"
  key = ex["key"].decode("utf-8", "replace") if ex["key"] is not None else "?"
  for name in ("caption", "embedding", "length", "width"):
    if ex[name] is None:
      return key, f"no {name!r} feature"
  length, found_width, data = ex["length"], ex["width"], ex["embedding"]
  if found_width != width:
    return key, f"embedding width {found_width}, expected {width} (config.text.d_model)"
  if not 1 <= length <= max_length:
    return key, f"embedding length {length} outside [1, {max_length}] (config.text.max_length)"
  expected = length * width * dtype.itemsize
  if len(data) != expected:
    return key, (f"embedding has {len(data)} bytes, expected {expected} (length {length} x "
                 f"width {width} x {dtype.itemsize} bytes of {dtype.name})")
  if not np.isfinite(np.frombuffer(data, dtype).astype(np.float32)).all():
    return key, "embedding has NaN or Inf values"
  if check_images:
    reason = check_image(ex["image"])
    if reason:
      return key, reason
  return key, None


def _brief(error: BaseException, limit: int = 200) -> str:
  text = " ".join(str(error).split())
  return text if len(text) <= limit else text[:limit] + " ..."


# ---- Reading back as a seqio task. ----

FEATURE_DESCRIPTION = {
    "key": tf.io.FixedLenFeature([], tf.string),
    "caption": tf.io.FixedLenFeature([], tf.string),
    "image": tf.io.FixedLenFeature([], tf.string, default_value=""),
    "embedding": tf.io.FixedLenFeature([], tf.string),
    "length": tf.io.FixedLenFeature([], tf.int64),
    "width": tf.io.FixedLenFeature([], tf.int64),
}


@dataclasses.dataclass(frozen=True)
class ShardsInfo:
  """What reading a directory of shards needs, common to all of its splits."""
  directory: str
  width: int
  max_length: int
  dtype_name: str
  split_files: dict  # split -> [shard paths]

  @property
  def dtype(self) -> np.dtype:
    return numpy_dtype(self.dtype_name)


def shards_info(directory: str, *, width: int, max_length: int) -> ShardsInfo:
  """The splits of a directory; they must agree on dtype, width and max_length."""
  splits = splits_in(directory)
  if not splits:
    raise ValueError(f"{directory}: no precomputed embeddings (no *.metadata.json); write them "
                     "with `python -m imagen_jax.encode_text`.")
  metas = {split: read_metadata(directory, split) for split in splits}
  dtypes = {m["embedding_dtype"] for m in metas.values()}
  widths = {m["d_model"] for m in metas.values()}
  if len(dtypes) > 1 or len(widths) > 1:
    raise ValueError(f"{directory}: its splits disagree on embedding dtype / width "
                     f"({ {s: (m['embedding_dtype'], m['d_model']) for s, m in metas.items()} }); "
                     "write each encoding to its own directory.")
  return ShardsInfo(directory, width, max_length, dtypes.pop(),
                    {s: shard_paths(directory, s, m["num_shards"]) for s, m in metas.items()})


class ShardsSource(seqio.TFExampleDataSource):
  """The shards of a directory as a seqio source; `check_record` is what
  `pipeline.SplitReader` runs on each record before it may reach training."""

  def __init__(self, info: ShardsInfo):
    self.info = info
    super().__init__(split_to_filepattern=info.split_files,
                     feature_description=FEATURE_DESCRIPTION)

  def list_shards(self, split: str):
    return list(self.info.split_files[split])  # in shard order (the examples' order)

  def check_record(self, record: bytes) -> tuple[str, str | None]:
    return check_record(record, width=self.info.width, max_length=self.info.max_length,
                        dtype=self.info.dtype)

  def record_offsets(self, filename: str):
    """(data offsets, lengths) of a shard's records from its counts file, or None (then
    the reader scans the shard): no need to read terabytes of embeddings at start-up."""
    return stored_record_offsets(filename)


def record_offsets_from_lengths(lengths) -> tuple[np.ndarray, np.ndarray]:
  """A TFRecord record is 8 bytes of length, 4 of CRC, the data, 4 of CRC."""
  lengths = np.asarray(lengths, np.int64)
  starts = np.concatenate([[0], np.cumsum(lengths + 16)[:-1]]).astype(np.int64)
  return starts + 12, lengths


def stored_record_offsets(filename: str):
  """Offsets from `{shard}.json`'s record_lengths, if they describe the file's size."""
  try:
    lengths = read_json(filename + ".json")["record_lengths"]
    size = tf.io.gfile.stat(filename).length
  except (tf.errors.NotFoundError, KeyError, ValueError):
    return None
  offsets, lengths = record_offsets_from_lengths(lengths)
  if int(np.sum(lengths + 16)) != size:
    logging.warning("%s is %d bytes, but its counts file describes %d; reading its record "
                    "offsets from the file itself.", filename, size, int(np.sum(lengths + 16)))
    return None
  return offsets, lengths


def decode_image(data: tf.Tensor, resolution: int) -> tf.Tensor:
  """Encoded bytes -> uint8 [resolution, resolution, 3]; other sizes are centre-cropped to
  a square and resized (area-averaged), an image of the right size is left as it is."""
  image = tf.io.decode_image(data, channels=3, expand_animations=False, dtype=tf.uint8)
  image.set_shape([None, None, 3])
  if not resolution:
    return image

  def crop_and_resize():
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    side = tf.minimum(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = image[top:top + side, left:left + side]
    resized = tf.image.resize(square, [resolution, resolution], method="area")
    return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)

  shape = tf.shape(image)
  same = tf.logical_and(tf.equal(shape[0], resolution), tf.equal(shape[1], resolution))
  image = tf.cond(same, lambda: image, crop_and_resize)
  return tf.ensure_shape(image, [resolution, resolution, 3])


def decode_fn(info: ShardsInfo, resolution: int):
  """Parsed record -> {image, text_embedding [max_length, width] (zero-padded, storage
  dtype), text_mask [max_length] bool, caption, key}."""
  tf_dtype = tf.as_dtype(info.dtype)

  def decode(ex):
    length = tf.cast(ex["length"], tf.int32)
    embedding = tf.reshape(tf.io.decode_raw(ex["embedding"], tf_dtype), [length, info.width])
    embedding = tf.pad(embedding, [[0, info.max_length - length], [0, 0]])
    return {
        "image": decode_image(ex["image"], resolution),
        "text_embedding": tf.ensure_shape(embedding, [info.max_length, info.width]),
        "text_mask": tf.range(info.max_length) < length,
        "caption": ex["caption"],
        "key": ex["key"],
    }

  return decode
