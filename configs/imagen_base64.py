"""Imagen's 64x64 base model (~2B parameters), text-conditioned on frozen T5-XXL.

The paper (Saharia et al. 2022, appendix F.1): the improved-DDPM / ADM 64x64 U-Net made
wider: width 512, channel multipliers (1, 2, 3, 4), 3 residual blocks per level,
self-attention and text cross-attention at 32, 16 and 8 (levels 1-3), 64 channels per
attention head, scale-shift (FiLM) conditioning, attention-pooled text added to the time
embedding, no dropout; cosine schedule, epsilon prediction, Adafactor (optax defaults) at
1e-4 with 10k warmup steps, batch 2048, 2.5M steps. The conditioning width is not given;
cond_dim = 2 x width (1024) puts the model at 2.03B (4 x width, ADM's choice, gives 2.20B).
Our down/upsampling are single convs, not BigGAN residual blocks.

Usage:
  python -m imagen_jax.train --config=configs/imagen_base64.py --workdir=DIR
  python -m imagen_jax.summarize --config=configs/imagen_base64.py --num_devices=256
Variants: "" (paper), "small", "tiny" (configs/imagen_common.py).
"""
from imagen_jax.config_files import load_sibling


def _load(name):
  return load_sibling(__file__, name)


def unet(variant: str) -> dict:
  width = {"default": 512, "small": 128, "tiny": 8}[variant]
  return dict(
      base_channels=width, channel_mults=(1, 2, 3, 4), num_res_blocks=1 if variant == "tiny" else 3,
      self_attn_levels=(1, 2, 3), cross_attn_levels=(1, 2, 3),
      attn_head_channels={"default": 64, "small": 64, "tiny": 8}[variant],
      cond_dim=2 * width, num_groups=8 if variant == "tiny" else 32, dropout=0.0,
      space_to_depth=1, efficient=False)


def stage(variant: str):
  common = _load("imagen_common")
  return common.stage_config(
      variant=variant, resolution=16 if variant == "tiny" else 64, lowres_resolution=0,
      unet=unet(variant), schedule="cosine", prediction="eps",
      optimizer=dict(name="adafactor"),
      # The paper's COCO FID-30K setting; larger weights (5-10) for prompts like DrawBench's.
      sample=dict(guidance_weight=1.35))


def get_config(arg=None):
  common = _load("imagen_common")
  variant = common.parse_variant(arg, "configs/imagen_base64.py")
  return common.cascade_config(variant, {"base": stage(variant)})
