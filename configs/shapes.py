"""The embedded default: a tiny text-to-image cascade on the synthetic shapes set.

Two stages: a 32x32 base model and a 32->64 super-resolution model, each conditioned on
a small frozen T5 v1.1 encoder with seeded random weights (saved with the run, so that
sampling later sees the same text features). Sized for a 2-core laptop CPU and a
15-minute budget, compilation and evaluation included: the measured run took 13 min 37 s
on a quiet 2-core machine (README, Measured); a busy machine can push it past 15.

Why this layout (bench/README.md has the runs): both U-Nets fold 2x2 (base) or 4x4 (SR)
patches into channels, so they run at 16/8/4 internally, the speed a 2-core CPU affords;
a 32x32 base learns shape far faster than a 16x16 one (objects are 8 pixels across, not 4).

Usage:
  python -m imagen_jax.train --config=configs/shapes.py --workdir=runs/shapes
  python -m imagen_jax.train --config=configs/shapes.py:tiny --workdir=/tmp/t   # seconds
Variants (the argument after the colon): "" (default) and "tiny" (for tests).
"""
import ml_collections

from imagen_jax.parallel import axes


def stage_config(*, resolution, lowres_resolution, unet, steps, batch_size, learning_rate,
                 sample_steps, guidance_weight):
  c = ml_collections.ConfigDict()
  c.resolution = resolution
  c.lowres_resolution = lowres_resolution  # 0 for the base stage
  c.task = f"shapes_{resolution}"  # seqio task; registered by imagen_jax.data.tasks
  c.train_split = "train"
  # Precomputed T5 embeddings to train on (`python -m imagen_jax.encode_text --config=...
  # --stage=NAME --output_dir=DIR`); "" = encode the task's captions in the train step.
  c.embeddings_dir = ""
  c.unet = ml_collections.ConfigDict(unet)
  c.dtype = "float32"  # compute dtype of the U-Net: float32 | bfloat16
  c.diffusion = ml_collections.ConfigDict(dict(
      schedule="cosine",       # cosine | linear (log-SNR schedules)
      prediction="v",          # eps | v | x0
      cond_drop_prob=0.1,      # text dropped for classifier-free guidance
      max_lowres_aug_t=0.15,   # SR: training noise-augmentation level ~ U(0, max), as time t
  ))
  c.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=learning_rate, warmup_steps=100, b1=0.9, b2=0.99, eps=1e-8,
      grad_clip_norm=1.0, ema_decay=0.995,
      lr_schedule="constant", decay_steps=0, end_lr_fraction=0.0))  # or "cosine" to decay_steps
  c.train = ml_collections.ConfigDict(dict(
      batch_size=batch_size, num_steps=steps, log_every=50, checkpoint_every=500,
      keep_checkpoints=2, sample_every=1000, num_sample_images=16,
      max_consecutive_nonfinite=10,  # NaN/Inf updates are skipped; stop after this many in a row
      log_example_keys=False,        # debug: <stage>/example_keys.process_0.txt, a line per step
  ))
  c.sample = ml_collections.ConfigDict(dict(
      sampler="ddim",          # ddim | ddpm | dpm++2m | heun
      time_grid="uniform_t",   # uniform_t | uniform_logsnr
      steps=sample_steps, guidance_weight=guidance_weight,
      thresholding="static",   # none | static | dynamic
      percentile=99.5, eta=0.0,
      lowres_aug_t=0.1,        # SR: fixed noise-augmentation level at sampling, as time t
  ))
  return c


def get_config(arg=None):
  variant = arg or "default"
  if variant not in ("default", "tiny"):
    raise ValueError(f"configs/shapes.py: unknown variant {variant!r}; use '' or 'tiny'.")
  tiny = variant == "tiny"

  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data_dir = ""  # TFDS data dir for the generated shapes set; "" = ~/.cache/imagen_jax/tfds
  c.shapes = ml_collections.ConfigDict(dict(
      train_size=256 if tiny else 8000, validation_size=32 if tiny else 512,
      held_out_size=32 if tiny else 256))

  # A small frozen T5 v1.1 encoder with the real architecture and random weights: the
  # captions use a handful of words, so random features separate them well enough.
  c.text = ml_collections.ConfigDict(dict(
      checkpoint="",  # "" = seeded random weights (saved in WORKDIR/text_encoder)
      init_seed=0, vocab_size=32128, d_model=64 if tiny else 128, num_layers=1 if tiny else 2,
      num_heads=2 if tiny else 4, head_dim=32, mlp_dim=128 if tiny else 256,
      relative_attention_num_buckets=32, relative_attention_max_distance=128,
      max_length=16, dtype="float32"))

  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  # On a CPU: one JAX device per core, the batch sharded over them (parallel/cpu_devices.py:
  # 87 instead of 69 img/s for the base on 2 cores). 0 keeps JAX's single CPU device.
  c.cpu_devices = -1
  c.axis_rules = [list(rule) for rule in axes.DEFAULT_RULES]

  small_unet = dict(base_channels=16, channel_mults=(1, 2), num_res_blocks=1,
                    self_attn_levels=(1,), cross_attn_levels=(1,), attn_heads=2,
                    attn_head_dim=16, cond_dim=64, space_to_depth=1, efficient=False)
  c.stage_order = ("base", "sr")
  c.stages = ml_collections.ConfigDict()
  # Sized for a 2-core CPU (bench/train_step.py): base ~75 img/s, SR ~60-75 img/s at batch 32.
  c.stages.base = stage_config(
      resolution=16 if tiny else 32, lowres_resolution=0,
      unet=small_unet if tiny else dict(
          base_channels=32, channel_mults=(1, 2, 4), num_res_blocks=1,
          self_attn_levels=(2,), cross_attn_levels=(1, 2), attn_heads=4, attn_head_dim=32,
          cond_dim=128, space_to_depth=2, efficient=False),
      steps=4 if tiny else 1350, batch_size=8 if tiny else 32, learning_rate=1e-3,
      sample_steps=4 if tiny else 8, guidance_weight=3.0)
  c.stages.sr = stage_config(
      resolution=32 if tiny else 64, lowres_resolution=16 if tiny else 32,
      unet=dict(small_unet, space_to_depth=2, efficient=True) if tiny else dict(
          # 64 channels at the 16x16 level: a 4x4 patch of x_t is 48 values, and the
          # network must carry all of them (the noise) to predict v at low noise levels.
          base_channels=64, channel_mults=(1, 1, 2), num_res_blocks=(1, 1, 2),
          self_attn_levels=(), cross_attn_levels=(2,), attn_heads=4, attn_head_dim=32,
          cond_dim=128, space_to_depth=4, efficient=True, input_to_output_skip=True),
      steps=4 if tiny else 180, batch_size=8 if tiny else 32, learning_rate=1e-3,
      sample_steps=4 if tiny else 5, guidance_weight=3.0)
  if tiny:
    for stage in (c.stages.base, c.stages.sr):
      stage.train.update(log_every=2, checkpoint_every=2, sample_every=4, num_sample_images=4)
      stage.optimizer.warmup_steps = 2
  else:
    for stage in (c.stages.base, c.stages.sr):
      stage.train.update(log_every=50, checkpoint_every=500, sample_every=stage.train.num_steps)
    c.stages.sr.optimizer.warmup_steps = 50
    # No end-of-stage grid for the SR: the evaluation right after writes the cascade's
    # 64x64 samples (eval/samples.png), and the grid cost 7-65 s of the 15-minute budget.
    c.stages.sr.train.sample_every = 0
    c.stages.sr.sample.lowres_aug_t = 0.05
    # DPM-Solver++(2M) at 8 + 5 steps samples these models as well as DDIM at 20 + 10
    # (bench/README.md, session 3: alignment of the same checkpoints under both), in half
    # the evaluation time.
    for stage in (c.stages.base, c.stages.sr):
      stage.sample.sampler = "dpm++2m"

  # After the last stage: sample the validation captions and measure their alignment.
  c.eval = ml_collections.ConfigDict(dict(
      after_training=True, batch_size=8 if tiny else 80,
      num_single=8 if tiny else 128, num_multi=8 if tiny else 16, num_held_out=8 if tiny else 16))
  return c
