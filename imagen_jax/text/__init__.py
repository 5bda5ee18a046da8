"""Text side of Imagen: T5's tokenizer and the frozen T5 v1.1 encoder (T5X layout).

`T5Encoder.from_pretrained(path, dtype=..., mesh=...)` loads T5X, Hugging Face or
converted checkpoints into a `PretrainedT5Encoder` (see `pretrained.py`).
"""

from imagen_jax.text.pretrained import PretrainedT5Encoder
from imagen_jax.text.t5 import (T5_PRESETS, T5Config, T5Encoder, abstract_params,
                                check_params_fit, init_params, param_count,
                                param_logical_axes, param_shapes, params_from_hf_state_dict,
                                relative_position_bucket, t5_config)
from imagen_jax.text.tokenizer import EOS_ID, PAD_ID, Tokenizer, default_model_path

__all__ = [
    "EOS_ID", "PAD_ID", "PretrainedT5Encoder", "T5_PRESETS", "T5Config", "T5Encoder",
    "Tokenizer", "abstract_params", "check_params_fit", "default_model_path", "init_params",
    "param_count", "param_logical_axes", "param_shapes", "params_from_hf_state_dict",
    "relative_position_bucket", "t5_config",
]
