"""The whole Imagen cascade: T5-XXL -> 64x64 base (2B) -> 64->256 (600M) -> 256->1024 (400M).

The stages are configs/imagen_base64.py, imagen_sr256.py and imagen_sr1024.py (their
docstrings cite the paper); this file chains them behind one text encoder (the T5 v1.1
XXL checkpoint at config.text.checkpoint). The paper trains each stage on its own, in
parallel: one pod job per stage with --stage=base|sr256|sr1024; sampling chains them.

Usage:
  python -m imagen_jax.train --config=configs/imagen_cascade.py --workdir=DIR --stage=sr256
  python -m imagen_jax.summarize --config=configs/imagen_cascade.py --num_devices=256
  python -m imagen_jax.train --config=configs/imagen_cascade.py:tiny --workdir=/tmp/t  # CPU
Variants: "" (paper), "small", "tiny" (configs/imagen_common.py).
"""
from imagen_jax.config_files import load_sibling


def _load(name):
  return load_sibling(__file__, name)


def get_config(arg=None):
  common = _load("imagen_common")
  variant = common.parse_variant(arg, "configs/imagen_cascade.py")
  return common.cascade_config(variant, {
      "base": _load("imagen_base64").stage(variant),
      "sr256": _load("imagen_sr256").stage(variant),
      "sr1024": _load("imagen_sr1024").stage(variant),
  })
