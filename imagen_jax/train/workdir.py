"""What every training run sets up before its first stage (free of tensorflow imports)."""
from __future__ import annotations

import dataclasses
import os

import jax
from absl import logging
from jax.sharding import Mesh

from imagen_jax.parallel import distributed
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.text import T5Encoder
from imagen_jax.train import checkpoint as ckpt
from imagen_jax.train import paths
from imagen_jax.train import stages as stages_lib


@dataclasses.dataclass
class Run:
  mesh: Mesh
  rules: tuple
  specs: list            # StageSpecs in training order
  text_encoder: T5Encoder
  text_params: object    # sharded over the mesh by the logical axis rules


def prepare_run(config, workdir: str) -> Run:
  """Builds the mesh, validates the config (before anything compiles), writes config.json
  and restores or creates the frozen text encoder of the workdir."""
  mesh = mesh_lib.make_mesh(dict(config.mesh))
  rules = mesh_lib.rules_from_config(config.axis_rules)
  specs = stages_lib.validate(config, mesh)
  logging.info("Mesh %s over %d devices (%d hosts).", dict(mesh.shape), jax.device_count(),
               jax.process_count())
  if jax.process_index() == 0:  # a local disk or a bucket (gs://) shared by all hosts
    paths.makedirs(workdir)
    paths.write_text(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2))
  distributed.barrier("workdir")
  # The frozen encoder is sharded by the same logical rules as the U-Nets (T5-XXL is 19 GB
  # in float32: replicated, it would fill most of each 32 GiB v4 chip).
  text_encoder, text_params = ckpt.frozen_text_encoder(config, workdir, mesh=mesh, rules=rules)
  return Run(mesh, rules, specs, text_encoder, text_params)
