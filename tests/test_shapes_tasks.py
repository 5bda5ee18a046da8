"""The shapes TFDS builder and seqio tasks, on tiny splits in a temporary data_dir."""
import json

import numpy as np
import pytest
import seqio
import tensorflow_datasets as tfds

from imagen_jax.data import shapes, shapes_tfds, tasks

SIZES = {"train_size": 6, "validation_size": 10, "held_out_size": 5}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    tfds.disable_progress_bar()
    yield str(tmp_path_factory.mktemp("tfds"))
    tasks.register_shapes_task(16)  # give the standard task back its default data_dir


@pytest.fixture(scope="module")
def validation_examples(data_dir):
    tasks.register_shapes_task(16, data_dir=data_dir, **SIZES)
    ds = seqio.get_mixture_or_task("shapes_16").get_dataset(
        sequence_length={"text_tokens": 32}, split="validation", shuffle=False)
    return list(ds.as_numpy_iterator())


def test_vocabulary_is_t5():
    tokens = tasks.vocabulary().encode("translate English to German: That is good.")
    assert list(tokens) == [13959, 1566, 12, 2968, 10, 466, 19, 207, 5]
    assert tasks.vocabulary().pad_id == 0 and tasks.vocabulary().eos_id == 1


def test_task_yields_the_rendered_scenes(validation_examples):
    assert len(validation_examples) == SIZES["validation_size"]
    assert {ex["key"].decode() for ex in validation_examples} == {
        f"validation/{i}" for i in range(SIZES["validation_size"])}
    vocab = seqio.get_mixture_or_task("shapes_16").output_features["text_tokens"].vocabulary
    for ex in validation_examples:
        assert set(ex) == {"image", "text_tokens", "caption", "attributes", "key"}
        index = int(ex["key"].decode().split("/")[1])
        expected = shapes.example(shapes_tfds.DEFAULT_SEED, "validation", index, 16)
        scene = json.loads(ex["attributes"])
        assert ex["image"].dtype == np.uint8 and ex["image"].shape == (16, 16, 3)
        np.testing.assert_array_equal(ex["image"], shapes.render(scene, 16))
        np.testing.assert_array_equal(ex["image"], expected["image"])
        assert ex["caption"].decode() == expected["caption"] == shapes.caption(scene)
        assert ex["text_tokens"].dtype == np.int32
        assert ex["text_tokens"][-1] == 1 and 0 not in ex["text_tokens"]
        assert list(ex["text_tokens"]) == list(vocab.encode(expected["caption"])) + [1]
        assert vocab.decode(ex["text_tokens"].tolist()) == expected["caption"]


def test_tokens_are_trimmed_with_eos(data_dir):
    tasks.register_shapes_task(16, data_dir=data_dir, **SIZES)
    ds = seqio.get_mixture_or_task("shapes_16").get_dataset(
        sequence_length={"text_tokens": 5}, split="held_out", shuffle=False)
    examples = list(ds.as_numpy_iterator())
    assert len(examples) == SIZES["held_out_size"]
    for ex in examples:
        assert len(ex["text_tokens"]) == 5 and ex["text_tokens"][-1] == 1
        held = set(shapes.HELD_OUT_COMBOS)
        assert held & {(o["colour"], o["shape"]) for o in json.loads(ex["attributes"])["objects"]}


def test_any_resolution_and_named_configs(data_dir):
    assert {"r16", "r32", "r64"} <= set(shapes_tfds.Shapes.builder_configs)
    for res in (16, 32, 64):
        assert seqio.get_mixture_or_task(f"shapes_{res}") is not None
    cfg = shapes_tfds.make_config(24, 3, 2, 2, seed=5)
    assert cfg.name == "r24_t3_v2_h2_s5" and shapes_tfds.make_config(24, 3, 2, 2, seed=5) is cfg
    assert shapes_tfds.make_config(32).name == "r32"
    with pytest.raises(ValueError):
        shapes_tfds.make_config(8)

    builder = tfds.builder("imagen_shapes/r24_t3_v2_h2_s5", data_dir=data_dir)
    assert builder.builder_config is cfg
    builder.download_and_prepare()
    assert {k: v.num_examples for k, v in builder.info.splits.items()} == {
        "train": 3, "validation": 2, "held_out": 2}
    for ex in tfds.as_numpy(builder.as_dataset(split="train")):
        index = int(ex["key"].decode().split("/")[1])
        np.testing.assert_array_equal(ex["image"], shapes.example(5, "train", index, 24)["image"])

    task = tasks.register_shapes_task(24, data_dir=data_dir, task_name="shapes_24_test",
                                      train_size=3, validation_size=2, held_out_size=2, seed=5)
    ex = next(task.get_dataset({"text_tokens": 16}, split="train", shuffle=False).as_numpy_iterator())
    assert ex["image"].shape == (24, 24, 3)
    seqio.TaskRegistry.remove("shapes_24_test")




def test_first_examples_reads_a_prefix_without_a_partial_cache(tmp_path):
    """pipeline.first_examples (sample grids, evaluation) takes the first n examples of a
    split. seqio caches small splits in memory unless told not to, and a cache read only in
    part makes tf.data warn of 'unexpected truncation' at every call (the main job printed
    it six times; the tests hide TF's warnings, so the graph is checked for the cache)."""
    from imagen_jax.data import pipeline
    sizes = dict(SIZES, validation_size=30)
    shapes_tfds.Shapes(config=shapes_tfds.make_config(16, **sizes),
                       data_dir=str(tmp_path)).download_and_prepare()
    tasks.register_shapes_task(16, data_dir=str(tmp_path), task_name="shapes_16_prefix", **sizes)
    task = seqio.get_mixture_or_task("shapes_16_prefix")
    ds = pipeline.dataset(task, "validation", max_length=32, shuffle=False, seed=None,
                          num_epochs=1, shard_by_host=False)
    assert b"CacheDataset" not in ds._as_serialized_graph().numpy()
    batch = pipeline.first_examples(task, "validation", 3, max_length=32)
    assert seqio.utils._TFDS_DATA_READ_CONFIG_OVERRIDE is None  # put back: process-wide
    whole = task.get_dataset(sequence_length={"text_tokens": 32}, split="validation",
                             shuffle=False)
    first = [ex["key"] for ex in whole.take(3).as_numpy_iterator()]  # the files' order
    assert list(batch["key"]) == first
    for image, key in zip(batch["image"], batch["key"]):
        index = int(key.decode().split("/")[1])
        expected = shapes.example(shapes_tfds.DEFAULT_SEED, "validation", index, 16)
        np.testing.assert_array_equal(image, expected["image"])
