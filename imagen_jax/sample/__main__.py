r"""Samples a trained cascade: python -m imagen_jax.sample --workdir=DIR --prompt="...".

Loads the run's config, its frozen text encoder and every stage's EMA weights from the
workdir, runs the cascade and writes one PNG per image (final resolution, plus each
earlier stage under stage_<name>/) and a captioned grid.

  python -m imagen_jax.sample --workdir=runs/shapes --prompt="a red circle at the top" \
      --num_per_prompt=4 --output_dir=/tmp/samples
  python -m imagen_jax.sample --workdir=runs/shapes --prompts_file=prompts.txt \
      --guidance=base=5,sr=2 --steps=base=100
"""
import os

from absl import app, flags, logging

flags.DEFINE_string("workdir", None, "Training workdir holding config.json and checkpoints.")
flags.DEFINE_multi_string("prompt", [], "A prompt (repeatable).")
flags.DEFINE_string("prompts_file", None, "A text file with one prompt per line.")
flags.DEFINE_string("output_dir", None, "Where to write PNGs; default WORKDIR/samples.")
flags.DEFINE_integer("num_per_prompt", 1, "Images per prompt.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_integer("batch_size", 32, "Images per sampler call.")
flags.DEFINE_list("stages", None, "Stages to run (a prefix of the cascade); default all.")
flags.DEFINE_list("guidance", [], "Per-stage guidance weights, e.g. base=3,sr=2.")
flags.DEFINE_list("steps", [], "Per-stage sampler steps, e.g. base=50,sr=25.")
flags.DEFINE_list("sampler", [], "Per-stage sampler (ddim|ddpm|dpm++2m|heun), e.g. base=dpm++2m.")
flags.DEFINE_list("time_grid", [], "Per-stage time grid (uniform_t|uniform_logsnr).")
flags.DEFINE_list("thresholding", [], "Per-stage thresholding (none|static|dynamic).")
flags.DEFINE_list("lowres_aug_t", [], "Per-stage SR noise-augmentation level (time t).")
FLAGS = flags.FLAGS


def _per_stage(values, field, cast):
  out = {}
  for item in values:
    if "=" not in item:
      raise app.UsageError(f"--{field} takes STAGE=VALUE items, got {item!r}.")
    name, value = item.split("=", 1)
    out.setdefault(name, {})[field] = cast(value)
  return out


def main(argv):
  del argv
  from imagen_jax.sample.cascade import Cascade  # heavy imports after flag parsing
  from imagen_jax.sample.grid import make_grid, save_images

  prompts = list(FLAGS.prompt)
  if FLAGS.prompts_file:
    with open(FLAGS.prompts_file) as f:
      prompts += [line.strip() for line in f if line.strip()]
  if not prompts:
    raise app.UsageError("Give --prompt (repeatable) or --prompts_file.")
  prompts = [p for p in prompts for _ in range(FLAGS.num_per_prompt)]

  overrides = {}
  for values, field, cast in ((FLAGS.guidance, "guidance_weight", float),
                              (FLAGS.steps, "steps", int), (FLAGS.sampler, "sampler", str),
                              (FLAGS.thresholding, "thresholding", str),
                              (FLAGS.time_grid, "time_grid", str),
                              (FLAGS.lowres_aug_t, "lowres_aug_t", float)):
    for name, kv in _per_stage(values, field, cast).items():
      overrides.setdefault(name, {}).update(kv)

  cascade = Cascade.from_workdir(FLAGS.workdir, FLAGS.stages).with_sample_settings(overrides)
  unknown = set(overrides) - {s.name for s in cascade.specs}
  if unknown:
    raise app.UsageError(f"Unknown stages {sorted(unknown)}; this cascade has "
                         f"{[s.name for s in cascade.specs]}.")
  per_stage = cascade.generate(prompts, seed=FLAGS.seed, batch_size=FLAGS.batch_size)

  output_dir = FLAGS.output_dir or os.path.join(FLAGS.workdir, "samples")
  for spec, images in zip(cascade.specs[:-1], per_stage[:-1]):
    save_images(images, os.path.join(output_dir, f"stage_{spec.name}"))
  paths = save_images(per_stage[-1], output_dir)
  make_grid(per_stage[-1], prompts).save(os.path.join(output_dir, "grid.png"))
  with open(os.path.join(output_dir, "prompts.txt"), "w") as f:
    f.writelines(f"{os.path.basename(p)}\t{prompt}\n" for p, prompt in zip(paths, prompts))
  logging.info("Wrote %d images and grid.png to %s", len(paths), output_dir)
  print(f"Wrote {len(paths)} images and grid.png to {output_dir}")


if __name__ == "__main__":
  flags.mark_flag_as_required("workdir")
  app.run(main)
