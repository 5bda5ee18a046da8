r"""Samples a trained cascade: python -m imagen_jax.sample --workdir=DIR --prompt="...".

Loads the run's config, its frozen text encoder and every stage's EMA weights from the
workdir, runs the cascade and writes one PNG per image (final resolution, plus each
earlier stage under stage_<name>/) and a captioned grid.

  python -m imagen_jax.sample --workdir=runs/shapes --prompt="a red circle at the top" \
      --num_per_prompt=4 --output_dir=/tmp/samples
  python -m imagen_jax.sample --workdir=runs/shapes --prompts_file=prompts.txt \
      --guidance=base=5,sr=2 --steps=base=100

Editing a user's image (the prompt describes the whole image):
  # Super-resolution through the SR stages from --from_stage on (default the first SR stage):
  python -m imagen_jax.sample --workdir=runs/shapes --init_image=small.png --upscale \
      --prompt="a red circle at the top"
  # Inpainting through the whole cascade; mask: white = keep, black = regenerate:
  python -m imagen_jax.sample --workdir=runs/shapes --init_image=photo.png --mask=mask.png \
      --prompt="a red circle at the top" --num_per_prompt=4 [--resample_steps=5]
"""
import os

from absl import app, flags, logging

from imagen_jax import host_malloc

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
flags.DEFINE_string("init_image", None, "Editing: the user's image (PNG/JPEG, square), for "
                    "--upscale or --mask.")
flags.DEFINE_bool("upscale", False, "Super-resolve --init_image through the SR stages from "
                  "--from_stage on (the image is resized to that stage's input size).")
flags.DEFINE_string("from_stage", None, "With --upscale: the first SR stage to run; default "
                    "the first SR stage of the cascade.")
flags.DEFINE_string("mask", None, "Inpaint --init_image: a mask image of the same size, "
                    "white (>= 128) = keep, black = regenerate.")
flags.DEFINE_integer("resample_steps", 1, "With --mask: RePaint resampling, each sampler "
                     "step done this many times (costs as many times the denoiser calls).")
FLAGS = flags.FLAGS


def _per_stage(values, field, cast):
  out = {}
  for item in values:
    if "=" not in item:
      raise app.UsageError(f"--{field} takes STAGE=VALUE items, got {item!r}.")
    name, value = item.split("=", 1)
    out.setdefault(name, {})[field] = cast(value)
  return out


def _load_image(path: str, mode: str):
  import numpy as np  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  with Image.open(path) as image:
    return np.asarray(image.convert(mode))


def _check_editing_flags():
  if FLAGS.upscale and not FLAGS.init_image:
    raise app.UsageError("--upscale super-resolves --init_image: give --init_image.")
  if FLAGS.mask and not FLAGS.init_image:
    raise app.UsageError("--mask inpaints --init_image: give --init_image.")
  if FLAGS.upscale and FLAGS.mask:
    raise app.UsageError("--upscale and --mask: choose one (super-resolution or inpainting).")
  if FLAGS.init_image and not (FLAGS.upscale or FLAGS.mask):
    raise app.UsageError("--init_image needs --upscale (super-resolution) or --mask "
                         "(inpainting).")
  if FLAGS.from_stage and not FLAGS.upscale:
    raise app.UsageError("--from_stage applies to --upscale.")
  if FLAGS.resample_steps != 1 and not FLAGS.mask:
    raise app.UsageError("--resample_steps applies to inpainting (--mask).")
  if FLAGS.resample_steps < 1:
    raise app.UsageError("--resample_steps must be >= 1.")


def main(argv):
  del argv
  _check_editing_flags()
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
  common = dict(seed=FLAGS.seed, batch_size=FLAGS.batch_size)
  if FLAGS.upscale:
    per_stage = cascade.upscale(_load_image(FLAGS.init_image, "RGB"), prompts,
                                from_stage=FLAGS.from_stage, **common)
  elif FLAGS.mask:
    image, mask = _load_image(FLAGS.init_image, "RGB"), _load_image(FLAGS.mask, "L")
    if mask.shape != image.shape[:2]:
      raise app.UsageError(f"--mask is {mask.shape[1]}x{mask.shape[0]} but --init_image is "
                           f"{image.shape[1]}x{image.shape[0]}; they must be the same size.")
    per_stage = cascade.inpaint(image, mask >= 128, prompts,
                                resample_steps=FLAGS.resample_steps, **common)
  else:
    per_stage = cascade.generate(prompts, **common)
  specs = cascade.specs[len(cascade.specs) - len(per_stage):]   # the stages that ran

  output_dir = FLAGS.output_dir or os.path.join(FLAGS.workdir, "samples")
  for spec, images in zip(specs[:-1], per_stage[:-1]):
    save_images(images, os.path.join(output_dir, f"stage_{spec.name}"))
  paths = save_images(per_stage[-1], output_dir)
  make_grid(per_stage[-1], prompts).save(os.path.join(output_dir, "grid.png"))
  with open(os.path.join(output_dir, "prompts.txt"), "w") as f:
    f.writelines(f"{os.path.basename(p)}\t{prompt}\n" for p, prompt in zip(paths, prompts))
  logging.info("Wrote %d images and grid.png to %s", len(paths), output_dir)
  print(f"Wrote {len(paths)} images and grid.png to {output_dir}")


if __name__ == "__main__":
  host_malloc.reexec()  # tcmalloc when the machine has it: see imagen_jax/host_malloc.py
  flags.mark_flag_as_required("workdir")
  app.run(main)
