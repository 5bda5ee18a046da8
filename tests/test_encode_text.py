"""Precomputed T5 embeddings: encode_text's shards, reading them back for training, bad
records, resume and multi-host sharding. Tiny shapes set (16x16) and the tiny config."""
import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys

import jax
import jax.flatten_util
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from configs import shapes as shapes_config
from imagen_jax.data import embeddings, pipeline, precompute, tasks
from imagen_jax.models import UNet
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.text import init_params
from imagen_jax.train import cascade
from imagen_jax.train import stages as stages_lib
from imagen_jax.train.loop import example_inputs
from imagen_jax.train.state import create_train_state, make_optimizer
from imagen_jax.train.step import make_train_step, text_features
from fast_compile import xla_flags
from small_configs import minimal_base

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = dict(train_size=32, validation_size=8, held_out_size=8)
NUM_SHARDS = 4
BATCH = 8  # global batch of the tiny base stage
# float32 storage: the stored embeddings equal the encoder's output up to float32 rounding
# (outputs are O(1): RMSNorm; measured max difference 1.1e-6). Not bit for bit: XLA compiles
# the encoder differently for encode_text's batch and inside the train step.
F32_ATOL = 1e-5
ROUNDING = {"bfloat16": 2.0 ** -8, "float16": 2.0 ** -11}  # relative rounding error bounds
# Loss and gradient norm of one train step on stored 16-bit embeddings vs the same batch
# encoded on the fly, relative. Measured (tiny_config's perturbed base U-Net): bfloat16
# 5.2e-6 / 3.9e-6, float16 3.8e-7 / 0; float32 storage: 8e-8 / 1.1e-7. Other captions'
# embeddings change them by 0.49% / 0.62%, 25-30x the bfloat16 bound (the test checks
# that they change them by more than 10x the bfloat16 difference).
LOSS_RTOL = {"bfloat16": 2e-4, "float16": 1e-4}


def tiny_config(data_dir):
  config = shapes_config.get_config("tiny")
  config.data_dir = data_dir
  config.shapes.update(SIZES)
  # A smaller base U-Net than the tiny config's (compile time is what this file spends),
  # still with the text pooling and cross-attention that read the embeddings.
  config.stages.base.unet.update(base_channels=8, channel_mults=(1,), self_attn_levels=(),
                                 cross_attn_levels=(0,), attn_heads=1, attn_head_dim=8,
                                 cond_dim=16)
  return config


@dataclasses.dataclass
class Setup:
  config: object
  task: object          # shapes_16 (tokens, encoded on the fly)
  encoder: object       # PretrainedT5Encoder: the config's seeded random weights
  dirs: dict            # embedding dtype -> directory of the train split's shards
  tmp: object
  cli: subprocess.Popen  # the command line on a config's stage, run beside the tests


CAPTIONS = "a red circle\n\na blue square at the top\ncat\n"
CLI_SIZES = dict(train_size=12, validation_size=4, held_out_size=4)


def start_cli(tmp):
  """python -m imagen_jax.encode_text on a training config's stage (its generated set)."""
  env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS=xla_flags())
  return subprocess.Popen(
      [sys.executable, "-m", "imagen_jax.encode_text", "--config=configs/shapes.py:tiny",
       f"--config.data_dir={tmp / 'cli_tfds'}", "--stage=base", "--split=train",
       *[f"--config.shapes.{k}={v}" for k, v in CLI_SIZES.items()],
       f"--output_dir={tmp / 'cli'}", "--embedding_dtype=float16", "--batch_size=8",
       "--num_shards=2", "--noprogress"],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  tfds.disable_progress_bar()
  tmp = tmp_path_factory.mktemp("encode_text")
  cli = start_cli(tmp)
  config = tiny_config(str(tmp / "tfds"))
  task = pipeline.register_task(config, "shapes_16")  # renders the tiny set
  builder, split = pipeline._tfds_builder_and_split(task, "train")
  encoder, description = precompute.load_encoder(config=config,
                                                 mesh=precompute.local_mesh(None))
  dirs = {}
  for dtype in ("float32", "bfloat16", "float16"):
    dirs[dtype] = str(tmp / dtype)
    precompute.encode_split(precompute.TfdsInput(builder, split), encoder, dirs[dtype],
                            split="train", max_length=config.text.max_length, batch_size=16,
                            embedding_dtype=dtype, num_shards=NUM_SHARDS,
                            encoder_description=description, progress=False)
  yield Setup(config, task, encoder, dirs, tmp, cli)
  tasks.register_shapes_task(16)  # give the standard task back its default data_dir
  if cli.poll() is None:
    cli.kill()
  cli.communicate()


def read_records(directory, split="train"):
  meta = embeddings.read_metadata(directory, split)
  return [embeddings.parse_example(r) for path in
          embeddings.shard_paths(directory, split, meta["num_shards"])
          for r in tf.data.TFRecordDataset(path).as_numpy_iterator()]


def embedding_of(record, dtype):
  values = np.frombuffer(record["embedding"], embeddings.numpy_dtype(dtype))
  return values.reshape(record["length"], record["width"])


# ---- The shards. ----

def test_shards_hold_the_input_in_order_with_unpadded_embeddings(setup):
  builder, _ = pipeline._tfds_builder_and_split(setup.task, "train")
  stored = list(builder.as_dataset(split="train", shuffle_files=False,
                                   decoders={"image": tfds.decode.SkipDecoding()})
                .as_numpy_iterator())
  records = read_records(setup.dirs["float32"])
  assert [r["key"] for r in records] == [ex["key"] for ex in stored]
  assert [r["caption"] for r in records] == [ex["caption"] for ex in stored]
  assert [r["image"] for r in records] == [ex["image"] for ex in stored]  # PNG bytes as given
  max_length = setup.config.text.max_length
  reference, mask = setup.encoder.encode([r["caption"].decode() for r in records], max_length)
  for record, ref, m in zip(records, np.asarray(reference), mask):
    assert record["width"] == setup.config.text.d_model and record["length"] == m.sum()
    # Equal up to float32 rounding: XLA compiles the encoder differently per batch shape.
    np.testing.assert_allclose(embedding_of(record, "float32"), ref[:m.sum()], rtol=0,
                               atol=F32_ATOL)
  # 16-bit copies are the float32 values rounded.
  for dtype in ("bfloat16", "float16"):
    for a, b in zip(read_records(setup.dirs[dtype]), records):
      assert a["key"] == b["key"]
      np.testing.assert_allclose(embedding_of(a, dtype).astype(np.float32),
                                 embedding_of(b, "float32"), rtol=ROUNDING[dtype], atol=F32_ATOL)

  meta = embeddings.read_metadata(setup.dirs["float32"], "train")
  assert meta["num_shards"] == NUM_SHARDS and meta["num_examples"] == SIZES["train_size"]
  assert meta["d_model"] == setup.config.text.d_model and meta["max_length"] == max_length
  assert meta["has_images"] and meta["embedding_dtype"] == "float32"
  paths = embeddings.shard_paths(setup.dirs["float32"], "train", NUM_SHARDS)
  assert [embeddings.read_json(p + ".json")["examples"] for p in paths] == [8, 8, 8, 8]
  for path in paths:  # the reader's index, stored beside each shard, is the file's
    for stored, scanned in zip(embeddings.stored_record_offsets(path),
                               pipeline._record_offsets(path)):
      np.testing.assert_array_equal(stored, scanned)


# ---- Training batches: precomputed == encoded on the fly. ----

class BaseStage:
  """The small base stage (tiny_config: one level)'s train step (encoder in the step, or skipped) and initial state,
  on one device."""

  def __init__(self, config, text_encoder):
    self.mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    rules = mesh_lib.rules_from_config(config.axis_rules)
    # tiny_config's one-level base with cross-attention: the text's way into the loss is
    # what matters here, and the tiny two-level U-Net compiles for ~3x longer.
    spec = stages_lib.stage_spec(config, "base")
    unet, optimizer = UNet(spec.unet), make_optimizer(spec.optimizer)
    state, _ = create_train_state(
        unet, example_inputs(spec, config.text.d_model, config.text.max_length), optimizer,
        rng=jax.random.key(0), mesh=self.mesh, rules=rules)
    # Zero-initialised output projections would hide the text at initialisation: move
    # every parameter off its initial value. One draw for all of them: a draw per leaf
    # compiled for ~11 s (a threefry loop each).
    @jax.jit
    def perturb(params):
      flat, unravel = jax.flatten_util.ravel_pytree(params)
      return unravel(flat + 0.1 * jax.random.normal(jax.random.key(1), flat.shape))

    with jax.set_mesh(self.mesh):
      self.state = state.replace(params=perturb(state.params))
    self.step = jax.jit(make_train_step(unet, text_encoder, spec.diffusion, optimizer,
                                        ema_decay=spec.optimizer.ema_decay,
                                        lowres_resolution=0))

  def loss(self, batch, text_params=None) -> tuple[float, float]:
    """(loss, gradient norm) of one train step on `batch`."""
    batch = {k: v for k, v in batch.items() if k != "key"}
    with jax.set_mesh(self.mesh):
      _, metrics = self.step(self.state, batch, text_params)
    return float(metrics["loss"]), float(metrics["grad_norm"])


def batches(task, keys, steps, start=0):
  stream = pipeline.train_batches(task, "train", global_batch_size=BATCH, max_length=16, seed=0,
                                  stream="base", start_step=start, keys=keys)
  return [next(stream) for _ in range(steps)]


def test_precomputed_batches_equal_on_the_fly_and_give_the_same_loss(setup):
  config, encoder = setup.config, setup.encoder
  steps = 5  # 4 batches make an epoch of 32: cross into the second
  on_the_fly = batches(setup.task, ("image", "text_tokens", "key"), steps)
  encode = jax.jit(lambda params, ids: text_features(encoder.module, params, ids))
  precomputed = {}
  for dtype, directory in setup.dirs.items():
    task = tasks.register_embeddings_task(f"test_{dtype}", directory, width=config.text.d_model,
                                          max_length=config.text.max_length, resolution=16)
    precomputed[dtype] = batches(task, embeddings.TRAIN_KEYS, steps)

  for s in range(steps):
    a, b = on_the_fly[s], precomputed["float32"][s]
    np.testing.assert_array_equal(a["key"], b["key"])
    np.testing.assert_array_equal(a["image"], b["image"])
    text, mask = (np.asarray(x) for x in encode(encoder.params, a["text_tokens"]))
    np.testing.assert_array_equal(mask, b["text_mask"])
    assert b["text_embedding"].dtype == np.float32
    np.testing.assert_allclose(b["text_embedding"], text, rtol=0, atol=F32_ATOL)
    assert not b["text_embedding"][~mask].any()  # zero-padded, as text_features pads
    for dtype in ("bfloat16", "float16"):
      c = precomputed[dtype][s]
      assert c["text_embedding"].dtype == embeddings.numpy_dtype(dtype)  # stored dtype
      np.testing.assert_array_equal(c["key"], a["key"])
      np.testing.assert_array_equal(c["text_mask"], mask)
      np.testing.assert_allclose(c["text_embedding"].astype(np.float32), text,
                                 rtol=ROUNDING[dtype], atol=F32_ATOL)

  # One train step (text_params=None: the precomputed step does not touch the encoder): the
  # stored embeddings give the loss of the same batch's embeddings encoded on the fly, by
  # the `text_features` a step on token ids calls (step.batch_text). One compiled step, not
  # two: the token path trains in tests/test_train.py and the CLI tests.
  stage = BaseStage(config, encoder.module)
  a = on_the_fly[0]
  text, mask = encode(encoder.params, a["text_tokens"])
  reference = stage.loss(dict(image=a["image"], text_embedding=np.asarray(text),
                              text_mask=np.asarray(mask)))
  losses = {}
  for dtype in setup.dirs:
    b = dict(precomputed[dtype][0])
    b["text_embedding"] = b["text_embedding"].astype(np.float32)  # what the step does first
    losses[dtype] = stage.loss(b)
  print({dtype: np.abs(np.asarray(loss) / reference - 1) for dtype, loss in losses.items()})
  np.testing.assert_allclose(losses["float32"], reference, rtol=1e-6)
  for dtype, rtol in LOSS_RTOL.items():
    np.testing.assert_allclose(losses[dtype], reference, rtol=rtol)
  # The text does reach the loss: other captions' embeddings change it far more.
  shuffled = dict(b, text_embedding=b["text_embedding"][::-1], text_mask=b["text_mask"][::-1])
  changed = np.abs(np.asarray(stage.loss(shuffled)) / reference - 1)
  print("other captions", changed)
  assert (changed > 10 * np.abs(np.asarray(losses["bfloat16"]) / reference - 1)).all()


# ---- Bad records: counted, logged, skipped, deterministically. ----

def _corrupt(record: bytes, how: str, d_model: int, max_length: int) -> bytes:
  ex = tf.train.Example.FromString(record)
  f = ex.features.feature
  length = f["length"].int64_list.value[0]
  if how == "truncated image":
    image = f["image"].bytes_list.value[0]
    f["image"].bytes_list.value[0] = image[:len(image) // 2]
  elif how == "garbage image":
    f["image"].bytes_list.value[0] = b"\x89PNG\r\n\x1a\n" + os.urandom(64)
  elif how == "wide embedding":
    f["embedding"].bytes_list.value[0] = np.ones((length, d_model + 1), np.float32).tobytes()
    f["width"].int64_list.value[0] = d_model + 1
  elif how == "wrong length":
    f["length"].int64_list.value[0] = length + 1
  elif how == "too long":
    f["length"].int64_list.value[0] = max_length + 1
    f["embedding"].bytes_list.value[0] = np.ones((max_length + 1, d_model), np.float32).tobytes()
  elif how == "nan":
    values = np.frombuffer(f["embedding"].bytes_list.value[0], np.float32).copy()
    values[3] = np.nan
    f["embedding"].bytes_list.value[0] = values.tobytes()
  return ex.SerializeToString()


CORRUPTIONS = {3: "truncated image", 4: "garbage image", 9: "wide embedding",
               17: "wrong length", 18: "too long", 31: "nan"}  # split index -> corruption


def test_bad_records_are_counted_logged_and_skipped_deterministically(setup, caplog):
  config = setup.config
  directory = str(setup.tmp / "corrupted")
  shutil.copytree(setup.dirs["float32"], directory)
  paths = embeddings.shard_paths(directory, "train", NUM_SHARDS)
  index, bad_keys = 0, set()
  for path in paths:
    records = list(tf.data.TFRecordDataset(path).as_numpy_iterator())
    with tf.io.TFRecordWriter(path) as writer:
      for record in records:
        if index in CORRUPTIONS:
          bad_keys.add(embeddings.parse_example(record)["key"])
          record = _corrupt(record, CORRUPTIONS[index], config.text.d_model,
                            config.text.max_length)
        writer.write(record)
        index += 1
  task = tasks.register_embeddings_task("test_corrupted", directory, width=config.text.d_model,
                                        max_length=config.text.max_length, resolution=16)

  # Every index reads a good record: a bad one's place goes to the next good one.
  reader = pipeline.SplitReader(task, "train")
  with caplog.at_level(logging.WARNING):
    records = reader.read(np.arange(reader.num_examples))
  keys = [embeddings.parse_example(r)["key"] for r in records]
  assert reader.num_bad == len(CORRUPTIONS) and not bad_keys & set(keys)
  assert {reader.bad[i][0].encode() for i in CORRUPTIONS} == bad_keys
  assert keys[3] == keys[4] == keys[5] and keys[31] == keys[0]  # 3, 4 -> 5; 31 -> 0
  reasons = {i: reader.bad[i][1] for i in CORRUPTIONS}
  assert "image does not decode" in reasons[3] and "image does not decode" in reasons[4]
  assert "width 65, expected 64" in reasons[9]
  assert "expected" in reasons[17] and "bytes" in reasons[17]
  assert "length 17 outside [1, 16]" in reasons[18] and "NaN" in reasons[31]
  for key in bad_keys:
    assert f"skipping bad record {key.decode()}" in caplog.text

  # Training batches never hold them, and a resumed stream equals an uninterrupted one.
  steps = 9  # two epochs and more
  full = batches(task, embeddings.TRAIN_KEYS, steps)
  for batch in full:
    assert not bad_keys & set(batch["key"])
    assert batch["text_embedding"].shape == (BATCH, 16, config.text.d_model)
    assert np.isfinite(batch["text_embedding"]).all()
  for start in (2, 6):
    for got, want in zip(batches(task, embeddings.TRAIN_KEYS, steps - start, start), full[start:]):
      for name in embeddings.TRAIN_KEYS:
        np.testing.assert_array_equal(got[name], want[name])


def test_corrupt_images_in_a_tfds_split_are_skipped(setup, caplog):
  config = tiny_config(str(setup.tmp / "tfds_corrupt"))
  config.shapes.update(train_size=8)
  task = pipeline.register_task(config, "shapes_16")
  try:
    builder, _ = pipeline._tfds_builder_and_split(task, "train")
    (path,) = [fi.filename for fi in builder.info.splits["train"].file_instructions]
    records = list(tf.data.TFRecordDataset(path).as_numpy_iterator())
    ex = tf.train.Example.FromString(records[2])
    ex.features.feature["image"].bytes_list.value[0] = b"not a png"
    bad_key = ex.features.feature["key"].bytes_list.value[0].decode()
    with tf.io.TFRecordWriter(path) as writer:
      for n, record in enumerate(records):
        writer.write(ex.SerializeToString() if n == 2 else record)
    reader = pipeline.SplitReader(task, "train")
    with caplog.at_level(logging.WARNING):
      got = list(reader.examples(tf.data.Dataset.range(8), 16).as_numpy_iterator())
    assert reader.num_bad == 1 and reader.bad[2][0] == bad_key
    assert f"skipping bad record {bad_key}" in caplog.text
    keys = [tf.train.Example.FromString(r).features.feature["key"].bytes_list.value[0]
            for r in records]  # the split's order (TFDS orders examples by a key hash)
    assert [ex["key"] for ex in got] == keys[:2] + [keys[3]] + keys[3:]  # 2 -> 3
  finally:
    pipeline.register_task(setup.config, "shapes_16")


# ---- Resume after a crash, multi-host shards. ----

def test_resume_and_hosts_write_the_same_shards(setup, monkeypatch):
  config, encoder = setup.config, setup.encoder
  builder, split = pipeline._tfds_builder_and_split(setup.task, "train")
  directory = str(setup.tmp / "two_hosts")

  def run(process_index, **kwargs):
    return precompute.encode_split(
        precompute.TfdsInput(builder, split), encoder, directory, split="train",
        max_length=config.text.max_length, batch_size=16, embedding_dtype="float32",
        num_shards=NUM_SHARDS, process_index=process_index, process_count=2, progress=False,
        encoder_description="test", **kwargs)

  stats = run(1)
  assert stats["shards_written"] == 2 and stats["examples_written"] == 16
  names = sorted(n for n in os.listdir(directory) if not n.endswith(".json"))
  assert names == [embeddings.shard_name("train", i, NUM_SHARDS) for i in (1, 3)]

  # Host 0 dies in the middle of its first shard: the shard stays a temporary file.
  calls = {"n": 0}
  serialize = embeddings.serialize_example

  def dying(**kwargs):
    calls["n"] += 1
    if calls["n"] == 5:
      raise KeyboardInterrupt("killed")
    return serialize(**kwargs)

  monkeypatch.setattr(embeddings, "serialize_example", dying)
  with pytest.raises(KeyboardInterrupt):
    run(0)
  monkeypatch.undo()
  assert not os.path.exists(os.path.join(directory, embeddings.shard_name("train", 0, NUM_SHARDS)))
  assert any(".tmp-process0" in n for n in os.listdir(directory))
  stats = run(0)  # restarted: writes shards 0 and 2 from their start
  assert stats["shards_written"] == 2 and stats["examples_written"] == 16
  stats = run(0)  # and again: nothing left to do
  assert stats["shards_written"] == 0 and stats["shards_skipped"] == 2
  assert stats["examples_in_skipped_shards"] == 16
  # Byte for byte what one process wrote.
  for i in range(NUM_SHARDS):
    name = embeddings.shard_name("train", i, NUM_SHARDS)
    with open(os.path.join(directory, name), "rb") as f, \
        open(os.path.join(setup.dirs["float32"], name), "rb") as g:
      assert f.read() == g.read()
  # A restart with other settings is refused rather than mixed in.
  with pytest.raises(ValueError, match="unfinished encoding of this split.*embedding_dtype"):
    precompute.encode_split(
        precompute.TfdsInput(builder, split), encoder, directory, split="train",
        max_length=config.text.max_length, batch_size=16, embedding_dtype="bfloat16",
        num_shards=NUM_SHARDS, progress=False)


# ---- Config: validated before compiling; training in precomputed mode. ----

def test_config_errors_name_the_field(setup):
  mesh = mesh_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  config = tiny_config(setup.config.data_dir)
  config.stages.base.embeddings_dir = str(setup.tmp / "nothing_here")
  with pytest.raises(ValueError, match=r"config\.stages\.base\.embeddings_dir=.*no 'train' "
                                       r"split.*encode_text"):
    stages_lib.validate(config, mesh)
  config.stages.base.embeddings_dir = setup.dirs["bfloat16"]
  config.text.max_length = 20
  with pytest.raises(ValueError, match=r"max_length=16, but config\.text\.max_length=20"):
    stages_lib.validate(config, mesh)
  config = tiny_config(setup.config.data_dir)
  config.stages.base.embeddings_dir = setup.dirs["bfloat16"]
  config.text.update(d_model=32)
  with pytest.raises(ValueError, match=r"width 64, but config\.text\.d_model=32"):
    stages_lib.validate(config, mesh)
  # Embeddings of another encoder (other random weights) than the run's.
  config = tiny_config(setup.config.data_dir)
  spec = dataclasses.replace(stages_lib.stage_spec(config, "base"),
                             embeddings_dir=setup.dirs["bfloat16"])
  run = type("Run", (), {})()
  run.text_encoder = setup.encoder.module
  run.text_params = init_params(setup.encoder.config, 0)
  assert cascade.check_embeddings_encoder(spec, run) < 1e-6
  run.text_params = init_params(setup.encoder.config, 1)
  with pytest.raises(ValueError, match=r"config\.stages\.base\.embeddings_dir: the embeddings "
                                       r"there were made by another T5 encoder"):
    cascade.check_embeddings_encoder(spec, run)


def test_train_base_stage_from_precomputed_embeddings(setup, tmp_path):
  # The one-level U-Net (tests/small_configs.py): what is checked is the data and the
  # encoder the run uses, not the model.
  config = minimal_base(tiny_config(setup.config.data_dir))
  config.stages.base.embeddings_dir = setup.dirs["bfloat16"]
  config.stages.base.train.update(num_steps=2, sample_every=0, log_every=1, checkpoint_every=2,
                                  log_example_keys=True)
  assert cascade.train_cascade(config, str(tmp_path), stage="base") == {"base": 2}
  with open(tmp_path / "base" / "example_keys.process_0.txt") as f:
    lines = [line.split() for line in f]
  want = [[k.decode() for k in b["key"]] for b in batches(setup.task, ("key",), 2)]
  assert [line[1:] for line in lines] == want  # the on-the-fly stream's examples
  # The run's saved encoder is what encode_text --workdir=RUN encodes with.
  saved, description = precompute.load_encoder(workdir=str(tmp_path))
  assert description == f"checkpoint {tmp_path / 'text_encoder'}"
  for a, b in zip(jax.tree.leaves(saved.params), jax.tree.leaves(setup.encoder.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_cli_encodes_a_stage_of_a_config(setup):
  stdout, stderr = setup.cli.communicate(timeout=300)
  assert setup.cli.returncode == 0, stderr[-3000:]
  assert "encode_text: 12 examples written in 2 shards" in stdout
  out = setup.tmp / "cli"
  meta = json.loads((out / "train.metadata.json").read_text())
  assert meta["has_images"] and meta["embedding_dtype"] == "float16"
  assert meta["source"].startswith("tfds imagen_shapes/r16_t12_v4_h4_s0")
  assert meta["encoder"]["source"] == "config.text random weights, init_seed 0"
  records = read_records(str(out))
  assert len(records) == 12 and all(r["image"].startswith(b"\x89PNG") for r in records)
  reference, mask = setup.encoder.encode([r["caption"].decode() for r in records], 16)
  for record, ref, m in zip(records, np.asarray(reference), mask):
    np.testing.assert_allclose(embedding_of(record, "float16").astype(np.float32), ref[:m.sum()],
                               rtol=ROUNDING["float16"], atol=F32_ATOL)


def test_caption_file_and_tfrecord_inputs(setup, tmp_path):
  config, encoder = setup.config, setup.encoder
  captions = tmp_path / "captions.txt"
  captions.write_text(CAPTIONS)

  def encode(inputs, name, **kwargs):
    stats = precompute.encode_split(inputs, encoder, str(tmp_path / name), split="train",
                                    max_length=config.text.max_length, batch_size=16,
                                    embedding_dtype="float32", progress=False, **kwargs)
    return stats, read_records(str(tmp_path / name))

  stats, records = encode(precompute.TextFileInput(str(captions)), "text", num_shards=2)
  assert stats["examples_written"] == 3 and stats["shards_written"] == 2
  assert [r["key"] for r in records] == [b"captions.txt:1", b"captions.txt:3", b"captions.txt:4"]
  assert [r["image"] for r in records] == [b"", b"", b""]
  assert not embeddings.read_metadata(str(tmp_path / "text"), "train")["has_images"]
  reference, mask = encoder.encode(["a red circle"], 16)
  np.testing.assert_allclose(embedding_of(records[0], "float32"),
                             np.asarray(reference)[0, :mask[0].sum()], rtol=0, atol=F32_ATOL)

  # TFRecords of image + caption (here: the float32 shards): one output shard per file.
  pattern = os.path.join(setup.dirs["float32"], "train.tfrecord-?????-of-?????")
  inputs = precompute.TFRecordInput(pattern)
  assert [os.path.basename(f) for f in inputs.files] == [
      embeddings.shard_name("train", i, NUM_SHARDS) for i in range(NUM_SHARDS)]  # not .json
  stats, records = encode(inputs, "tfrecords")
  assert stats["shards_written"] == NUM_SHARDS and stats["examples_written"] == 32
  for a, b in zip(records, read_records(setup.dirs["float32"])):
    assert (a["key"], a["caption"], a["image"]) == (b["key"], b["caption"], b["image"])
    np.testing.assert_array_equal(embedding_of(a, "float32"), embedding_of(b, "float32"))


def test_images_of_another_size_are_centre_cropped_and_resized():
  from imagen_jax.data import shapes_tfds
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)
  image[:, :4] = image[:, -4:] = 0  # outside the centre square: must not show
  image[:, 4:16] = 200
  out = embeddings.decode_image(tf.constant(shapes_tfds.encode_png(image)), 6).numpy()
  assert out.shape == (6, 6, 3) and out.dtype == np.uint8 and (out == 200).all()
  same = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
  np.testing.assert_array_equal(
      embeddings.decode_image(tf.constant(shapes_tfds.encode_png(same)), 6).numpy(), same)
