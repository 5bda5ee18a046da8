r"""Precomputes T5 embeddings into TFRecord shards: python -m imagen_jax.encode_text.

  # The captions (and images) a training config's stage reads, with the encoder that
  # training would use (config.text: its checkpoint, or its seeded random weights):
  python -m imagen_jax.encode_text --config=configs/shapes.py --stage=base --split=train \
      --output_dir=/data/shapes32_t5
  # Any TFDS split / TFRecords of image+caption / a text file, with a pretrained encoder:
  python -m imagen_jax.encode_text --checkpoint=gs://BUCKET/t5_1_1_xxl_encoder \
      --tfrecords='gs://BUCKET/laion/part-*.tfrecord' --max_length=128 \
      --embedding_dtype=bfloat16 --output_dir=gs://BUCKET/laion_t5xxl
  python -m imagen_jax.encode_text --workdir=runs/shapes --captions=prompts.txt \
      --output_dir=/tmp/prompts_t5

Then train from them with --config.stages.<stage>.embeddings_dir=DIR. Every host of a pod
slice runs the same command with --distributed: process p of P writes shards p, p + P, ...
and encodes on its own devices (no communication); rerunning it after a crash or
preemption skips the finished shards. Shard format and checks: imagen_jax/data/embeddings.py.
"""
from absl import app, flags, logging
from ml_collections import config_flags

from imagen_jax import host_malloc

config_flags.DEFINE_config_file(
    "config", None, "Training config: its config.text is the encoder (a checkpoint, or the "
    "seeded random weights training creates), config.text.max_length the length.",
    lock_config=True)
flags.DEFINE_string("workdir", None, "A training workdir: encode with its text_encoder/.")
flags.DEFINE_string("checkpoint", None, "A T5X / Hugging Face / converted T5 checkpoint.")
flags.DEFINE_string("output_dir", None, "Where the shards go (local or gs://).")

flags.DEFINE_string("stage", None, "With --config: read the TFDS dataset of this stage's "
                    "seqio task (generated first if it is a shapes set).")
flags.DEFINE_string("tfds", None, "A TFDS dataset name[/config][:version] to read.")
flags.DEFINE_string("data_dir", None, "TFDS data_dir for --tfds.")
flags.DEFINE_string("tfrecords", None, "Glob(s), comma-separated, of TFRecord files of "
                    "tf.train.Example with image and caption features (one shard per file).")
flags.DEFINE_string("captions", None, "A text file with one caption per line (no images).")
flags.DEFINE_string("split", "train", "Split to read (--stage, --tfds) and to write.")
flags.DEFINE_string("output_split", None, "Name of the written split (default: --split).")
flags.DEFINE_string("image_feature", "image", "Image feature of --tfds / --tfrecords inputs.")
flags.DEFINE_string("caption_feature", "caption", "Caption feature of --tfds / --tfrecords.")
flags.DEFINE_string("key_feature", "key", "Key feature (if absent: a generated key).")

flags.DEFINE_integer("max_length", None, "Tokens per caption (EOS included). Default: "
                     "config.text.max_length of --config or the workdir's config.json, else 128.")
flags.DEFINE_integer("batch_size", 256, "Captions per jitted batch (rounded up to a multiple "
                     "of the data-parallel devices).")
flags.DEFINE_enum("embedding_dtype", "bfloat16", ["bfloat16", "float16", "float32"],
                  "Storage dtype of the embeddings.")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Compute dtype of the encoder "
                  "(default: the encoder's own).")
flags.DEFINE_integer("num_shards", None, "Output shards (default: one per "
                     "--examples_per_shard examples; TFRecord inputs: one per input file).")
flags.DEFINE_integer("examples_per_shard", 10_000, "See --num_shards.")
flags.DEFINE_list("mesh", [], "Mesh over this host's devices, e.g. data=-1,fsdp=1,tensor=4 "
                  "(default: data-parallel over all of them).")
flags.DEFINE_bool("distributed", False, "Start the JAX distributed runtime to learn this "
                  "host's index and the host count (Cloud TPU VM, SLURM, Open MPI, or the "
                  "JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID variables). The "
                  "hosts never communicate otherwise.")
flags.DEFINE_integer("process_index", None, "This host's index (default: jax.process_index()); "
                     "with --process_count, independent jobs split the work without a runtime.")
flags.DEFINE_integer("process_count", None, "Hosts (default: jax.process_count()).")
flags.DEFINE_bool("progress", True, "Show a progress bar.")
FLAGS = flags.FLAGS


def _max_length():
  if FLAGS.max_length:
    return FLAGS.max_length
  if FLAGS.config is not None:
    return FLAGS.config.text.max_length
  if FLAGS.workdir:
    import json  # pylint: disable=import-outside-toplevel
    import os  # pylint: disable=import-outside-toplevel
    path = os.path.join(FLAGS.workdir, "config.json")
    if os.path.exists(path):
      with open(path) as f:
        return json.load(f)["text"]["max_length"]
  return 128


def _inputs():
  # pylint: disable=import-outside-toplevel
  from imagen_jax.data import precompute
  named = [n for n in ("stage", "tfds", "tfrecords", "captions") if getattr(FLAGS, n)]
  if len(named) != 1:
    raise app.UsageError(f"Name the input with exactly one of --stage (with --config), --tfds, "
                         f"--tfrecords, --captions (got {named or 'none'}).")
  features = dict(image_feature=FLAGS.image_feature, caption_feature=FLAGS.caption_feature,
                  key_feature=FLAGS.key_feature)
  if FLAGS.captions:
    return precompute.TextFileInput(FLAGS.captions)
  if FLAGS.tfrecords:
    return precompute.TFRecordInput(FLAGS.tfrecords, **features)
  import tensorflow_datasets as tfds
  from imagen_jax.data import pipeline, shapes_tfds  # noqa: F401  (registers imagen_shapes)
  if FLAGS.stage:
    if FLAGS.config is None:
      raise app.UsageError("--stage needs --config.")
    if FLAGS.stage not in FLAGS.config.stages:
      raise app.UsageError(f"--stage={FLAGS.stage!r}: the config's stages are "
                           f"{list(FLAGS.config.stages)}.")
    task = pipeline.register_task(FLAGS.config, FLAGS.config.stages[FLAGS.stage].task)
    builder, split = pipeline._tfds_builder_and_split(task, FLAGS.split)  # pylint: disable=protected-access
    return precompute.TfdsInput(builder, split, **features)
  builder = tfds.builder(FLAGS.tfds, data_dir=FLAGS.data_dir)
  return precompute.TfdsInput(builder, FLAGS.split, **features)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not FLAGS.output_dir:
    raise app.UsageError("--output_dir is required.")
  # Heavy imports after flag parsing, so that --help answers at once.
  # pylint: disable=import-outside-toplevel
  import jax
  import tensorflow as tf
  if FLAGS.distributed:
    jax.distributed.initialize()  # before anything touches a device
  tf.config.set_visible_devices([], "GPU")  # tf.data and TFRecords stay off JAX's GPUs
  from imagen_jax.data import precompute

  inputs = _inputs()
  mesh_shape = None
  if FLAGS.mesh:
    try:
      mesh_shape = {k: int(v) for k, v in (item.split("=") for item in FLAGS.mesh)}
    except ValueError as e:
      raise app.UsageError(f"--mesh takes AXIS=SIZE items, got {FLAGS.mesh}") from e
  encoder, description = precompute.load_encoder(
      config=FLAGS.config, workdir=FLAGS.workdir, checkpoint=FLAGS.checkpoint,
      dtype=FLAGS.dtype, mesh=precompute.local_mesh(mesh_shape))
  logging.info("Encoder: %s, %s.", description, encoder.config)
  stats = precompute.encode_split(
      inputs, encoder, FLAGS.output_dir, split=FLAGS.output_split or FLAGS.split,
      max_length=_max_length(), batch_size=FLAGS.batch_size,
      embedding_dtype=FLAGS.embedding_dtype, num_shards=FLAGS.num_shards,
      examples_per_shard=FLAGS.examples_per_shard, process_index=FLAGS.process_index,
      process_count=FLAGS.process_count, encoder_description=description,
      progress=FLAGS.progress)
  print(f"encode_text: {stats['examples_written']} examples written in "
        f"{stats['shards_written']} shards, {stats['shards_skipped']} shards already done "
        f"({stats['examples_in_skipped_shards']} examples), {stats['inputs_dropped']} inputs "
        f"dropped, {stats['seconds']:.1f} s -> {FLAGS.output_dir}")


if __name__ == "__main__":
  host_malloc.reexec()  # tcmalloc when the machine has it: see imagen_jax/host_malloc.py
  app.run(main)
