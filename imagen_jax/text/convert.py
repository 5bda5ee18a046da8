r"""Converts a T5 checkpoint (T5X or Hugging Face) into an encoder-only orbax checkpoint.

  python -m imagen_jax.text.convert \
      --src=gs://t5-data/pretrained_models/t5x/t5_1_1_xxl/checkpoint_1000000 \
      --dst=gs://MY_BUCKET/t5_1_1_xxl_encoder
  python -m imagen_jax.text.convert --src=/models/t5-v1_1-xxl --dst=/ckpt/t5_xxl_encoder

Only the token embedding and the encoder are read (never the 20 GB of the XXL decoder or
the optimizer state). The output (`params/` in orbax format, `t5_config.json`,
`spiece.model`) is what `T5Encoder.from_pretrained(dst, mesh=...)` restores straight
into its shardings on a pod, each host reading only its own shards. `--mesh` spreads
the conversion itself over local devices (XXL is 19 GB in float32).
"""
from absl import app, flags

flags.DEFINE_string("src", None, "T5X checkpoint or Hugging Face model directory.")
flags.DEFINE_string("dst", None, "Output directory (local or gs://).")
flags.DEFINE_integer("max_distance", None,
                     "Relative-attention max distance of a T5X source (not stored in T5X "
                     "checkpoints; T5 1.1 uses 128).")
flags.DEFINE_string("tokenizer", None, "SentencePiece model to store with the encoder; "
                    "default: the source's spiece.model, else T5's vocabulary.")
flags.DEFINE_list("mesh", [], "Optional mesh to convert on, e.g. data=1,fsdp=-1,tensor=1.")
flags.DEFINE_bool("overwrite", False, "Replace an existing converted encoder at --dst.")
flags.mark_flags_as_required(["src", "dst"])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # Imported here so that --help answers without importing jax.
  from imagen_jax.parallel import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  from imagen_jax.text import pretrained  # pylint: disable=import-outside-toplevel
  from imagen_jax.text.t5 import param_count  # pylint: disable=import-outside-toplevel

  mesh = None
  if FLAGS.mesh:
    try:
      shape = {name: int(size) for name, size in (item.split("=") for item in FLAGS.mesh)}
    except ValueError as e:
      raise app.UsageError(f"--mesh takes AXIS=SIZE items, got {FLAGS.mesh}") from e
    mesh = mesh_lib.make_mesh(shape)
  encoder = pretrained.PretrainedT5Encoder.from_pretrained(
      FLAGS.src, mesh=mesh, tokenizer=FLAGS.tokenizer, max_distance=FLAGS.max_distance)
  encoder.save(FLAGS.dst, overwrite=FLAGS.overwrite)
  print(f"Converted {FLAGS.src} ({pretrained.detect_format(encoder.source)}) -> {FLAGS.dst}: "
        f"{param_count(encoder.config) / 1e6:.2f}M encoder params, {encoder.config}")


if __name__ == "__main__":
  app.run(main)
