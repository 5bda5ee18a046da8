"""Imagen's 256->1024 super-resolution model (~400M parameters): an Efficient U-Net with
text cross-attention but no self-attention, trained on crops, sampled at full size.

The paper (appendix F.3): the 64->256 model's Efficient U-Net without self-attention;
trained on 256x256 crops of the 1024x1024 images (64x64 -> 256x256 crops of the low-res /
high-res pair, `train_crop`), and run fully convolutionally at 1024x1024 when sampling;
linear schedule (1e-4 to 0.02 over 1000 steps), Adam 1e-4 with 10k warmup steps.

To land on the stated 400M (the appendix's blocks give the same ~500M as the 256 model),
the two lowest levels have 6 residual blocks each: (2, 4, 6, 6), 399.2M.

Usage:
  python -m imagen_jax.train --config=configs/imagen_sr1024.py --workdir=DIR
  python -m imagen_jax.summarize --config=configs/imagen_sr1024.py --num_devices=128
Variants: "" (paper), "small", "tiny" (configs/imagen_common.py).
"""
from imagen_jax.config_files import load_sibling


def _load(name):
  return load_sibling(__file__, name)


def unet(variant: str) -> dict:
  return _load("imagen_sr256").efficient_unet(
      variant, {"default": (2, 4, 6, 6), "small": (2, 4, 6, 6), "tiny": (1, 1, 2, 2)},
      self_attention=False)


def stage(variant: str):
  common = _load("imagen_common")
  tiny = variant == "tiny"
  return common.stage_config(
      variant=variant, resolution=256 if tiny else 1024, lowres_resolution=64 if tiny else 256,
      train_crop=64 if tiny else 256,
      unet=unet(variant), schedule="linear", prediction="eps", optimizer=dict(name="adam"),
      # With the linear schedule a grid uniform in log-SNR samples better (README).
      sample=dict(guidance_weight=8.0, steps=32, time_grid="uniform_logsnr"))


def get_config(arg=None):
  common = _load("imagen_common")
  variant = common.parse_variant(arg, "configs/imagen_sr1024.py")
  return common.cascade_config(variant, {"sr1024": stage(variant)})
