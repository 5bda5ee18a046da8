"""U-Net models: building blocks in `layers`, the base / SR U-Net in `unet`."""

from imagen_jax.models.unet import UNet, UNetConfig, count_params, dummy_inputs

__all__ = ["UNet", "UNetConfig", "count_params", "dummy_inputs"]
