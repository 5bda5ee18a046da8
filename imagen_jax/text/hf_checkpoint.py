"""Reads the T5 encoder out of a Hugging Face model directory, without the decoder.

A directory holds `config.json` and one of `model.safetensors`,
`model.safetensors.index.json` (sharded), `pytorch_model.bin` or
`pytorch_model.bin.index.json`, written by `T5EncoderModel` or
`T5ForConditionalGeneration`. Only `shared.weight` (or `encoder.embed_tokens.weight`)
and `encoder.*` are read; `decoder.*` and `lm_head` never are, and shards holding none
of the encoder are never opened.

Layout differences from T5X: Linear weights are [out, in] (T5X kernels are [in, out]);
the relative bias is [buckets, heads] and lives in block 0 (T5X: [heads, buckets] on the
encoder).

safetensors are parsed here (8-byte header length, JSON header, raw little-endian data):
local files are memory-mapped so only the encoder's bytes are read, and BF16 becomes
ml_dtypes.bfloat16 without torch. `.bin` files need torch (torch.load with
weights_only=True, memory-mapped).
"""
from __future__ import annotations

import json
import re
import struct

import ml_dtypes
import numpy as np

from imagen_jax.text import checkpoint_io as io

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
EMBEDDING_KEYS = ("shared.weight", "encoder.embed_tokens.weight")
RELPOS_KEY = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
_BLOCK = re.compile(r"encoder\.block\.(\d+)\.")
_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
                       "BF16": ml_dtypes.bfloat16}
# What T5 v1.1's "gated-gelu" means in transformers: gelu_new is GELU's tanh approximation.
_GATED_GELU = ("gated-gelu", "gelu_new")


def is_encoder_key(key: str) -> bool:
  return key.startswith("encoder.") or key == "shared.weight"


def embedding_key(keys) -> str:
  return EMBEDDING_KEYS[0] if EMBEDDING_KEYS[0] in keys else EMBEDDING_KEYS[1]


def encoder_tree(get, num_layers: int, embed_key: str) -> dict:
  """Our (T5X) param tree from `get(hf_key)`, which returns arrays or LazyArrays."""
  encoder = {"relpos_bias": {"rel_embedding": get(RELPOS_KEY).T}}
  for i in range(num_layers):
    attn, ffn = f"encoder.block.{i}.layer.0", f"encoder.block.{i}.layer.1"
    encoder[f"layers_{i}"] = {
        "pre_attention_layer_norm": {"scale": get(f"{attn}.layer_norm.weight")},
        "attention": {ours: {"kernel": get(f"{attn}.SelfAttention.{hf}.weight").T}
                      for ours, hf in (("query", "q"), ("key", "k"), ("value", "v"),
                                       ("out", "o"))},
        "pre_mlp_layer_norm": {"scale": get(f"{ffn}.layer_norm.weight")},
        "mlp": {name: {"kernel": get(f"{ffn}.DenseReluDense.{name}.weight").T}
                for name in ("wi_0", "wi_1", "wo")},
    }
  encoder["encoder_norm"] = {"scale": get("encoder.final_layer_norm.weight")}
  return {"token_embedder": {"embedding": get(embed_key)}, "encoder": encoder}


def read_config(directory: str) -> dict:
  """config.json, checked to describe a T5 v1.1 (gated-GELU, shared relative bias) model."""
  path = io.join(directory, "config.json")
  if not io.exists(path):
    raise FileNotFoundError(f"{directory}: no config.json (a Hugging Face model directory "
                            f"has one); found {io.describe_dir(directory)}")
  with io.open_file(path, "r") as f:
    config = json.load(f)
  if config.get("model_type") not in ("t5", "mt5"):
    raise ValueError(f"{path}: model_type={config.get('model_type')!r}; only T5 v1.1 / mT5 "
                     "encoders ('t5', 'mt5') load here (UMT5 has per-layer biases).")
  act = config.get("feed_forward_proj", "relu")
  if act not in _GATED_GELU or config.get("dense_act_fn", "gelu_new") != "gelu_new":
    raise NotImplementedError(
        f"{path}: feed_forward_proj={act!r}, dense_act_fn={config.get('dense_act_fn')!r}; only "
        "T5 v1.1's gated-GELU (tanh) MLP is implemented (T5 1.0's ReLU MLP is not).")
  return config


def declared_shape(config: dict) -> dict:
  """The T5Config fields config.json states (cross-checked against the weights)."""
  names = {"vocab_size": "vocab_size", "d_model": "d_model", "num_layers": "num_layers",
           "num_heads": "num_heads", "head_dim": "d_kv", "mlp_dim": "d_ff",
           "relative_attention_num_buckets": "relative_attention_num_buckets"}
  return {ours: config[hf] for ours, hf in names.items() if hf in config}


def _weight_files(directory: str) -> list[str]:
  """The weight files that hold encoder tensors (all of them for a single-file model)."""
  for name in WEIGHT_FILES:
    path = io.join(directory, name)
    if io.exists(path):
      break
  else:
    raise FileNotFoundError(f"{directory}: no Hugging Face weights; expected one of "
                            f"{list(WEIGHT_FILES)}, found {io.describe_dir(directory)}")
  if not name.endswith(".index.json"):
    return [path]
  with io.open_file(path, "r") as f:
    weight_map = json.load(f)["weight_map"]
  return sorted({io.join(directory, file) for key, file in weight_map.items()
                 if is_encoder_key(key)})


def _open_safetensors(file: str) -> dict:
  with io.open_file(file, "rb") as f:
    (size,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(size))
  header.pop("__metadata__", None)
  start = 8 + size
  out = {}
  for key, info in header.items():
    if not is_encoder_key(key):
      continue
    if info["dtype"] not in _SAFETENSORS_DTYPES:
      raise ValueError(f"{file}: {key} has dtype {info['dtype']}; expected one of "
                       f"{sorted(_SAFETENSORS_DTYPES)}")
    dtype, shape = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]]), tuple(info["shape"])
    begin, end = info["data_offsets"]
    if end - begin != int(np.prod(shape)) * dtype.itemsize:
      raise ValueError(f"{file}: {key} has {end - begin} bytes for shape {shape} {dtype}")

    def load(begin=begin, end=end, dtype=dtype, shape=shape):
      if not io.is_remote(file):
        return np.memmap(file, dtype=dtype, mode="r", offset=start + begin, shape=shape)
      with io.open_file(file, "rb") as f:
        f.seek(start + begin)
        return np.frombuffer(f.read(end - begin), dtype).reshape(shape)

    out[key] = io.LazyArray.whole(shape, dtype, load, f"{file}:{key}")
  return out


def _open_torch(file: str) -> dict:
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(f"{file}: reading PyTorch .bin weights needs torch (pip install torch); "
                      "safetensors need nothing extra.") from e
  if io.is_remote(file):
    raise NotImplementedError(f"{file}: .bin weights are memory-mapped from local disk; copy "
                              "the directory locally (or use its safetensors files).")
  try:
    state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
  except RuntimeError:  # the pre-zip serialisation format cannot be memory-mapped
    state = torch.load(file, map_location="cpu", weights_only=True)
  dtypes = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64,
            torch.bfloat16: ml_dtypes.bfloat16}

  def to_numpy(t):
    t = t.detach()
    # numpy has no bfloat16: reinterpret the bits rather than converting the values.
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16) if t.dtype == torch.bfloat16 \
        else t.numpy()

  out = {}
  for key, t in state.items():
    if is_encoder_key(key):
      if t.dtype not in dtypes:
        raise ValueError(f"{file}: {key} has dtype {t.dtype}")
      out[key] = io.LazyArray.whole(t.shape, dtypes[t.dtype], lambda t=t: to_numpy(t),
                                    f"{file}:{key}")
  return out


def read_encoder(directory: str) -> tuple[dict, dict]:
  """(T5X-layout tree of LazyArrays, config.json) of a Hugging Face T5 directory."""
  config = read_config(directory)
  arrays = {}
  for file in _weight_files(directory):
    arrays.update(_open_safetensors(file) if file.endswith(".safetensors")
                  else _open_torch(file))
  blocks = {int(m.group(1)) for key in arrays if (m := _BLOCK.match(key))}
  if not blocks or blocks != set(range(len(blocks))):
    raise ValueError(f"{directory}: encoder blocks {sorted(blocks)} in the weights; expected "
                     "encoder.block.0 ... encoder.block.N-1")
  used = set()

  def get(key):
    if key not in arrays:
      raise ValueError(f"{directory}: the weights have no {key!r}; is this a T5 v1.1 "
                       "(gated-GELU) model?")
    used.add(key)
    return arrays[key]

  tree = encoder_tree(get, len(blocks), embedding_key(arrays))
  unused = sorted(set(arrays) - used - set(EMBEDDING_KEYS))
  if unused:
    raise ValueError(f"{directory}: encoder weights this T5 v1.1 encoder has no place for: "
                     f"{unused[:4]}{' ...' if len(unused) > 4 else ''}")
  return tree, config
