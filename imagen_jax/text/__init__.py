"""Text side of Imagen: T5's tokenizer and the frozen T5 v1.1 encoder (T5X layout)."""

from imagen_jax.text.t5 import (T5_PRESETS, T5Config, T5Encoder, check_params_fit,
                                init_params, param_count, param_logical_axes, param_shapes,
                                params_from_hf_state_dict, relative_position_bucket,
                                t5_config)
from imagen_jax.text.tokenizer import EOS_ID, PAD_ID, Tokenizer, default_model_path

__all__ = [
    "EOS_ID", "PAD_ID", "T5_PRESETS", "T5Config", "T5Encoder", "Tokenizer",
    "check_params_fit", "default_model_path", "init_params", "param_count",
    "param_logical_axes", "param_shapes", "params_from_hf_state_dict",
    "relative_position_bucket", "t5_config",
]
