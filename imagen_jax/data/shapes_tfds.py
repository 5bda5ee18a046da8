"""TFDS builder for the synthetic shapes set ("imagen_shapes"), generated locally.

Configs are named by what they contain, so a data_dir never mixes two datasets:
  "r32"                       32x32, default split sizes (20000 / 512 / 256), seed 0
  "r40_t1000_v64_h64_s3"      40x40, 1000 / 64 / 64 examples, seed 3
The three r16 / r32 / r64 configs are listed in BUILDER_CONFIGS; any other name of this
form is understood on request (`tfds.builder("imagen_shapes/r40_t1000_v64_h64_s3")`),
and `make_config(...)` builds the config object for given parameters.

Usage:
  builder = Shapes(config=make_config(32, train_size=2000), data_dir=DIR)
  builder.download_and_prepare()       # nothing is downloaded; examples are rendered
  ds = builder.as_dataset(split="train")
"""
import dataclasses
import re
import struct
import zlib

import numpy as np
import tensorflow_datasets as tfds

from imagen_jax.data import shapes

DEFAULT_SPLIT_SIZES = {"train": 20000, "validation": 512, "held_out": 256}
DEFAULT_SEED = 0
_NAME = re.compile(r"^r(\d+)(?:_t(\d+)_v(\d+)_h(\d+)_s(\d+))?$")


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
    resolution: int = 32
    train_size: int = DEFAULT_SPLIT_SIZES["train"]
    validation_size: int = DEFAULT_SPLIT_SIZES["validation"]
    held_out_size: int = DEFAULT_SPLIT_SIZES["held_out"]
    seed: int = DEFAULT_SEED

    @property
    def split_sizes(self):
        return {"train": self.train_size, "validation": self.validation_size,
                "held_out": self.held_out_size}


def config_name(resolution, train_size=DEFAULT_SPLIT_SIZES["train"],
                validation_size=DEFAULT_SPLIT_SIZES["validation"],
                held_out_size=DEFAULT_SPLIT_SIZES["held_out"], seed=DEFAULT_SEED):
    """The config name that encodes these parameters ("r32" for the defaults)."""
    if (train_size, validation_size, held_out_size, seed) == (
            DEFAULT_SPLIT_SIZES["train"], DEFAULT_SPLIT_SIZES["validation"],
            DEFAULT_SPLIT_SIZES["held_out"], DEFAULT_SEED):
        return f"r{resolution}"
    return f"r{resolution}_t{train_size}_v{validation_size}_h{held_out_size}_s{seed}"


# One config object per name: TFDS insists that a config passed by object is the very
# object it finds under that name.
_CONFIGS = {}


def make_config(resolution, train_size=DEFAULT_SPLIT_SIZES["train"],
                validation_size=DEFAULT_SPLIT_SIZES["validation"],
                held_out_size=DEFAULT_SPLIT_SIZES["held_out"], seed=DEFAULT_SEED):
    """The ShapesConfig for these parameters (resolution >= 16, sizes >= 1)."""
    if resolution < 16:
        raise ValueError(f"resolution must be >= 16, got {resolution}")
    if min(train_size, validation_size, held_out_size) < 1:
        raise ValueError("every split needs at least one example, got "
                         f"{train_size}/{validation_size}/{held_out_size}")
    name = config_name(resolution, train_size, validation_size, held_out_size, seed)
    if name not in _CONFIGS:
        _CONFIGS[name] = ShapesConfig(
            name=name, resolution=resolution, train_size=train_size,
            validation_size=validation_size, held_out_size=held_out_size, seed=seed,
            description=f"{resolution}x{resolution} captioned shapes, splits "
                        f"{train_size}/{validation_size}/{held_out_size}, seed {seed}")
    return _CONFIGS[name]


def _config_from_name(name):
    match = _NAME.match(name)
    if not match:
        return None
    resolution, *rest = match.groups()
    if rest[0] is None:
        return make_config(int(resolution))
    return make_config(int(resolution), *map(int, rest))


def _png_chunk(tag, data):
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def encode_png(image):
    """uint8 [H, W, 3] -> PNG bytes (8-bit RGB, no row filters).

    Why not tfds' own encoding: it runs a TF op per image (~0.5 ms), which dominated the
    generation time; this is ~25 us and decodes bit-exactly with tf.io.decode_png.
    """
    h, w, _ = image.shape
    rows = np.concatenate([np.zeros((h, 1), np.uint8), image.reshape(h, w * 3)], axis=1)
    return (b"\x89PNG\r\n\x1a\n"
            + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
            + _png_chunk(b"IEND", b""))


class Shapes(tfds.core.GeneratorBasedBuilder):
    """Captioned shapes on black: image, caption, attributes (JSON) and key."""

    name = "imagen_shapes"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [make_config(16), make_config(32), make_config(64)]
    DEFAULT_BUILDER_CONFIG_NAME = "r32"

    @classmethod
    def get_builder_config(cls, name, version=None):
        # Beyond the listed configs, any well-formed name describes its own config.
        return super().get_builder_config(name, version) or _config_from_name(name)

    def _info(self):
        r = self.builder_config.resolution
        return self.dataset_info_from_configs(
            description=__doc__.splitlines()[0],
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(r, r, 3), dtype=np.uint8, encoding_format="png"),
                "caption": tfds.features.Text(),
                "attributes": tfds.features.Text(),  # JSON scene, see imagen_jax.data.shapes
                "key": tfds.features.Text(),
            }),
            supervised_keys=None,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # everything is rendered locally
        return {split: self._generate_examples(split, n)
                for split, n in self.builder_config.split_sizes.items()}

    def _generate_examples(self, split, num_examples):
        cfg = self.builder_config
        for index in range(num_examples):
            ex = shapes.example(cfg.seed, split, index, cfg.resolution)
            ex["image"] = encode_png(ex["image"])
            yield ex["key"], ex
