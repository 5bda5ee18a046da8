"""Shared parts of the paper-sized configs (configs/imagen_*.py): variants, the T5 text
encoder, the mesh, and one stage's layout (as `stage_config` in configs/shapes.py).

Not a config itself. The stage files import it by path, so they work from any working
directory.

Variants (the argument after the colon of every configs/imagen_*.py):
  ""       the paper's sizes: T5-XXL text (4096-d), 64 / 64->256 / 256->1024 stages of
           ~2B / 600M / 400M parameters, batch 2048, bfloat16 compute, a pod mesh;
  "small"  the same structure at about a quarter of the width, T5 v1.1 base text, the
           paper's resolutions: for one accelerator host;
  "tiny"   the same structure at toy width and resolution (16 / 16->64 / 64->256 on 64
           crops) on the synthetic shapes set, float32: trains on a CPU (tests; compiling
           the step is most of the time).
"""
import ml_collections

from imagen_jax.parallel import axes

VARIANTS = ("default", "small", "tiny")

# Where T5X keeps the public T5 v1.1 checkpoints (read with tensorstore; README, Pretrained
# T5 encoders). The encoder's shape below must match the checkpoint's (checked at start-up).
T5_XXL_CHECKPOINT = "gs://t5-data/pretrained_models/t5x/t5_1_1_xxl/checkpoint_1000000"
T5_BASE_CHECKPOINT = "gs://t5-data/pretrained_models/t5x/t5_1_1_base/checkpoint_1000000"


def parse_variant(arg, file: str) -> str:
  variant = arg or "default"
  if variant not in VARIANTS:
    raise ValueError(f"{file}: unknown variant {variant!r}; use '', 'small' or 'tiny'.")
  return variant


def text_config(variant: str) -> ml_collections.ConfigDict:
  """The frozen T5 v1.1 encoder: XXL (the paper), base (small), a random toy (tiny)."""
  if variant == "tiny":
    # Seeded random weights with the real architecture (saved with the run).
    return ml_collections.ConfigDict(dict(
        checkpoint="", init_seed=0, vocab_size=32128, d_model=32, num_layers=1, num_heads=2,
        head_dim=16, mlp_dim=64, relative_attention_num_buckets=32,
        relative_attention_max_distance=128, max_length=16, dtype="float32"))
  xxl = variant == "default"
  # imagen_jax.text.T5_PRESETS["xxl"] / ["base"]; d_model is the U-Nets' text width.
  return ml_collections.ConfigDict(dict(
      checkpoint=T5_XXL_CHECKPOINT if xxl else T5_BASE_CHECKPOINT,
      init_seed=0, vocab_size=32128,
      d_model=4096 if xxl else 768, num_layers=24 if xxl else 12,
      num_heads=64 if xxl else 12, head_dim=64, mlp_dim=10240 if xxl else 2048,
      relative_attention_num_buckets=32, relative_attention_max_distance=128,
      max_length=128, dtype="bfloat16"))


def stage_config(*, variant, resolution, lowres_resolution, unet, schedule, prediction,
                 optimizer, sample, train_crop=0, max_lowres_aug_t=1.0):
  """One stage; the field layout of configs/shapes.py's stage_config (train/stages.py
  reads it), plus `train_crop` and the U-Net's memory / speed switches."""
  tiny = variant == "tiny"
  c = ml_collections.ConfigDict()
  c.resolution = resolution
  c.lowres_resolution = lowres_resolution  # 0 for the base stage
  c.train_crop = train_crop  # SR: train on crops of this side; sample at `resolution`
  # A seqio task with `image` uint8 [R, R, 3] and `text_tokens`. tiny trains on the
  # synthetic shapes set; the others name a task of your image-text data, registered by
  # importing its module (seqio convention).
  c.task = f"shapes_{resolution}" if tiny else f"image_text_{resolution}"
  c.train_split = "train"
  c.unet = ml_collections.ConfigDict(dict(
      unet,
      # Memory / speed switches (imagen_jax.models.UNetConfig); none changes the params.
      remat=unet.get("remat", "none"),  # none | full | dots_saveable | dots_with_no_batch_dims_saveable
      attention_impl=unet.get("attention_impl", "einsum"),  # einsum | xla | cudnn
  ))
  c.dtype = "float32" if tiny else "bfloat16"  # U-Net compute dtype; params stay float32
  c.diffusion = ml_collections.ConfigDict(dict(
      schedule=schedule, prediction=prediction,
      cond_drop_prob=0.1,                  # the paper: text dropped 10% of the time
      max_lowres_aug_t=max_lowres_aug_t,   # SR: training aug level ~ U(0, max) (the paper: 1)
  ))
  c.optimizer = ml_collections.ConfigDict(dict(
      name="adam", learning_rate=1e-4, warmup_steps=10_000, b1=0.9, b2=0.999, eps=1e-8,
      grad_clip_norm=1.0, ema_decay=0.9999))
  c.optimizer.update(optimizer)
  c.train = ml_collections.ConfigDict(dict(
      batch_size=2048, num_steps=2_500_000, log_every=100, checkpoint_every=5000,
      keep_checkpoints=2, sample_every=20_000, num_sample_images=16,
      max_consecutive_nonfinite=10, log_example_keys=False))
  c.sample = ml_collections.ConfigDict(dict(
      sampler="dpm++2m", time_grid="uniform_t", steps=50, guidance_weight=5.0,
      thresholding="dynamic", percentile=99.5, eta=0.0,
      lowres_aug_t=0.2,  # SR: fixed aug level at sampling (the paper sweeps 0.0-0.3)
  ))
  c.sample.update(sample)
  if variant == "small":
    c.train.update(batch_size=64, num_steps=500_000, checkpoint_every=2000, sample_every=5000)
    c.optimizer.warmup_steps = 2000
  if tiny:
    c.train.update(batch_size=8, num_steps=4, log_every=2, checkpoint_every=2, sample_every=4,
                   num_sample_images=4)
    c.optimizer.update(learning_rate=1e-3, warmup_steps=2)
    c.sample.update(steps=4, guidance_weight=3.0)
  return c


def cascade_config(variant: str, stages: dict) -> ml_collections.ConfigDict:
  """A config over `stages` ({name: stage ConfigDict}, in cascade order)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data_dir = ""  # TFDS data dir of the shapes set (tiny); "" = ~/.cache/imagen_jax/tfds
  c.shapes = ml_collections.ConfigDict(dict(train_size=256, validation_size=32,
                                            held_out_size=32))
  c.text = text_config(variant)
  # The paper trained the base model on 256 TPU-v4 chips and each SR model on 128. Batch
  # over all of them; params, optimizer state and EMA sharded 8 ways (`fsdp`).
  # `python -m imagen_jax.summarize --config=... --num_devices=256` shows the per-device
  # memory of a mesh that is not present.
  c.mesh = ml_collections.ConfigDict(
      {"data": -1, "fsdp": 8 if variant == "default" else 1, "tensor": 1})
  c.axis_rules = [list(rule) for rule in axes.DEFAULT_RULES]
  c.stage_order = tuple(stages)
  c.stages = ml_collections.ConfigDict(stages)
  return c


def multislice(config, num_slices: int) -> ml_collections.ConfigDict:
  """`config` (any cascade config) trained over `num_slices` TPU slices (BUILD_TPU.md,
  Multi-slice): config.mesh gains a `slice` axis of that size, whose devices are grouped by
  TPU slice, and the batch rule of config.axis_rules shards the batch over it first
  (batch -> slice, data, fsdp), nothing else. config.mesh's other axes then lay out one
  slice ({"data": -1, "fsdp": 8} = each slice's chips as data x 8-way FSDP): fsdp and
  tensor stay inside a slice, and only the gradient all-reduce crosses the data-center
  network. num_slices=1 gives the single-slice mesh and layout, with a size-1 slice axis."""
  if not isinstance(num_slices, int) or num_slices < 1:
    raise ValueError(f"multislice: num_slices={num_slices!r} must be a positive int.")
  config.mesh = ml_collections.ConfigDict(dict(config.mesh, slice=num_slices))
  config.axis_rules = [list(rule) for rule in axes.with_slices(config.axis_rules)]
  return config
