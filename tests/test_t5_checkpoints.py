"""Loading real T5 checkpoints: T5X (inline and zarr leaves), Hugging Face (safetensors,
sharded, .bin), our converted orbax format, the conversion CLI, sharded placement.

References are independent of the loader: the real T5X checkpoint written by T5X itself
(../shared/data), transformers' PyTorch T5EncoderModel (fixtures written by its own
save_pretrained; the T5X -> HF mapping below is written out here, not imported), and the
closed-form parameter count of T5 v1.1 XXL.
"""
import json
import os
import shutil
import subprocess
import sys

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_t5_reference import randomize_weights
from jax.sharding import PartitionSpec as P

from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.text import (PretrainedT5Encoder, T5Config, T5Encoder, abstract_params,
                             t5_config)
from imagen_jax.text import hf_checkpoint, pretrained, t5x_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T5X_DIR = os.path.join(REPO, "..", "shared", "data", "t5x_tiny_t5_1_1")
PROMPTS = ["translate English to German: That is good.",
           "a red circle to the left of a blue square", "cat", ""]


def _t5x_target():
  if not os.path.exists(os.path.join(T5X_DIR, "checkpoint")):
    pytest.skip(f"T5X test checkpoint not found in {T5X_DIR}")
  with open(os.path.join(T5X_DIR, "checkpoint"), "rb") as f:
    return flax.serialization.msgpack_restore(f.read())["optimizer"]["target"]


def _mesh(shape=(2, 2, 2)):
  if jax.device_count() < int(np.prod(shape)):
    pytest.skip(f"needs {int(np.prod(shape))} (simulated) devices")
  return mesh_lib.make_mesh(dict(zip(("data", "fsdp", "tensor"), shape)),
                            jax.devices()[:int(np.prod(shape))])


def _padded_batch(rng, vocab, lengths, max_len):
  ids = rng.integers(2, vocab, size=(len(lengths), max_len)).astype(np.int32)
  mask = np.arange(max_len)[None, :] < np.asarray(lengths)[:, None]
  return np.where(mask, ids, 0).astype(np.int32), mask


def _scaled_error(ours, ref, mask):
  ours, ref = np.asarray(ours)[mask], np.asarray(ref)[mask]
  return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ------------------------------------------------------------- transformers reference

def _hf_config(transformers, cfg: T5Config):
  return transformers.T5Config(
      vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.head_dim, d_ff=cfg.mlp_dim,
      num_layers=cfg.num_layers, num_decoder_layers=1, num_heads=cfg.num_heads,
      relative_attention_num_buckets=cfg.relative_attention_num_buckets,
      relative_attention_max_distance=cfg.relative_attention_max_distance,
      layer_norm_epsilon=cfg.layer_norm_epsilon, feed_forward_proj="gated-gelu",
      dropout_rate=0.0, attn_implementation="eager")


def _hf_model(torch, transformers, cfg, seed, cls_name="T5EncoderModel"):
  model = getattr(transformers, cls_name)(_hf_config(transformers, cfg)).eval()
  return randomize_weights(torch, model, seed)


def _hf_encoder(torch, transformers, model, cfg):
  """A T5EncoderModel holding `model`'s encoder weights (for T5ForConditionalGeneration)."""
  if isinstance(model, transformers.T5EncoderModel):
    return model
  encoder = transformers.T5EncoderModel(_hf_config(transformers, cfg)).eval()
  state = {k: v for k, v in model.state_dict().items() if k.startswith(("shared", "encoder."))}
  encoder.load_state_dict(state, strict=False)
  return encoder


def _hf_encode(torch, model, ids, mask):
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(ids.astype(np.int64)),
                attention_mask=torch.from_numpy(mask.astype(np.int64)))
  return out.last_hidden_state.numpy()


def _t5x_to_hf(target, num_layers):
  """T5X params -> HF state dict, written independently of the loader: T5X kernels are
  [in, out], HF Linear weights [out, in]; the shared relative table goes to block 0."""
  enc = target["encoder"]
  state = {"shared.weight": target["token_embedder"]["embedding"],
           "encoder.final_layer_norm.weight": enc["encoder_norm"]["scale"],
           "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight":
               enc["relpos_bias"]["rel_embedding"].T}
  for i in range(num_layers):
    layer, prefix = enc[f"layers_{i}"], f"encoder.block.{i}.layer"
    for ours, hf in (("query", "q"), ("key", "k"), ("value", "v"), ("out", "o")):
      state[f"{prefix}.0.SelfAttention.{hf}.weight"] = layer["attention"][ours]["kernel"].T
    state[f"{prefix}.0.layer_norm.weight"] = layer["pre_attention_layer_norm"]["scale"]
    for name in ("wi_0", "wi_1", "wo"):
      state[f"{prefix}.1.DenseReluDense.{name}.weight"] = layer["mlp"][name]["kernel"].T
    state[f"{prefix}.1.layer_norm.weight"] = layer["pre_mlp_layer_norm"]["scale"]
  return state


# ------------------------------------------------------------------------ T5X format

def test_real_t5x_checkpoint_loads_and_matches_hf_both_ways(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  target = _t5x_target()
  encoder = T5Encoder.from_pretrained(T5X_DIR)
  assert isinstance(encoder, PretrainedT5Encoder)
  assert encoder.config == t5_config("tiny")  # inferred from the weights' shapes
  _assert_trees_equal(encoder.params, {"token_embedder": target["token_embedder"],
                                       "encoder": target["encoder"]})

  # The same weights in transformers, through a state dict converted here.
  model = transformers.T5EncoderModel(_hf_config(transformers, encoder.config)).eval()
  model.load_state_dict({k: torch.from_numpy(np.array(v, np.float32))
                         for k, v in _t5x_to_hf(target, 2).items()}, strict=False)
  ids, mask = encoder.tokenizer.encode(PROMPTS, max_length=16)
  ref = _hf_encode(torch, model, ids, mask)
  embeddings, mask2 = encoder.encode(PROMPTS, max_length=16)
  np.testing.assert_array_equal(mask, mask2)
  assert embeddings.shape == (4, 16, 8) and embeddings.dtype == jnp.float32
  err = _scaled_error(embeddings, ref, mask)
  print(f"T5X tiny via from_pretrained vs HF: scaled max error {err:.2e}")
  assert err <= 1e-5
  assert not np.asarray(embeddings)[~mask].any()  # padded positions are zero

  # ... and the other way: transformers writes those weights, our HF reader reads them.
  model.save_pretrained(tmp_path / "hf")
  _assert_trees_equal(T5Encoder.from_pretrained(tmp_path / "hf").params, encoder.params)


def test_t5x_paths_file_and_model_dir(tmp_path):
  _t5x_target()
  model_dir = tmp_path / "model"
  for step in ("checkpoint_10", "checkpoint_2000"):  # newest is 2000, not "10" (lexical)
    (model_dir / step).mkdir(parents=True)
  (model_dir / "checkpoint_99999").mkdir()  # an unfinished save: no msgpack yet
  shutil.copy(os.path.join(T5X_DIR, "checkpoint"), model_dir / "checkpoint_2000")
  with open(model_dir / "checkpoint_10" / "checkpoint", "wb") as f:
    f.write(b"\x80")  # an empty msgpack map: would fail if chosen
  file = str(model_dir / "checkpoint_2000" / "checkpoint")
  assert t5x_checkpoint.find_checkpoint_file(str(model_dir)) == file
  a = T5Encoder.from_pretrained(model_dir).params
  b = T5Encoder.from_pretrained(file).params
  _assert_trees_equal(a, b)


def _write_zarr_t5x(directory, target):
  """A T5X checkpoint whose kernels and embedding are zarr arrays written with
  tensorstore, as T5X writes partitioned params; norms stay inline.

  The embedding is stored as bfloat16 (dtype from the zarr metadata), the MLP kernels in
  T5X's pre-tensorstore-0.1.14 GCS form (placeholder bucket, `path` beside `kvstore`),
  and the decoder and optimizer state point at arrays that do not exist: the encoder
  must load without touching them.
  """
  ts = pytest.importorskip("tensorstore")
  directory.mkdir()

  def spec(name, shape, dtype):
    chunks = [max(1, d // 2) for d in shape]  # several chunks per array
    return {"driver": "zarr", "dtype": dtype, "kvstore": {"driver": "file", "path": name},
            "metadata": {"shape": list(shape), "chunks": chunks, "compressor":
                         {"id": "gzip", "level": 1},
                         "dtype": "bfloat16" if dtype == "bfloat16" else "<f4"}}

  def leaf(path, arr):
    keys = [p.key for p in path]
    if keys[-1] == "scale":
      return arr
    name = ".".join(["target"] + keys)
    dtype = "bfloat16" if keys[-1] == "embedding" else "float32"
    s = spec(name, arr.shape, dtype)
    store = ts.open(dict(s, kvstore={"driver": "file", "path": str(directory / name)}),
                    create=True).result()
    store.write(arr.astype(store.dtype.numpy_dtype)).result()
    if keys[-2].startswith("wi_") or keys[-2] == "wo":
      s["kvstore"] = {"driver": "gcs", "bucket": "t5x-dummy-bucket"}
      s["path"] = name
    return s

  encoder = jax.tree_util.tree_map_with_path(
      leaf, {"token_embedder": target["token_embedder"], "encoder": target["encoder"]})
  missing = spec("target.decoder.not_written", (8, 8), "float32")
  state = {"version": 3, "optimizer": {
      "target": dict(encoder, decoder={"logits_dense": {"kernel": missing}}),
      "state": {"step": np.int32(7), "param_states": {"decoder": missing}}}}
  with open(directory / "checkpoint", "wb") as f:
    f.write(flax.serialization.msgpack_serialize(state))


def test_t5x_zarr_leaves(tmp_path):
  target = _t5x_target()
  _write_zarr_t5x(tmp_path / "ckpt", target)
  tree = t5x_checkpoint.read_encoder(str(tmp_path / "ckpt" / "checkpoint"))
  assert tree["token_embedder"]["embedding"].dtype == jnp.bfloat16  # from zarr metadata
  assert isinstance(tree["encoder"]["encoder_norm"]["scale"], np.ndarray)  # inline

  encoder = T5Encoder.from_pretrained(tmp_path / "ckpt")
  assert encoder.config == t5_config("tiny")
  expected = {"token_embedder": {"embedding": np.asarray(
      target["token_embedder"]["embedding"].astype(jnp.bfloat16), np.float32)},
              "encoder": target["encoder"]}
  _assert_trees_equal(encoder.params, expected)
  # Sharded placement reads per-device slices of the zarr arrays.
  sharded = T5Encoder.from_pretrained(tmp_path / "ckpt", mesh=_mesh())
  _assert_trees_equal(sharded.params, expected)


def test_t5x_specs_point_into_the_checkpoint_directory():
  # No GCS here: check the rewritten specs of a gs:// checkpoint (bucket placeholder and
  # both spec generations) and of a local one, without opening them.
  name = "target.encoder.layers_0.mlp.wo.kernel"
  meta = {"shape": [10240, 4096], "dtype": "<f4", "chunks": [1280, 4096],
          "compressor": {"id": "gzip"}}
  new = {"driver": "zarr", "kvstore": {"driver": "gcs", "bucket": "t5x-dummy-bucket",
                                       "path": name}, "metadata": meta}
  old = {"driver": "zarr", "kvstore": {"driver": "gcs", "bucket": "t5x-dummy-bucket"},
         "path": name, "metadata": meta}
  directory = "gs://t5-data/pretrained_models/t5x/t5_1_1_xxl/checkpoint_1000000"
  for spec in (new, old):
    out = t5x_checkpoint._rewrite_spec(spec, directory, name)
    assert out["kvstore"] == {"driver": "gcs", "bucket": "t5-data", "path":
                              "pretrained_models/t5x/t5_1_1_xxl/checkpoint_1000000/" + name}
    assert "path" not in out and out["metadata"] == {"shape": [10240, 4096], "dtype": "<f4"}
  out = t5x_checkpoint._rewrite_spec(new, "/ckpt/checkpoint_5", name)
  assert out["kvstore"] == {"driver": "file", "path": "/ckpt/checkpoint_5/" + name}
  assert new["kvstore"]["driver"] == "gcs"  # the checkpoint's own tree is left as read
  with pytest.raises(ValueError, match="uint16"):
    t5x_checkpoint._rewrite_spec(dict(new, metadata=dict(meta, dtype="<u2")), directory, name)


# ---------------------------------------------------------------- Hugging Face format

def _save_bin(model, directory, shards=1):
  """pytorch_model.bin (or a sharded .bin index) plus config.json, as older
  transformers wrote them (transformers 5 writes safetensors only)."""
  import torch
  model.config.save_pretrained(directory)
  state = {k: v.contiguous() for k, v in model.state_dict().items()}
  if shards == 1:
    torch.save(state, os.path.join(directory, "pytorch_model.bin"))
    return
  keys, weight_map = sorted(state), {}
  for s in range(shards):
    name = f"pytorch_model-{s + 1:05d}-of-{shards:05d}.bin"
    part = keys[s::shards]
    torch.save({k: state[k] for k in part}, os.path.join(directory, name))
    weight_map.update({k: name for k in part})
  with open(os.path.join(directory, "pytorch_model.bin.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)


HF_CASES = {
    # Odd heads, head_dim 5 (not 64), d_model != heads * head_dim, sequences longer than
    # max_distance 8 (log buckets and the clamp); one safetensors file.
    "safetensors": (T5Config(vocab_size=64, d_model=10, num_layers=3, num_heads=3, head_dim=5,
                             mlp_dim=12, relative_attention_num_buckets=16,
                             relative_attention_max_distance=8),
                    "T5EncoderModel", "safetensors", [20, 13, 2, 17]),
    # T5ForConditionalGeneration (decoder + lm_head present), sharded safetensors.
    "sharded_safetensors": (T5Config(vocab_size=48, d_model=12, num_layers=2, num_heads=4,
                                     head_dim=6, mlp_dim=20, relative_attention_num_buckets=8,
                                     relative_attention_max_distance=6),
                            "T5ForConditionalGeneration", "sharded", [14, 3, 9]),
    # Stored in bfloat16: the dtype comes from the safetensors header.
    "bf16_safetensors": (T5Config(vocab_size=40, d_model=8, num_layers=2, num_heads=5,
                                  head_dim=4, mlp_dim=16), "T5EncoderModel", "bf16", [9, 4]),
    "bin": (T5Config(vocab_size=50, d_model=6, num_layers=2, num_heads=1, head_dim=7,
                     mlp_dim=10, relative_attention_num_buckets=12,
                     relative_attention_max_distance=5), "T5EncoderModel", "bin", [11, 6]),
    "sharded_bin": (T5Config(vocab_size=32, d_model=8, num_layers=2, num_heads=3, head_dim=2,
                             mlp_dim=8), "T5ForConditionalGeneration", "bin3", [7, 7, 1]),
}


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_hf_checkpoints_match_transformers(case, tmp_path, monkeypatch):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  cfg, cls_name, storage, lengths = HF_CASES[case]
  model = _hf_model(torch, transformers, cfg, seed=len(case), cls_name=cls_name)
  directory = str(tmp_path / case)
  if storage == "bf16":
    model = model.to(torch.bfloat16)
    model.save_pretrained(directory)
    model = model.to(torch.float32)  # the reference: same bf16-rounded values, fp32 math
  elif storage.startswith("bin"):
    _save_bin(model, directory, shards=int(storage[3:] or 1))
  else:
    model.save_pretrained(directory, max_shard_size="1KB" if storage == "sharded" else "50GB")

  opened = []
  real_open = hf_checkpoint._open_safetensors
  monkeypatch.setattr(hf_checkpoint, "_open_safetensors",
                      lambda f: opened.append(os.path.basename(f)) or real_open(f))
  encoder = T5Encoder.from_pretrained(directory)
  assert encoder.config == cfg  # layers, width, heads, head dim, MLP, vocab, buckets
  if storage == "sharded":
    with open(os.path.join(directory, "model.safetensors.index.json")) as f:
      weight_map = json.load(f)["weight_map"]
    assert any(k.startswith("decoder.") for k in weight_map)
    decoder_only = {f for f in weight_map.values()} - {
        f for k, f in weight_map.items() if hf_checkpoint.is_encoder_key(k)}
    assert decoder_only and not decoder_only & set(opened)  # decoder shards never opened

  stored = hf_checkpoint.read_encoder(directory)[0]["encoder"]["layers_0"]["mlp"]["wo"]["kernel"]
  assert stored.dtype == (jnp.bfloat16 if storage == "bf16" else np.float32)  # from the file
  # Sharded placement reads per-device slices of the (transposed, memory-mapped) weights.
  _assert_trees_equal(T5Encoder.from_pretrained(directory, mesh=_mesh()).params, encoder.params)

  ids, mask = _padded_batch(np.random.default_rng(len(case)), cfg.vocab_size, lengths,
                            max(lengths))
  ref = _hf_encode(torch, _hf_encoder(torch, transformers, model, cfg), ids, mask)
  ours = encoder.encode_ids(ids, mask)
  err = _scaled_error(ours, ref, mask)
  print(f"{case}: {cfg.num_heads}x{cfg.head_dim} heads, L={max(lengths)}: scaled error {err:.2e}")
  assert err <= 1e-5
  assert not np.asarray(ours)[~mask].any()


def test_hf_errors_name_the_path_and_what_is_missing(tmp_path):
  transformers = pytest.importorskip("transformers")
  pytest.importorskip("torch")
  cfg = T5Config(vocab_size=32, d_model=8, num_layers=1, num_heads=2, head_dim=4, mlp_dim=8)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    T5Encoder.from_pretrained(tmp_path / "nowhere")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="not a T5 checkpoint.*empty"):
    T5Encoder.from_pretrained(tmp_path / "empty")

  directory = tmp_path / "hf"
  _hf_config(transformers, cfg).save_pretrained(directory)
  with pytest.raises(FileNotFoundError, match="no Hugging Face weights.*model.safetensors"):
    T5Encoder.from_pretrained(directory)

  transformers.T5EncoderModel(_hf_config(transformers, cfg)).save_pretrained(directory)
  with open(directory / "config.json") as f:
    config = json.load(f)
  with open(directory / "config.json", "w") as f:
    json.dump(dict(config, num_heads=4, d_kv=2), f)
  with pytest.raises(ValueError, match=r"disagree.*num_heads"):
    T5Encoder.from_pretrained(directory)
  with open(directory / "config.json", "w") as f:
    json.dump(dict(config, feed_forward_proj="relu", dense_act_fn="relu"), f)
  with pytest.raises(NotImplementedError, match="gated-GELU"):
    T5Encoder.from_pretrained(directory)

  # A tokenizer larger than the embedding is refused before any id is looked up.
  with open(directory / "config.json", "w") as f:
    json.dump(config, f)
  encoder = T5Encoder.from_pretrained(directory)
  with pytest.raises(ValueError, match="tokenizer.*32100.*32 rows"):
    encoder.encode(["a prompt"], max_length=8)


# ------------------------------------------------------- converted format, CLI, sharding

def test_converted_round_trip_and_sharded_restore(tmp_path):
  _t5x_target()
  source = T5Encoder.from_pretrained(T5X_DIR, dtype=jnp.bfloat16)
  source.save(tmp_path / "enc")
  assert sorted(os.listdir(tmp_path / "enc")) == ["params", "spiece.model", "t5_config.json"]
  with pytest.raises(FileExistsError, match="overwrite"):
    source.save(tmp_path / "enc")

  restored = T5Encoder.from_pretrained(tmp_path / "enc")
  assert restored.config == source.config and restored.config.dtype == jnp.bfloat16
  _assert_trees_equal(restored.params, source.params)
  assert restored.tokenizer.model_path.endswith(os.path.join("enc", "spiece.model"))

  mesh = _mesh()
  sharded = T5Encoder.from_pretrained(tmp_path / "enc", mesh=mesh, dtype=jnp.float32)
  kernel = sharded.params["encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]
  assert kernel.sharding.spec == P("fsdp", "tensor")
  assert kernel.addressable_shards[0].data.shape == (4, 8)
  _assert_trees_equal(sharded.params, source.params)


def test_training_workdir_encoder_is_the_converted_format(tmp_path):
  # train/checkpoint.py saves the run's frozen encoder in the same layout.
  from imagen_jax.text import init_params
  from imagen_jax.train import checkpoint as train_ckpt
  cfg = t5_config("tiny", vocab_size=40)
  params = init_params(cfg, seed=3)
  train_ckpt.save_text_encoder(str(tmp_path), params, cfg)
  encoder = T5Encoder.from_pretrained(tmp_path / "text_encoder")
  assert encoder.config == cfg
  _assert_trees_equal(encoder.params, params)


def test_convert_cli_end_to_end(tmp_path):
  _t5x_target()
  dst = tmp_path / "converted"
  # On a mesh of 8 simulated devices: the params are written from their shards.
  result = subprocess.run(
      [sys.executable, "-m", "imagen_jax.text.convert", f"--src={T5X_DIR}", f"--dst={dst}",
       "--mesh=data=1,fsdp=2,tensor=4"],
      cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True,
      timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "(t5x)" in result.stdout and "d_model=8" in result.stdout, result.stdout
  with open(dst / "t5_config.json") as f:
    assert json.load(f)["num_heads"] == 4
  _assert_trees_equal(T5Encoder.from_pretrained(dst).params,
                      T5Encoder.from_pretrained(T5X_DIR).params)


def test_sharded_encoder_matches_unsharded():
  _t5x_target()
  mesh = _mesh()
  single = T5Encoder.from_pretrained(T5X_DIR)
  sharded = T5Encoder.from_pretrained(T5X_DIR, mesh=mesh)
  params = sharded.params
  assert params["token_embedder"]["embedding"].sharding.spec == P("tensor", "fsdp")
  assert params["encoder"]["layers_1"]["attention"]["query"]["kernel"].sharding.spec == \
      P("fsdp", "tensor")
  assert params["encoder"]["layers_1"]["mlp"]["wo"]["kernel"].sharding.spec == P("tensor", "fsdp")
  # 5 prompts over 4 data-parallel devices: padded to 8 rows inside, 5 returned.
  prompts = PROMPTS + ["a green triangle"]
  ref, mask = single.encode(prompts, max_length=12)
  out, mask2 = sharded.encode(prompts, max_length=12)
  np.testing.assert_array_equal(mask, mask2)
  assert out.shape == ref.shape == (5, 12, 8)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-6)


def test_xxl_param_count_and_fit_by_eval_shape():
  cfg = t5_config("xxl")
  # abstract_params is jax.eval_shape of the init: shapes only, nothing allocated.
  abstract = nn.meta.unbox(abstract_params(cfg))
  count = sum(x.size for x in jax.tree.leaves(abstract))
  # 32128 x 4096 embedding + 24 x (4 x 4096^2 attention + 3 x 4096 x 10240 MLP + 2 norms)
  # + relative table 64 x 32 + final norm: the 4.76B of Imagen's text encoder.
  assert count == 32128 * 4096 + 24 * (4 * 4096 ** 2 + 3 * 4096 * 10240 + 2 * 4096) \
      + 64 * 32 + 4096 == 4_762_310_656
  # With the T5X-style rules XXL's float32 params spread evenly over the devices: a v4-8
  # (4 chips x 32 GiB HBM, tensor=4) holds 4.4 GiB per chip; 8 devices 2.2 GiB each.
  for shape in ((1, 1, 4), (1, 2, 4)):
    shardings = pretrained.param_shardings(cfg, _mesh(shape))
    per_device = sum(4 * int(np.prod(s.shard_shape(x.shape)))
                     for s, x in zip(jax.tree.leaves(shardings), jax.tree.leaves(abstract)))
    assert per_device == pytest.approx(4 * count / np.prod(shape), rel=0.005)
  assert 4 * count / 2 ** 30 < 18  # unsharded float32 (bf16 compute): one 80 GB GPU
