"""configs/shapes.py:tiny with smaller U-Nets, for the tests of the training loop's
mechanics (faults, resume, several hosts, the command lines) rather than of the model.

What those tests prove (exact resume, skipped NaN updates, checkpoints, several hosts equal
to one process, stages trained in order and sampled from the workdir) does not depend on
the U-Net's depth or attention layers, but the time they spend does: tracing, lowering and
loading the compiled train step of the tiny config's two-level U-Net with self- and
cross-attention takes ~9 s a process, of this one-level U-Net without attention ~2.5 s
(2-core CPU, warm compilation cache), and compiling it cold costs ~40 ms per parameter
leaf for init alone. Its convolutions still have 16 input channels, so the default rules
still shard them over `fsdp`; the text still enters through the pooled text embedding.
The model's own tests (test_unet.py, test_unet_switches.py) and the sampling paths'
(test_editing.py) keep the tiny config's U-Nets.

`ONE_LEVEL_UNET` keeps self- and cross-attention at its one level, for tests whose subject
is a train step on several meshes (test_train.py, test_multislice.py) rather than depth.
"""
MINIMAL_BASE_UNET = dict(channel_mults=(1,), self_attn_levels=(), cross_attn_levels=())
ONE_LEVEL_UNET = dict(channel_mults=(1,), num_res_blocks=1, self_attn_levels=(0,),
                      cross_attn_levels=(0,))


def minimal_base(config):
  """`config` (configs/shapes.py:tiny) with the minimal base U-Net; returns it."""
  config.stages.base.unet.update(MINIMAL_BASE_UNET)
  return config


def minimal_flags(stages=("base", "sr")):
  """`MINIMAL_BASE_UNET` in `stages` as command-line overrides of `python -m
  imagen_jax.train`."""
  return [f"--config.stages.{stage}.unet.{name}={value!r}"
          for stage in stages for name, value in MINIMAL_BASE_UNET.items()]


def minimal_base_flags():
  """`minimal_base` as command-line overrides."""
  return minimal_flags(("base",))


def one_level(config, stages=None):
  """`config` with `ONE_LEVEL_UNET` in `stages` (default: every stage); returns it."""
  for stage in stages or config.stage_order:
    config.stages[stage].unet.update(ONE_LEVEL_UNET)
  return config
