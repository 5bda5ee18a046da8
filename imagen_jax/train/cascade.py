"""Trains a cascade (all stages in order, or one named stage) from a config."""
from __future__ import annotations

import time

from absl import logging

from imagen_jax.data import pipeline
from imagen_jax.train.loop import train_stage
from imagen_jax.train.workdir import prepare_run


def train_cascade(config, workdir: str, stage: str | None = None) -> dict:
  """Validates the config, then trains the requested stages. Returns {stage: final step}."""
  t_start = time.time()
  run = prepare_run(config, workdir)
  specs = run.specs
  if stage is not None:
    specs = [s for s in specs if s.name == stage]
    if not specs:
      raise ValueError(f"--stage={stage!r}: the config's stages are {list(config.stage_order)}.")

  steps = {}
  max_length = config.text.max_length
  for spec in specs:
    task = pipeline.register_task(config, spec.task)

    def make_batches(start_step, spec=spec, task=task):
      # A resumed run reshuffles from a seed folded with its start step rather than
      # replaying the order it already trained on.
      return pipeline.train_batches(task, spec.train_split,
                                    global_batch_size=spec.train.batch_size,
                                    max_length=max_length,
                                    seed=config.seed * 1_000_003 + start_step)

    state = train_stage(
        spec, workdir=workdir, mesh=run.mesh, rules=run.rules, text_encoder=run.text_encoder,
        text_params=run.text_params, make_batches=make_batches,
        sample_batch=pipeline.first_examples(task, "validation", spec.train.num_sample_images,
                                             max_length=max_length),
        seed=config.seed, max_length=max_length)
    steps[spec.name] = int(state.step)
  logging.info("Trained %s in %.0fs.", steps, time.time() - t_start)
  return steps
