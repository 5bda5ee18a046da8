"""Pretrained T5 encoders: load T5X, Hugging Face or converted checkpoints; encode prompts.

  encoder = T5Encoder.from_pretrained(
      "gs://t5-data/pretrained_models/t5x/t5_1_1_xxl/checkpoint_1000000",
      dtype=jnp.bfloat16, mesh=mesh)
  embeddings, mask = encoder.encode(["a corgi on a skateboard"], max_length=128)

`path` is one of (the format is recognised from the files):
- a T5X checkpoint: its `checkpoint_<step>` directory, the `checkpoint` msgpack file in
  it, or a model directory of `checkpoint_<step>`s (the newest); inline and zarr leaves,
  local or gs://. T5X does not store the relative-attention max distance (T5 1.1 uses
  128, the default of `max_distance`).
- a Hugging Face directory (config.json + safetensors / sharded safetensors / .bin);
- a converted checkpoint (`python -m imagen_jax.text.convert`, or a training workdir's
  `text_encoder/`): `params/` (orbax) + `t5_config.json` [+ `spiece.model`].

The architecture (layers, width, heads, head dim, MLP width, vocabulary, buckets) comes
from the weights' shapes. With a mesh, each parameter lands directly in its sharding
from the logical axis rules (T5X's: heads and MLP over `tensor`, embed over `fsdp`),
each host reading only the slices its devices hold. Params are float32; `dtype` is the
compute dtype (norm statistics, attention logits and softmax stay float32).
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax.parallel import axes
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.text import checkpoint_io as io
from imagen_jax.text import hf_checkpoint, t5x_checkpoint
from imagen_jax.text.t5 import T5Config, T5Encoder, abstract_params, check_params_fit
from imagen_jax.text.tokenizer import Tokenizer

CONFIG_FILE = "t5_config.json"   # the converted format (same as a workdir's text_encoder/)
PARAMS_DIR = "params"
TOKENIZER_FILE = "spiece.model"  # beside HF weights, and in converted checkpoints
T5X_MAX_DISTANCE = 128           # what T5X's T5 1.1 RelativePositionBiases use


def detect_format(path: str) -> str:
  """'converted', 'hf' or 't5x', from the files at `path`; errors say what is missing."""
  if not io.exists(path):
    raise FileNotFoundError(f"T5 checkpoint path does not exist: {path}")
  if io.isdir(path):
    if io.exists(io.join(path, CONFIG_FILE)):
      return "converted"
    if io.exists(io.join(path, "config.json")):
      return "hf"
  if t5x_checkpoint.find_checkpoint_file(path):
    return "t5x"
  raise FileNotFoundError(
      f"{path} is not a T5 checkpoint: expected a T5X `checkpoint` file (or checkpoint_<step> "
      f"directories), a Hugging Face `config.json` with weights, or a converted "
      f"`{CONFIG_FILE}` + `{PARAMS_DIR}/`; found {io.describe_dir(path)}")


def infer_config(tree, *, source: str, max_distance: int = T5X_MAX_DISTANCE,
                 epsilon: float = 1e-6, dtype=jnp.float32) -> T5Config:
  """The T5Config that a T5X-layout tree of arrays (anything with .shape) describes."""

  def shape(*keys):
    node = tree
    for i, key in enumerate(keys):
      if not isinstance(node, dict) or key not in node:
        found = sorted(node) if isinstance(node, dict) else type(node).__name__
        raise ValueError(f"{source}: no {'/'.join(keys[:i + 1])} in the encoder weights "
                         f"(found {found})")
      node = node[key]
    return tuple(node.shape)

  vocab, d_model = shape("token_embedder", "embedding")
  heads, buckets = shape("encoder", "relpos_bias", "rel_embedding")
  layers = sorted(int(k[len("layers_"):]) for k in tree["encoder"] if k.startswith("layers_"))
  if not layers or layers != list(range(len(layers))):
    raise ValueError(f"{source}: encoder layers {layers}; expected layers_0 ... layers_N-1")
  mlp = tree["encoder"]["layers_0"].get("mlp", {})
  if "wi" in mlp and "wi_0" not in mlp:
    raise NotImplementedError(f"{source}: a T5 1.0 encoder (one ReLU `wi` kernel); only T5 "
                              "v1.1's gated-GELU MLP (wi_0, wi_1) is implemented.")
  _, inner = shape("encoder", "layers_0", "attention", "query", "kernel")
  _, mlp_dim = shape("encoder", "layers_0", "mlp", "wi_0", "kernel")
  if inner % heads:
    raise ValueError(f"{source}: attention width {inner} is not a multiple of the {heads} "
                     "heads of the relative-position table")
  return T5Config(vocab_size=vocab, d_model=d_model, num_layers=len(layers), num_heads=heads,
                  head_dim=inner // heads, mlp_dim=mlp_dim,
                  relative_attention_num_buckets=buckets,
                  relative_attention_max_distance=max_distance, layer_norm_epsilon=epsilon,
                  dtype=dtype)


def param_shardings(config: T5Config, mesh, rules=axes.DEFAULT_RULES):
  """NamedShardings of the params from their logical axes (dims a mesh axis doesn't
  divide are replicated)."""
  return mesh_lib.logical_sharding(abstract_params(config), mesh, rules)


def place_params(tree, shardings=None):
  """Reads a tree of (lazy) arrays into float32 jax arrays, leaf by leaf.

  With shardings, each device's slice is read separately (make_array_from_callback), so
  a host reads only what its devices hold; without, arrays go to the default device.
  """

  def place(leaf, sharding=None):
    def read(index):
      return np.asarray(leaf[index], np.float32)
    if sharding is None:
      out = jnp.asarray(read(io.full_index(len(leaf.shape))))
    else:
      out = jax.make_array_from_callback(tuple(leaf.shape), sharding, read)
    if isinstance(leaf, io.LazyArray):
      leaf.release()  # one tensor's host copy at a time, not the whole model's
    return out

  if shardings is None:
    return jax.tree.map(place, tree)
  return jax.tree.map(place, tree, shardings)


def config_to_json(config: T5Config) -> str:
  fields = dataclasses.asdict(config)
  fields["dtype"] = np.dtype(fields["dtype"]).name  # e.g. "bfloat16"
  return json.dumps(fields, indent=2)


def _tokenizer(tokenizer, path: str) -> Tokenizer:
  if isinstance(tokenizer, Tokenizer):
    return tokenizer
  if tokenizer is None:
    candidate = io.join(path, TOKENIZER_FILE)
    if not (io.isdir(path) and io.exists(candidate)):
      return Tokenizer()  # T5's own vocabulary, packaged with imagen_jax
    tokenizer = candidate
  tokenizer = os.fspath(tokenizer)
  if io.is_remote(tokenizer):  # SentencePiece reads local files only
    local = os.path.join(tempfile.mkdtemp(), TOKENIZER_FILE)
    io.copy(tokenizer, local)
    tokenizer = local
  return Tokenizer(tokenizer)


class PretrainedT5Encoder:
  """A frozen T5 encoder with its weights and tokenizer: prompts -> (embeddings, mask).

  `module` and `params` are what the rest of the package uses (`module.apply({'params':
  params}, ids, mask)`); `encode` is the convenience path, compiled once per shape.
  """

  def __init__(self, config: T5Config, params, tokenizer: Tokenizer | None = None, *,
               mesh=None, rules=axes.DEFAULT_RULES, source: str | None = None):
    self.config = config
    self.tokenizer = tokenizer or Tokenizer()
    self.mesh, self.rules = mesh, tuple(rules)
    self.source = source
    self.module = T5Encoder(config)
    if mesh is not None:  # a no-op for params from from_pretrained, already in place
      params = jax.device_put(params, param_shardings(config, mesh, rules))
    self.params = params

    def forward(params, ids, mask):
      out = self.module.apply({"params": params}, ids, mask)
      # Padded positions are not features: zero them, so that a batch re-padded from
      # stored unpadded embeddings equals one encoded on the fly.
      return jnp.where(mask[..., None], out, 0.0)

    self._forward = jax.jit(forward)

  @classmethod
  def from_pretrained(cls, path, *, dtype=None, mesh=None, rules=axes.DEFAULT_RULES,
                      tokenizer: Tokenizer | str | None = None,
                      max_distance: int | None = None) -> "PretrainedT5Encoder":
    """Loads a T5X, Hugging Face or converted T5 encoder (see the module docstring).

    dtype: compute dtype (default float32, or what a converted checkpoint recorded).
    mesh, rules: place the params sharded by the logical axis rules; None: one device.
    tokenizer: a Tokenizer or SentencePiece model path; default the `spiece.model` next
      to the weights, else T5's vocabulary.
    max_distance: relative-attention max distance of a T5X checkpoint (not stored in
      it; T5 1.1 uses 128). HF and converted checkpoints record theirs.
    """
    path = os.fspath(path)
    if not io.is_remote(path):
      path = os.path.abspath(path)
    fmt = detect_format(path)
    if fmt == "converted":
      config, params = _restore_converted(path, dtype, mesh, rules, max_distance)
    else:
      config, tree = _read_foreign(path, fmt, dtype, max_distance)
      params = place_params(tree, None if mesh is None else param_shardings(config, mesh, rules))
    return cls(config, params, _tokenizer(tokenizer, path), mesh=mesh, rules=rules, source=path)

  def encode(self, prompts: Sequence[str], max_length: int):
    """(embeddings float32 jax.Array [B, L, D], mask bool np.ndarray [B, L]).

    Prompts are tokenised with EOS and padded (or truncated) to max_length; padded
    positions of the embeddings are zero.
    """
    if self.tokenizer.vocab_size > self.config.vocab_size:
      raise ValueError(
          f"The tokenizer ({self.tokenizer.model_path}) has {self.tokenizer.vocab_size} ids "
          f"but the encoder's embedding only {self.config.vocab_size} rows; pass the "
          "checkpoint's own vocabulary as tokenizer=...")
    ids, mask = self.tokenizer.encode(prompts, max_length)
    return self.encode_ids(ids, mask), mask

  def encode_ids(self, ids, mask) -> jax.Array:
    """Embeddings [B, L, D] (float32, zero where mask is False) of token ids [B, L]."""
    ids, mask = np.asarray(ids, np.int32), np.asarray(mask, bool)
    if ids.size and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
      raise ValueError(f"token ids must lie in [0, {self.config.vocab_size}); got "
                       f"[{ids.min()}, {ids.max()}]")
    if self.mesh is None:
      return self._forward(self.params, ids, mask)
    # The batch is sharded over the data axes: pad it to a multiple of their size with
    # fully masked rows (finite outputs, see T5X's -1e10 mask) and drop them after.
    batch = ids.shape[0]
    pad = -batch % mesh_lib.data_parallel_size(self.mesh, self.rules)
    ids, mask = (np.pad(x, ((0, pad), (0, 0))) for x in (ids, mask))
    sharding = mesh_lib.batch_sharding(self.mesh, self.rules)
    ids, mask = (jax.make_array_from_callback(x.shape, sharding, lambda i, x=x: x[i])
                 for x in (ids, mask))
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      out = self._forward(self.params, ids, mask)
    return out[:batch] if pad else out

  def save(self, directory: str, *, overwrite: bool = False) -> None:
    """Writes the converted format: `params/` (orbax, restorable onto any mesh),
    `t5_config.json` and the tokenizer's `spiece.model`."""
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
    directory = os.fspath(directory)
    if not io.is_remote(directory):
      directory = os.path.abspath(directory)  # orbax wants absolute paths
    if io.exists(io.join(directory, CONFIG_FILE)) and not overwrite:
      raise FileExistsError(f"{directory} already holds a converted T5 encoder; pass "
                            "overwrite=True (--overwrite) to replace it.")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(io.join(directory, PARAMS_DIR), self.params, force=overwrite)
    checkpointer.wait_until_finished()
    if jax.process_index() == 0:
      with io.open_file(io.join(directory, CONFIG_FILE), "w") as f:
        f.write(config_to_json(self.config))
      io.copy(self.tokenizer.model_path, io.join(directory, TOKENIZER_FILE))


def _read_foreign(path: str, fmt: str, dtype, max_distance):
  """(config, T5X-layout tree of lazy arrays) of a T5X or Hugging Face checkpoint."""
  dtype = jnp.float32 if dtype is None else dtype
  if fmt == "hf":
    tree, hf_config = hf_checkpoint.read_encoder(path)
    stored = hf_config.get("relative_attention_max_distance", 128)  # transformers' default
    if max_distance is not None and max_distance != stored:
      raise ValueError(f"{path}/config.json says relative_attention_max_distance={stored}, "
                       f"but max_distance={max_distance} was passed.")
    config = infer_config(tree, source=path, max_distance=stored,
                          epsilon=hf_config.get("layer_norm_epsilon", 1e-6), dtype=dtype)
    wrong = {k: (v, getattr(config, k))
             for k, v in hf_checkpoint.declared_shape(hf_config).items() if getattr(config, k) != v}
    if wrong:
      raise ValueError(f"{path}: config.json and the weights disagree "
                       f"(field: (config.json, weights)): {wrong}")
  else:
    file = t5x_checkpoint.find_checkpoint_file(path)
    tree = t5x_checkpoint.read_encoder(file)
    config = infer_config(tree, source=file, dtype=dtype,
                          max_distance=max_distance or T5X_MAX_DISTANCE)
  try:
    check_params_fit(tree, config)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from e
  return config, tree


def _restore_converted(path: str, dtype, mesh, rules, max_distance):
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  with io.open_file(io.join(path, CONFIG_FILE), "r") as f:
    fields = json.load(f)
  if dtype is not None:
    fields["dtype"] = dtype
  config = T5Config(**fields)
  if max_distance is not None and max_distance != config.relative_attention_max_distance:
    raise ValueError(f"{path}/{CONFIG_FILE} says relative_attention_max_distance="
                     f"{config.relative_attention_max_distance}, but max_distance="
                     f"{max_distance} was passed.")
  params_dir = io.join(path, PARAMS_DIR)
  if not io.exists(params_dir):
    raise FileNotFoundError(f"{path}: has {CONFIG_FILE} but no {PARAMS_DIR}/ (orbax params); "
                            f"found {io.describe_dir(path)}")
  if mesh is None:
    single = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: single, nn.meta.unbox(abstract_params(config)))
  else:
    shardings = param_shardings(config, mesh, rules)
  # A target of ShapeDtypeStructs carrying shardings: each host reads only its shards.
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, jnp.float32, sharding=s),
                        nn.meta.unbox(abstract_params(config)), shardings)
  try:
    params = ocp.StandardCheckpointer().restore(params_dir, target)
  except (ValueError, KeyError) as e:
    raise ValueError(f"{params_dir} does not hold the encoder {path}/{CONFIG_FILE} "
                     f"describes ({config}): {e}") from e
  return config, params
