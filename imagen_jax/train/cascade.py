"""Trains a cascade (all stages in order, or one named stage) from a config."""
from __future__ import annotations

import os
import time

import jax
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from imagen_jax.data import pipeline
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.train import checkpoint as ckpt
from imagen_jax.train import stages as stages_lib
from imagen_jax.train.loop import train_stage


def train_cascade(config, workdir: str, stage: str | None = None) -> dict:
  """Validates the config, then trains the requested stages. Returns {stage: final step}."""
  t_start = time.time()
  mesh = mesh_lib.make_mesh(dict(config.mesh))
  rules = mesh_lib.rules_from_config(config.axis_rules)
  specs = stages_lib.validate(config, mesh)
  if stage is not None:
    specs = [s for s in specs if s.name == stage]
    if not specs:
      raise ValueError(f"--stage={stage!r}: the config's stages are {list(config.stage_order)}.")
  logging.info("Mesh %s over %d devices (%d hosts).", dict(mesh.shape), jax.device_count(),
               jax.process_count())

  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  text_encoder, text_params = ckpt.frozen_text_encoder(config, workdir)
  text_params = jax.device_put(text_params, NamedSharding(mesh, P()))

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
        spec, workdir=workdir, mesh=mesh, rules=rules, text_encoder=text_encoder,
        text_params=text_params, make_batches=make_batches,
        sample_batch=pipeline.first_examples(task, "validation", spec.train.num_sample_images,
                                             max_length=max_length),
        seed=config.seed, max_length=max_length)
    steps[spec.name] = int(state.step)
  logging.info("Trained %s in %.0fs.", steps, time.time() - t_start)
  return steps
