"""Reads the T5 encoder out of a T5X checkpoint, local or on GCS, without the decoder.

T5X writes `<dir>/checkpoint`, a msgpack of `{'version', 'optimizer': {'target': params,
'state': optimizer state}}`. Small arrays are stored inline; partitioned ones are written
as zarr arrays beside the file and replaced in the msgpack by their tensorstore spec:

  {'driver': 'zarr', 'kvstore': {'driver': 'file', 'path': 'target.encoder.layers_0...'},
   'metadata': {'shape': [...], 'dtype': '<f4' | 'bfloat16', 'chunks': ..., ...}}

The path is relative to the checkpoint directory. Checkpoints written to GCS name a
placeholder bucket (`t5x-dummy-bucket`), and tensorstore < 0.1.14 put `path` next to
`kvstore`; in every case the arrays live in the checkpoint's own directory, so each spec
is rewritten to point there. Only `token_embedder` and `encoder` leaves are opened.
"""
from __future__ import annotations

import copy
import dataclasses
import re

import flax.serialization
import jax
import numpy as np
from absl import logging

from imagen_jax.text import checkpoint_io as io

ENCODER_SUBTREES = ("token_embedder", "encoder")
_STEP_DIR = re.compile(r"checkpoint_(\d+)")


def find_checkpoint_file(path: str) -> str | None:
  """The msgpack file of a T5X checkpoint at `path`, or None if `path` holds none.

  `path` may be the `checkpoint` file, its `checkpoint_<step>` directory, or a model
  directory of `checkpoint_<step>` directories (the newest step is taken).
  """
  path = str(path).rstrip("/")
  if path.rsplit("/", 1)[-1] == "checkpoint" and io.exists(path) and not io.isdir(path):
    return path
  if not io.isdir(path):
    return None
  if io.exists(io.join(path, "checkpoint")):
    return io.join(path, "checkpoint")
  steps = sorted((int(m.group(1)), name) for name in io.listdir(path)
                 if (m := _STEP_DIR.fullmatch(name)))
  for _, name in reversed(steps):
    if io.exists(io.join(path, name, "checkpoint")):
      logging.info("T5X model directory %s: using its newest checkpoint, %s.", path, name)
      return io.join(path, name, "checkpoint")
  return None


def _target(state, file: str):
  """The params of a T5X train state (flax.optim layout, or optax's `target`)."""
  if not isinstance(state, dict):
    raise ValueError(f"{file} is not a T5X checkpoint (top level is {type(state).__name__})")
  if isinstance(state.get("optimizer"), dict) and "target" in state["optimizer"]:
    return state["optimizer"]["target"]
  if "target" in state:
    return state["target"]
  raise ValueError(f"{file}: no 'optimizer/target' or 'target' params in this T5X checkpoint; "
                   f"its top-level keys are {sorted(state)}")


def _is_spec(x) -> bool:
  return isinstance(x, dict) and {"driver", "kvstore", "metadata"} <= x.keys()


def _kvstore(directory: str, relative: str) -> dict:
  """A kvstore spec for `relative` under the checkpoint directory."""
  gcs = re.fullmatch(r"gs://([^/]+)/?(.*)", directory)
  if gcs:
    prefix = gcs.group(2).rstrip("/")
    return {"driver": "gcs", "bucket": gcs.group(1),
            "path": f"{prefix}/{relative}" if prefix else relative}
  if io.is_remote(directory):
    raise NotImplementedError(
        f"{directory}: tensorstore leaves of T5X checkpoints are read from local disk or "
        "gs:// only; copy the checkpoint to one of them.")
  return {"driver": "file", "path": io.join(directory, relative)}


def _rewrite_spec(spec: dict, directory: str, name: str) -> dict:
  spec = copy.deepcopy(spec)
  relative = spec["kvstore"].get("path") or spec.pop("path", None)
  spec.pop("path", None)
  if not relative:
    raise ValueError(f"T5X leaf {name}: its tensorstore spec has no path: {spec}")
  dtype = spec.get("dtype") or spec["metadata"].get("dtype")
  if dtype in ("uint16", "<u2"):
    # Checkpoint format version 2 stored bfloat16 as uint16; T5X itself refuses these.
    raise ValueError(f"T5X leaf {name} is stored as uint16 (checkpoint format version < 3); "
                     "convert it with T5X's convert_uint16_checkpoint.py first.")
  # As T5X does: chunking and compression are read from the array's own .zarray, and
  # a spec that restates them fails to open an array rewritten with other settings.
  spec["metadata"].pop("chunks", None)
  spec["metadata"].pop("compressor", None)
  spec["kvstore"] = _kvstore(directory, relative)
  return spec


def read_encoder(file: str):
  """{'token_embedder': ..., 'encoder': ...} of the T5X checkpoint `file`, leaves unread.

  Inline leaves are numpy arrays; tensorstore leaves are `LazyArray`s whose dtype is
  the one in the array's zarr metadata.
  """
  import tensorstore as ts  # pylint: disable=import-outside-toplevel

  with io.open_file(file, "rb") as f:
    state = flax.serialization.msgpack_restore(f.read())
  target = _target(state, file)
  missing = [k for k in ENCODER_SUBTREES if k not in target]
  if missing:
    raise ValueError(f"{file}: the T5X params have no {missing} (found {sorted(target)}); "
                     "is this a T5 encoder-decoder or encoder checkpoint?")
  tree = {k: target[k] for k in ENCODER_SUBTREES}
  directory = io.dirname(file)

  # Start opening every zarr array, then wait on them: on GCS each open is a round trip.
  def start(path, leaf):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    if isinstance(leaf, np.ndarray):
      return leaf
    if _is_spec(leaf):
      return _Opening(name, ts.open(_rewrite_spec(leaf, directory, name), open=True, read=True))
    raise ValueError(f"{file}: T5X leaf {name} is neither an array nor a tensorstore spec: "
                     f"{type(leaf).__name__}")

  def finish(leaf):
    if not isinstance(leaf, _Opening):
      return leaf
    try:
      store = leaf.future.result()
    except Exception as e:  # tensorstore's errors do not say which checkpoint
      raise ValueError(f"{file}: cannot open the zarr array of {leaf.name}: {e}") from e
    return io.LazyArray(store.shape, store.dtype.numpy_dtype,
                        lambda index: store[index].read().result(), f"{file}:{leaf.name}")

  return jax.tree.map(finish, jax.tree_util.tree_map_with_path(start, tree, is_leaf=_is_spec))


@dataclasses.dataclass
class _Opening:  # a tensorstore being opened (a dataclass, so not a pytree node)
  name: str
  future: object
