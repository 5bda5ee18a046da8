r"""Trains and evaluates the shapes cascade from in-memory data (no tensorflow needed).

The same stages, train step, loop, checkpoints, sampler and alignment checker as
`python -m imagen_jax.train --config=configs/shapes.py`, but the examples are rendered
straight into memory by `imagen_jax.data.shapes` and tokenized with our SentencePiece
tokenizer instead of going through TFDS + seqio. Use it on machines without tensorflow
(a lent GPU) to measure wall time and alignment of a config quickly:

  python bench/shapes_cascade.py --config=configs/shapes.py --workdir=/tmp/sc \
      --config.stages.base.train.num_steps=1000
Prints one JSON line with per-stage train time and the alignment report.
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from imagen_jax import host_malloc  # noqa: E402

config_flags.DEFINE_config_file("config", "configs/shapes.py", "Cascade config.")
flags.DEFINE_string("workdir", None, "Workdir (fresh for a fresh run).")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import jax
  import numpy as np

  from imagen_jax.data import shapes
  from imagen_jax.eval import shapes_alignment
  from imagen_jax.sample.cascade import Cascade
  from imagen_jax.text import Tokenizer
  from imagen_jax.train.loop import train_stage
  from imagen_jax.train.workdir import prepare_run

  config, workdir = FLAGS.config, FLAGS.workdir
  t_start = time.time()
  run = prepare_run(config, workdir)
  specs = run.specs
  tokenizer = Tokenizer()
  max_length = config.text.max_length

  def render(split, indices, resolution):
    examples = [shapes.example(0, split, int(i), resolution) for i in indices]
    tokens, _ = tokenizer.encode([e["caption"] for e in examples], max_length)
    return {"image": np.stack([e["image"] for e in examples]), "text_tokens": tokens,
            "caption": np.asarray([e["caption"] for e in examples]),
            "attributes": [e["attributes"] for e in examples]}

  times = {}
  for spec in specs:
    t0 = time.time()
    train = render("train", range(config.shapes.train_size), spec.resolution)
    logging.info("Rendered %d train examples in %.1fs", config.shapes.train_size, time.time() - t0)

    def make_batches(start_step, spec=spec, train=train):
      rng = np.random.default_rng(config.seed * 1_000_003 + start_step)
      while True:
        idx = rng.integers(0, len(train["image"]), spec.train.batch_size)
        yield {"image": train["image"][idx], "text_tokens": train["text_tokens"][idx]}

    train_stage(spec, workdir=workdir, mesh=run.mesh, rules=run.rules,
                text_encoder=run.text_encoder, text_params=run.text_params,
                make_batches=make_batches,
                sample_batch=render("validation", range(spec.train.num_sample_images),
                                    spec.resolution),
                seed=config.seed, max_length=max_length)
    times[spec.name] = round(time.time() - t0, 1)

  t0 = time.time()
  final = specs[-1].resolution
  val = [shapes.example(0, "validation", i, final) for i in range(config.shapes.validation_size)]
  singles = [e for e in val if json.loads(e["attributes"])["kind"] == "single"]
  multis = [e for e in val if json.loads(e["attributes"])["kind"] != "single"]
  held = [shapes.example(0, "held_out", i, final) for i in range(config.eval.num_held_out)]
  chosen = (singles[:config.eval.num_single] + multis[:config.eval.num_multi] + held)
  splits = (["validation"] * (len(chosen) - len(held))) + ["held_out"] * len(held)
  cascade = Cascade.from_workdir(workdir)
  per_stage = cascade.generate([e["caption"] for e in chosen], batch_size=config.eval.batch_size,
                               progress=False)
  images = per_stage[-1]
  report = shapes_alignment.report(images, [e["attributes"] for e in chosen], splits)
  report.update(train_time_s=times, eval_time_s=round(time.time() - t0, 1),
                wall_time_s=round(time.time() - t_start, 1), device=str(jax.devices()[0]),
                resolution=final)
  os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
  np.savez_compressed(os.path.join(workdir, "eval", "samples.npz"),
                      **{f"stage_{s.name}": x for s, x in zip(specs, per_stage)},
                      captions=np.asarray([e["caption"] for e in chosen]))
  print(json.dumps(report))


if __name__ == "__main__":
  host_malloc.reexec()  # tcmalloc when the machine has it: see imagen_jax/host_malloc.py
  flags.mark_flag_as_required("workdir")
  app.run(main)
