"""seqio tasks over the shapes TFDS builder; importing this module registers them.

Tasks `shapes_16`, `shapes_32` and `shapes_64` read the default-sized datasets
(20000 / 512 / 256 examples) from the TFDS default data_dir (or $IMAGEN_SHAPES_DATA_DIR);
`register_shapes_task` registers (or re-registers) a task for any resolution, split
sizes and data_dir. A missing dataset is generated on first use (seconds; nothing is
downloaded).

Each example: image uint8 [R, R, 3]; text_tokens int32 (T5 SentencePiece ids of the
caption, EOS=1 appended, trimmed to the requested length); caption (raw string);
attributes (JSON scene, see imagen_jax.data.shapes); key (unique "split/index").

`register_embeddings_task` registers a task over a directory of precomputed T5
embeddings (`python -m imagen_jax.encode_text`; format in imagen_jax.data.embeddings):
image uint8 [R, R, 3]; text_embedding [max_length, d_model] zero-padded, in the stored
dtype; text_mask bool [max_length]; caption; key.
"""
import functools
import importlib.resources
import os

import seqio
import tensorflow as tf

from imagen_jax.data import embeddings, shapes_tfds

DEFAULT_RESOLUTIONS = (16, 32, 64)
DATA_DIR_ENV = "IMAGEN_SHAPES_DATA_DIR"


@functools.cache
def vocabulary():
    """The T5 SentencePiece vocabulary packaged with imagen_jax.text (pad=0, eos=1)."""
    path = importlib.resources.files("imagen_jax.text") / "t5_spiece.model"
    # extra_ids=100 matches T5's vocabulary (32100 ids); captions never produce them.
    return seqio.SentencePieceVocabulary(str(path), extra_ids=100)


def _to_features(ex):
    """Caption -> the string to tokenize into text_tokens; keep everything else."""
    return {"text_tokens": ex["caption"], "caption": ex["caption"], "image": ex["image"],
            "attributes": ex["attributes"], "key": ex["key"]}


def register_shapes_task(resolution, data_dir=None, task_name=None,
                         train_size=shapes_tfds.DEFAULT_SPLIT_SIZES["train"],
                         validation_size=shapes_tfds.DEFAULT_SPLIT_SIZES["validation"],
                         held_out_size=shapes_tfds.DEFAULT_SPLIT_SIZES["held_out"],
                         seed=shapes_tfds.DEFAULT_SEED):
    """Register the seqio task `task_name` (default f"shapes_{resolution}"); returns it.

    An existing task of that name is replaced, so a config can point a standard name at
    its own data_dir and split sizes.
    """
    config = shapes_tfds.make_config(resolution, train_size, validation_size, held_out_size, seed)
    task_name = task_name or f"shapes_{resolution}"
    if data_dir is None:
        data_dir = os.environ.get(DATA_DIR_ENV)
    seqio.TaskRegistry.remove(task_name)
    return seqio.TaskRegistry.add(
        task_name,
        source=seqio.TfdsDataSource(
            tfds_name=f"{shapes_tfds.Shapes.name}/{config.name}:{shapes_tfds.Shapes.VERSION}",
            tfds_data_dir=data_dir,
            splits=("train", "validation", "held_out")),
        preprocessors=[
            seqio.map_over_dataset(_to_features),
            # The raw caption is already kept under "caption".
            functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
            seqio.preprocessors.append_eos_after_trim,
        ],
        output_features={
            "text_tokens": seqio.Feature(vocabulary(), add_eos=True, dtype=tf.int32),
        },
    )


def register_embeddings_task(task_name, directory, *, width, max_length, resolution):
    """Register (or replace) the seqio task `task_name` over the precomputed embeddings in
    `directory` (every split with metadata there); returns it.

    width: the expected embedding width (config.text.d_model); max_length: the length the
    embeddings are zero-padded to, with text_mask marking the real tokens; resolution:
    images of another size are centre-cropped and resized to it. Records whose image does
    not decode or whose embedding has the wrong width or length are skipped by the input
    pipeline (pipeline.SplitReader, through ShardsSource.check_record).
    """
    info = embeddings.shards_info(directory, width=width, max_length=max_length)
    seqio.TaskRegistry.remove(task_name)
    return seqio.TaskRegistry.add(
        task_name,
        source=embeddings.ShardsSource(info),
        preprocessors=[seqio.map_over_dataset(embeddings.decode_fn(info, resolution))],
        output_features={},
    )


for _resolution in DEFAULT_RESOLUTIONS:
    register_shapes_task(_resolution)
