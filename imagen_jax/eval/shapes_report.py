"""Samples the shapes validation captions through a trained cascade and measures alignment.

Writes WORKDIR/eval/shapes_alignment.json (and a captioned grid of the first samples):
  {"single_object": {"colour": {"accuracy", "n"}, "shape": ..., "count": ..., "position": ...},
   "multi_object": ..., "held_out": ..., "chance": {...}, "resolution": R, "wall_time_s": s}
"""
from __future__ import annotations

import json
import os
import time

import numpy as np
from absl import logging

from imagen_jax.data import pipeline
from imagen_jax.eval import shapes_alignment
from imagen_jax.sample.cascade import Cascade
from imagen_jax.sample.grid import make_grid


def _decode(x):
  return x.decode() if isinstance(x, bytes) else str(x)


def eval_examples(config, task_name: str, *, num_single: int, num_multi: int,
                  num_held_out: int) -> tuple[list[str], list[dict], list[str]]:
  """Captions, attribute dicts and split names: the first single-object and multi-object
  validation captions, and the first held-out ones."""
  task = pipeline.register_task(config, task_name)
  max_length = config.text.max_length
  validation = pipeline.first_examples(task, "validation", config.shapes.validation_size,
                                       max_length=max_length)
  held_out = pipeline.first_examples(task, "held_out", num_held_out, max_length=max_length)
  captions, attributes, splits = [], [], []
  wanted = {"single": num_single, "multi": num_multi}
  for caption, attrs in zip(validation["caption"], validation["attributes"]):
    attrs = json.loads(_decode(attrs))
    group = "single" if attrs["kind"] == "single" else "multi"
    if wanted[group] > 0:
      wanted[group] -= 1
      captions.append(_decode(caption)), attributes.append(attrs), splits.append("validation")
  if any(wanted.values()):
    raise ValueError(f"config.shapes.validation_size={config.shapes.validation_size} is too "
                     f"small for the requested eval sizes (missing {wanted}).")
  for caption, attrs in zip(held_out["caption"], held_out["attributes"]):
    captions.append(_decode(caption))
    attributes.append(json.loads(_decode(attrs)))
    splits.append("held_out")
  return captions, attributes, splits


def evaluate_workdir(workdir: str, eval_cfg, *, wall_time_start: float | None = None,
                     seed: int = 0) -> dict:
  """Samples the eval captions with the workdir's cascade; writes and returns the report."""
  t0 = time.time()
  cascade = Cascade.from_workdir(workdir)
  final = cascade.specs[-1]
  captions, attributes, splits = eval_examples(
      cascade.config, final.task, num_single=eval_cfg.num_single, num_multi=eval_cfg.num_multi,
      num_held_out=eval_cfg.num_held_out)
  images = cascade.generate(captions, seed=seed, batch_size=eval_cfg.batch_size)[-1]
  report = shapes_alignment.report(images, attributes, splits)
  report["resolution"] = final.resolution
  report["wall_time_s"] = round(time.time() - (wall_time_start or t0), 1)
  report["eval_time_s"] = round(time.time() - t0, 1)
  report["checkpoint_steps"] = cascade.steps
  out_dir = os.path.join(workdir, "eval")
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "shapes_alignment.json"), "w") as f:
    json.dump(report, f, indent=2)
  make_grid(images[:48], captions[:48], columns=8).save(os.path.join(out_dir, "samples.png"))
  np.savez_compressed(os.path.join(out_dir, "samples.npz"), images=images,
                      captions=np.asarray(captions), splits=np.asarray(splits))
  logging.info("Wrote %s", os.path.join(out_dir, "shapes_alignment.json"))
  return report
