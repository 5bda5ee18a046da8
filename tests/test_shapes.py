"""The synthetic shapes set and its alignment checker (numpy only, no TensorFlow)."""
import copy
import json
import math
import subprocess
import sys

import numpy as np
import pytest
from scipy import ndimage

from imagen_jax.data import shapes
from imagen_jax.eval import shapes_alignment as sa

RESOLUTIONS = (16, 32, 64)


def scenes(split, n, seed=0):
    return [shapes.sample_scene(seed, split, i) for i in range(n)]


# ----------------------------------------------------------------------------- dataset


def test_pure_numpy():
    """The dataset and checker must work where TensorFlow is not installed."""
    code = ("import sys, imagen_jax.data.shapes, imagen_jax.eval.shapes_alignment; "
            "sys.exit('tensorflow' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_deterministic_and_split_dependent():
    state = np.random.get_state()[1].copy()
    a = shapes.example(0, "train", 7, 32)
    b = shapes.example(0, "train", 7, 32)
    assert np.array_equal(np.random.get_state()[1], state)  # no global RNG use
    assert a["caption"] == b["caption"] and a["attributes"] == b["attributes"]
    assert np.array_equal(a["image"], b["image"])
    assert a["key"] == "train/7"
    others = [shapes.example(s, split, i, 32)["attributes"]
              for s, split, i in [(1, "train", 7), (0, "validation", 7), (0, "train", 8)]]
    assert all(o != a["attributes"] for o in others)


def test_attributes_json_and_caption_roundtrip():
    for scene in scenes("train", 50):
        ex_attrs = json.loads(json.dumps(scene))
        assert ex_attrs == scene
        assert ex_attrs["count"] == len(ex_attrs["objects"])
        text = shapes.caption(ex_attrs)
        first = ex_attrs["objects"][0]
        assert first["colour"] in text and first["shape"] in text


def test_held_out_combinations():
    held = set(shapes.HELD_OUT_COMBOS)
    assert len(held) == 3
    for split in ("train", "validation"):
        for scene in scenes(split, 800):
            assert not held & {(o["colour"], o["shape"]) for o in scene["objects"]}
    kinds = []
    for scene in scenes("held_out", 600):
        assert held & {(o["colour"], o["shape"]) for o in scene["objects"]}
        kinds.append(scene["kind"])
    assert kinds.count("single") / len(kinds) > 0.7
    # Every colour and every shape is still seen in training.
    assert {c for c, _ in shapes.TRAIN_COMBOS} == set(shapes.COLOUR_NAMES)
    assert {s for _, s in shapes.TRAIN_COMBOS} == set(shapes.SHAPES)


def test_kind_mix_and_override():
    kinds = [s["kind"] for s in scenes("train", 2000)]
    assert abs(kinds.count("single") / 2000 - 0.5) < 0.05
    assert abs(kinds.count("count") / 2000 - 0.25) < 0.05
    only_count = [shapes.sample_scene(0, "train", i, {"count": 1.0})["kind"] for i in range(50)]
    assert set(only_count) == {"count"}
    with pytest.raises(ValueError):
        shapes.sample_scene(0, "test", 0)


def test_captions_read_as_english():
    obj = lambda shape, colour, x=0.5, y=0.5: {"shape": shape, "colour": colour, "size": 0.2, "x": x, "y": y}
    single = {"kind": "single", "objects": [obj("circle", "red")], "position": "top",
              "relation": None, "count": 1, "template": 0}
    assert shapes.caption(single) == "a red circle at the top"
    assert shapes.caption(single, template=4) == "a red circle positioned at the top"
    single["objects"][0]["colour"] = "orange"
    assert shapes.caption(single, template=3) == "there is an orange circle at the top"
    count = {"kind": "count", "objects": [obj("square", "blue")] * 3, "position": None,
             "relation": None, "count": 3, "template": 0}
    assert shapes.caption(count) == "three blue squares"
    relation = {"kind": "relation", "objects": [obj("triangle", "green"), obj("circle", "yellow")],
                "position": None, "relation": "left of", "count": 2, "template": 1}
    assert shapes.caption(relation) == "a green triangle to the left of a yellow circle"
    assert shapes.caption(relation, template=0) == "a green triangle left of a yellow circle"
    seen = {shapes.caption(s) for s in scenes("train", 400)}
    assert len(seen) > 300  # templates x attributes give varied captions


def test_layout_constraints():
    for scene in scenes("train", 800) + scenes("held_out", 300):
        objs = scene["objects"]
        for o in objs:  # the whole shape lies inside the image
            if o["shape"] == "triangle":  # apex 2/3 size above the centroid
                assert o["y"] - 2 * o["size"] / 3 > 0
            assert 0 < o["x"] - o["size"] / 2 and o["x"] + o["size"] / 2 < 1
            assert o["y"] + o["size"] / 2 < 1 and o["y"] - o["size"] / 2 > 0
        for i in range(len(objs)):
            for j in range(i + 1, len(objs)):
                d = math.hypot(objs[i]["x"] - objs[j]["x"], objs[i]["y"] - objs[j]["y"])
                assert d >= shapes.BOUND_RADIUS * (objs[i]["size"] + objs[j]["size"]) + shapes.GAP - 1e-9
        if scene["kind"] == "single":
            dx, dy = objs[0]["x"] - 0.5, objs[0]["y"] - 0.5
            along, across = {"top": (-dy, dx), "bottom": (dy, dx), "left": (-dx, dy),
                             "right": (dx, dy), "center": (0.0, 0.0)}[scene["position"]]
            if scene["position"] == "center":
                assert max(abs(dx), abs(dy)) <= shapes.CENTER_JITTER
            else:
                assert 0.2 <= along <= 0.26 and abs(across) <= 0.08
        elif scene["kind"] == "count":
            assert len(objs) in (2, 3)
            assert len({(o["colour"], o["shape"], o["size"]) for o in objs}) == 1
        else:
            a, b = objs
            assert (a["colour"], a["shape"]) != (b["colour"], b["shape"])
            dx, dy = b["x"] - a["x"], b["y"] - a["y"]  # subject -> reference, y down
            along, across = {"left of": (dx, dy), "right of": (-dx, dy),
                             "above": (dy, dx), "below": (-dy, dx)}[scene["relation"]]
            assert along >= shapes.RELATION_DOMINANCE * abs(across) and along > 0


@pytest.mark.parametrize("shape,fill", [("circle", math.pi / 4), ("square", 1.0), ("triangle", 0.5)])
@pytest.mark.parametrize("resolution", [16, 37, 64])
def test_render_matches_closed_form_geometry(shape, fill, resolution):
    """Area, centroid and colour of a rendered shape against closed-form values."""
    size, x, y = 0.4, 0.47, 0.53
    scene = {"kind": "single", "objects": [{"shape": shape, "colour": "orange", "size": size,
                                            "x": x, "y": y}],
             "position": "center", "relation": None, "count": 1, "template": 0}
    img = shapes.render(scene, resolution)
    assert img.dtype == np.uint8 and img.shape == (resolution, resolution, 3)
    alpha = img[..., 0].astype(np.float64) / 255  # orange = (255, 128, 0)
    assert np.all(img[..., 2] == 0)
    np.testing.assert_allclose(img[..., 1], np.round(alpha * 128), atol=1)
    # Area within a few supersampling cells along the boundary.
    area_px = fill * (size * resolution) ** 2
    assert abs(alpha.sum() - area_px) < 0.6 * resolution * size
    centres = (np.arange(resolution) + 0.5) / resolution
    assert abs((alpha.sum(0) * centres).sum() / alpha.sum() - x) < 0.02
    assert abs((alpha.sum(1) * centres).sum() / alpha.sum() - y) < 0.02
    # Fully covered pixels carry the exact palette colour; far pixels are black.
    assert (img.reshape(-1, 3) == (255, 128, 0)).all(-1).sum() > 0.5 * area_px
    assert img[0, 0].tolist() == [0, 0, 0]


def test_render_rejects_tiny_resolution():
    with pytest.raises(ValueError):
        shapes.render(shapes.sample_scene(0, "train", 0), 8)


# ----------------------------------------------------------------------------- checker


def _assert_accuracy(results, kinds, threshold):
    for kind in set(kinds):
        agg = sa.aggregate([r for r, k in zip(results, kinds) if k == kind])
        for attr, v in agg.items():
            if v["n"]:
                assert v["accuracy"] >= threshold, (kind, attr, v)


@pytest.mark.parametrize("resolution", RESOLUTIONS)
def test_checker_scores_dataset_renders(resolution):
    for split, n in (("train", 200), ("validation", 300), ("held_out", 300)):
        sc = scenes(split, n)
        results = [sa.check(shapes.render(s, resolution), json.dumps(s)) for s in sc]
        _assert_accuracy(results, [s["kind"] for s in sc], 0.99)
        # The attributes that apply to each kind, and only those, are scored.
        for s, r in zip(sc, results):
            assert (r["position"] is None) == (s["kind"] == "count")
            assert all(r[a] is not None for a in ("colour", "shape", "count"))


def test_checker_tolerates_grey_background_blur_and_noise():
    """What generated samples look like: a lifted background, soft edges, noise."""
    sc = scenes("validation", 200)
    results = []
    for i, s in enumerate(sc):
        img = shapes.render(s, 32).astype(float) + 30.0
        img = ndimage.gaussian_filter(img, (0.8, 0.8, 0))
        img += np.random.default_rng(i).normal(0, 6, img.shape)
        results.append(sa.check(np.clip(np.round(img), 0, 255).astype(np.uint8), s))
    _assert_accuracy(results, [s["kind"] for s in sc], 0.97)


def _other(options, *exclude):
    return next(o for o in options if o not in exclude)


@pytest.mark.parametrize("resolution", RESOLUTIONS)
def test_checker_catches_wrong_renderings(resolution):
    tested = {"colour": 0, "shape": 0, "count": 0, "position": 0}
    for s in scenes("validation", 60):
        objs = s["objects"]
        colours = [o["colour"] for o in objs]
        shapes_ = [o["shape"] for o in objs]

        wrong = copy.deepcopy(s)  # wrong colour on every object (count) or the first
        for o in wrong["objects"] if s["kind"] == "count" else wrong["objects"][:1]:
            o["colour"] = _other(shapes.COLOUR_NAMES, *colours)
        r = sa.check(shapes.render(wrong, resolution), s)
        assert r["colour"] is False and r["shape"] and r["count"], (s, r)
        tested["colour"] += 1

        wrong = copy.deepcopy(s)  # same scene, another shape
        for o in wrong["objects"] if s["kind"] == "count" else wrong["objects"][:1]:
            o["shape"] = _other(shapes.SHAPES, *shapes_)
        r = sa.check(shapes.render(wrong, resolution), s)
        assert r["shape"] is False and r["colour"] and r["count"], (s, r)
        tested["shape"] += 1

        wrong = copy.deepcopy(s)  # one object too few, or one too many for a single
        if s["kind"] == "single":
            mirror = dict(objs[0], x=1 - objs[0]["x"], y=1 - objs[0]["y"])
            if math.hypot(mirror["x"] - objs[0]["x"], mirror["y"] - objs[0]["y"]) > 0.5:
                wrong["objects"].append(mirror)
        else:
            wrong["objects"].pop()
        if len(wrong["objects"]) != len(objs):
            r = sa.check(shapes.render(wrong, resolution), s)
            assert r["count"] is False, (s, r)
            if s["kind"] == "count":
                assert r["colour"] and r["shape"]
            tested["count"] += 1

        if s["kind"] == "count":
            continue
        wrong = copy.deepcopy(s)  # wrong position: mirror a single, swap a relation
        if s["kind"] == "single":
            o = wrong["objects"][0]
            if s["position"] == "center":
                o["y"] -= 0.23
            else:
                o["x"], o["y"] = 1 - o["x"], 1 - o["y"]
        else:
            a, b = wrong["objects"]
            a["x"], a["y"], b["x"], b["y"] = b["x"], b["y"], a["x"], a["y"]
        r = sa.check(shapes.render(wrong, resolution), s)
        assert r["position"] is False and r["colour"] and r["shape"] and r["count"], (s, r)
        tested["position"] += 1
    assert min(tested.values()) >= 20, tested


def test_checker_on_blank_image_and_bad_input():
    blank = np.zeros((32, 32, 3), np.uint8)
    for s in scenes("validation", 10):
        r = sa.check(blank, s)
        assert not any(r.values())
    with pytest.raises(ValueError):
        sa.check(blank.astype(np.float32), scenes("validation", 1)[0])


def test_checker_reads_attribute_values():
    """detect_objects against the scene itself: colour, shape and centroid per object."""
    for s in scenes("validation", 100):
        found = sa.detect_objects(shapes.render(s, 32))
        assert len(found) == len(s["objects"])
        for o in s["objects"]:
            nearest = min(found, key=lambda f: math.hypot(f["x"] - o["x"], f["y"] - o["y"]))
            assert (nearest["colour"], nearest["shape"]) == (o["colour"], o["shape"])
            assert math.hypot(nearest["x"] - o["x"], nearest["y"] - o["y"]) < 0.01
            assert abs(nearest["mass"] - sa._FILL[o["shape"]] * o["size"] ** 2) < 0.01


def test_aggregate_chance_and_report_format():
    results = [{"colour": True, "shape": False, "count": True, "position": None},
               {"colour": False, "shape": False, "count": True, "position": True}]
    agg = sa.aggregate(results)
    assert agg["colour"] == {"accuracy": 0.5, "n": 2}
    assert agg["shape"] == {"accuracy": 0.0, "n": 2}
    assert agg["position"] == {"accuracy": 1.0, "n": 1}
    assert sa.chance_levels() == {"colour": 1 / 8, "shape": 1 / 3, "count": 1 / 3, "position": 1 / 5}

    sc = [(s, "validation") for s in scenes("validation", 40)] + [(s, "held_out") for s in scenes("held_out", 10)]
    images = [shapes.render(s, 16) for s, _ in sc]
    rep = sa.report(images, [json.dumps(s) for s, _ in sc], [split for _, split in sc])
    assert set(rep) == {"single_object", "multi_object", "held_out", "chance"}
    assert rep["chance"] == sa.chance_levels()
    n_single = sum(s["kind"] == "single" for s, split in sc if split == "validation")
    assert rep["single_object"]["colour"]["n"] == n_single
    assert rep["multi_object"]["colour"]["n"] == 40 - n_single
    assert rep["held_out"]["shape"]["n"] == 10
    for group in ("single_object", "multi_object", "held_out"):
        assert set(rep[group]) == set(sa.ATTRIBUTES)
        for v in rep[group].values():
            assert v["n"] == 0 or 0.99 <= v["accuracy"] <= 1.0
    json.dumps(rep)
