r"""Compile time and steady-state throughput of one stage's real train step.

Runs the exact jitted step of `imagen_jax.train` (frozen T5 in the step, diffusion loss,
Adam, EMA) on random data of the stage's shapes, on the config's mesh.

  python bench/train_step.py --config=configs/shapes.py --stage=base --steps=20
  python bench/train_step.py --config=configs/shapes.py --stage=sr \
      --config.stages.sr.train.batch_size=64
Prints one JSON line: params, compile_s, step_s (median), img_per_s, img_per_s_per_device.
"""
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file("config", "configs/shapes.py", "Cascade config.")
flags.DEFINE_string("stage", "base", "Stage to measure.")
flags.DEFINE_integer("steps", 20, "Timed steps (after 2 warm-up steps).")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import flax.linen as nn
  import jax
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P

  from imagen_jax.models import UNet
  from imagen_jax.parallel import mesh as mesh_lib
  from imagen_jax.text import T5Encoder, init_params
  from imagen_jax.train import stages as stages_lib
  from imagen_jax.train.loop import example_inputs
  from imagen_jax.train.state import create_train_state, make_optimizer
  from imagen_jax.train.step import make_train_step

  config = FLAGS.config
  mesh = mesh_lib.make_mesh(dict(config.mesh))
  rules = mesh_lib.rules_from_config(config.axis_rules)
  spec = {s.name: s for s in stages_lib.validate(config, mesh)}[FLAGS.stage]
  t5 = stages_lib.t5_config(config)
  text_params = jax.device_put(init_params(t5, 0), NamedSharding(mesh, P()))
  optimizer = make_optimizer(spec.optimizer)
  unet = UNet(spec.unet)
  L = config.text.max_length
  state, shardings = create_train_state(unet, example_inputs(spec, t5.d_model, L), optimizer,
                                        rng=jax.random.key(0), mesh=mesh, rules=rules)
  step_fn = make_train_step(unet, T5Encoder(t5), spec.diffusion, optimizer,
                            ema_decay=spec.optimizer.ema_decay,
                            lowres_resolution=spec.lowres_resolution)
  b, r = spec.train.batch_size, spec.resolution
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 256, (b, r, r, 3), dtype=np.uint8),
           "text_tokens": np.concatenate([rng.integers(2, 32000, (b, L - 4)),
                                          np.ones((b, 1)), np.zeros((b, 3))], 1).astype(np.int32)}
  batch = mesh_lib.host_to_global(batch, mesh, rules)
  t0 = time.time()
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    compiled = jax.jit(step_fn, in_shardings=(shardings, mesh_lib.batch_sharding(mesh, rules), None),
                       out_shardings=(shardings, None), donate_argnums=(0,)).lower(
                           state, batch, text_params).compile()
  compile_s = time.time() - t0
  times = []
  for i in range(FLAGS.steps + 2):
    t0 = time.time()
    state, metrics = compiled(state, batch, text_params)
    jax.block_until_ready(metrics)
    if i >= 2:
      times.append(time.time() - t0)
  step_s = statistics.median(times)
  print(json.dumps(dict(
      stage=spec.name, resolution=r, batch=b, device=str(jax.devices()[0].device_kind),
      num_devices=jax.device_count(),
      params_m=round(sum(x.size for x in jax.tree.leaves(state.params)) / 1e6, 3),
      compile_s=round(compile_s, 1), step_s=round(step_s, 4), img_per_s=round(b / step_s, 1),
      img_per_s_per_device=round(b / step_s / jax.device_count(), 1))))


if __name__ == "__main__":
  app.run(main)
