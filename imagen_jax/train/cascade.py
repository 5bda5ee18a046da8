"""Trains a cascade (all stages in order, or one named stage) from a config."""
from __future__ import annotations

import concurrent.futures
import os
import time

import jax
from absl import logging

from imagen_jax.data import embeddings, pipeline
from imagen_jax.parallel import distributed
from imagen_jax.train import faults
from imagen_jax.train.loop import prepare_stage, train_stage
from imagen_jax.train.step import text_features
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
  data_ready = _prepare_later_data(config, specs[1:], first_task=specs[0].task)
  prepared = {}  # stage name -> Future of loop.prepare_stage, started by the stage before
  with faults.handle_sigterm():  # a SIGTERM between stages stops before the next one
    for i, spec in enumerate(specs):
      if faults.sigterm_anywhere():  # any host's SIGTERM stops every host
        raise faults.Preempted(spec.name)
      if spec.name in data_ready:
        data_ready[spec.name].result()  # re-raises a failure of the background thread
      later = specs[i + 1] if i + 1 < len(specs) else None
      steps[spec.name] = _train_one(
          config, run, spec, workdir, prepared=prepared.get(spec.name),
          on_started=lambda later=later: _prepare_next_stage(config, run, later, workdir,
                                                             prepared))
    if faults.sigterm_anywhere():  # during the last step: stop before anything else starts
      raise faults.Preempted(spec.name, steps[spec.name], steps[spec.name])
  logging.info("Trained %s in %.0fs.", steps, time.time() - t_start)
  return steps


def _prepare_later_data(config, specs, *, first_task: str) -> dict:
  """Renders the built-in datasets of later stages in a background thread (one host only),
  while the first stage compiles and trains: rendering is single-threaded Python, so on a
  small machine it would otherwise add its seconds to the run. {stage: future}.

  The first stage's set is rendered first, in this thread: two renderings at once would
  share the GIL and delay the first stage."""
  wanted = [s for s in specs if not s.embeddings_dir and s.task != first_task]
  if jax.process_count() > 1 or not wanted:
    return {}
  pipeline.prepare_data(config, first_task)
  pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="prepare_data")
  futures = {s.name: pool.submit(pipeline.prepare_data, config, s.task) for s in wanted}
  pool.shutdown(wait=False)
  return futures


def _prepare_next_stage(config, run, spec, workdir: str, prepared: dict) -> None:
  """Once a stage is training, builds the next one's initial state and compiled step in a
  background thread (one host, a fresh stage on token batches), so that the switch
  between stages costs no initialisation or compilation: those are mostly
  single-threaded, and a small machine's training step leaves a core partly idle."""
  if (spec is None or jax.process_count() > 1 or spec.embeddings_dir
      or os.path.isdir(os.path.join(workdir, spec.name, "checkpoints"))):
    return
  pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="prepare_stage")
  prepared[spec.name] = pool.submit(
      prepare_stage, spec, mesh=run.mesh, rules=run.rules, text_encoder=run.text_encoder,
      text_params=run.text_params, seed=config.seed, max_length=config.text.max_length)
  pool.shutdown(wait=False)


def _train_one(config, run, spec, workdir: str, *, prepared=None, on_started=None) -> int:
  """Trains one stage on its seqio task (or its precomputed embeddings); returns its final
  step."""
  max_length = config.text.max_length
  # Sample-grid captions in either mode. Host 0 first: it generates a missing built-in
  # dataset, which the other hosts then find in place.
  task = distributed.host0_first(lambda: pipeline.register_task(config, spec.task))
  train_task, keys = task, ("image", "text_tokens", "key")
  if spec.embeddings_dir:  # the train step reads stored embeddings and skips the encoder
    train_task, keys = pipeline.register_embeddings_task(config, spec.name), embeddings.TRAIN_KEYS
    check_embeddings_encoder(spec, run)

  def make_batches(start_step):
    # Batch s is a function of (seed, stage, s): a resumed run continues the very stream
    # an uninterrupted run trains on.
    return pipeline.train_batches(train_task, spec.train_split,
                                  global_batch_size=spec.train.batch_size,
                                  max_length=max_length, seed=config.seed, stream=spec.name,
                                  start_step=start_step, keys=keys)

  state = train_stage(
      spec, workdir=workdir, mesh=run.mesh, rules=run.rules, text_encoder=run.text_encoder,
      text_params=run.text_params, make_batches=make_batches,
      sample_batch=pipeline.first_examples(task, "validation", spec.train.num_sample_images,
                                           max_length=max_length),
      seed=config.seed, max_length=max_length, prepared=prepared, on_started=on_started)
  return int(state.step)


def check_embeddings_encoder(spec, run) -> float:
  """The stage's precomputed embeddings must come from the run's encoder (the one the
  sampler will use): its embedding of the probe caption stored with them must match.
  Returns the relative difference; raises beyond embeddings.PROBE_TOLERANCE."""
  meta = embeddings.read_metadata(spec.embeddings_dir, spec.train_split)
  encode = jax.jit(lambda params, ids: text_features(run.text_encoder, params, ids)[0])
  return embeddings.check_encoder(meta, lambda ids: encode(run.text_params, ids),
                                  field=f"config.stages.{spec.name}.embeddings_dir")
