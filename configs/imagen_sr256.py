"""Imagen's 64->256 super-resolution model (~600M parameters): an Efficient U-Net.

The paper (appendix F.2, Figures A.27-A.30): blocks of 128, 256, 512 and 1024 channels with
2, 4, 8 and 8 residual blocks (parameters moved to the low resolutions), every block strided
by 2, self- and text cross-attention (8 heads, hidden width 2 x channels) only in the lowest
(1024-channel, 16x16) block, skip connections scaled by 1/sqrt(2), downsampling before a
block's residual blocks and upsampling after them; conditioned on the noise-augmented
64x64 image and its augmentation level; cosine schedule, epsilon prediction, Adam 1e-4
(b2 0.999) with 10k warmup steps, batch 2048.

Mapping onto imagen_jax.models.UNet (efficient=True): the first block's stride is a 2x2
space-to-depth fold (space_to_depth=2), so the four levels run at 128/64/32/16 as in the
paper. The appendix gives the 256->1024 model the same blocks, which cannot make both the
stated 600M and 400M; here the lowest level has 10 blocks (604.8M), the 1024 model fewer.

Usage:
  python -m imagen_jax.train --config=configs/imagen_sr256.py --workdir=DIR
  python -m imagen_jax.summarize --config=configs/imagen_sr256.py --num_devices=128
Variants: "" (paper), "small", "tiny" (configs/imagen_common.py).
"""
from imagen_jax.config_files import load_sibling


def _load(name):
  return load_sibling(__file__, name)


def efficient_unet(variant: str, num_res_blocks: dict, self_attention: bool) -> dict:
  """The SR stages' Efficient U-Net (shared with configs/imagen_sr1024.py)."""
  width = {"default": 128, "small": 32, "tiny": 8}[variant]
  lowest = 8 * width
  return dict(
      base_channels=width, channel_mults=(1, 2, 4, 8), num_res_blocks=num_res_blocks[variant],
      self_attn_levels=(3,) if self_attention else (), cross_attn_levels=(3,),
      # 8 heads over a hidden width of 2 x channels (Figure A.28).
      attn_heads=8, attn_head_dim=2 * lowest // 8,
      cond_dim=4 * width, num_groups=8 if variant == "tiny" else 32, dropout=0.0,
      space_to_depth=2, efficient=True)


def unet(variant: str) -> dict:
  return efficient_unet(
      variant, {"default": (2, 4, 8, 10), "small": (2, 4, 8, 10), "tiny": (1, 1, 2, 3)},
      self_attention=True)


def stage(variant: str):
  common = _load("imagen_common")
  tiny = variant == "tiny"
  return common.stage_config(
      variant=variant, resolution=64 if tiny else 256, lowres_resolution=16 if tiny else 64,
      unet=unet(variant), schedule="cosine", prediction="eps", optimizer=dict(name="adam"),
      sample=dict(guidance_weight=8.0, steps=32))  # the paper's COCO FID-30K weight


def get_config(arg=None):
  common = _load("imagen_common")
  variant = common.parse_variant(arg, "configs/imagen_sr256.py")
  return common.cascade_config(variant, {"sr256": stage(variant)})
