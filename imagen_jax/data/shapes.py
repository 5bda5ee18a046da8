"""Synthetic captioned shapes: the embedded default dataset (pure numpy, no TensorFlow).

A scene is one to three flat-coloured shapes (circle, square, upright triangle) on black.
Everything is procedural and deterministic per (seed, split, index), and geometry is in
image fractions, so one scene renders identically (up to sampling) at any resolution.

Scene attributes are a JSON-serialisable dict:
  {"kind": "single" | "count" | "relation",
   "objects": [{"shape", "colour", "size", "x", "y"}, ...],   # x, y: area centroid in [0, 1]
   "position": "top" | ... | None,      # single only
   "relation": "left of" | ... | None,  # relation only: objects[0] <relation> objects[1]
   "count": len(objects),
   "template": int}                     # which caption phrasing (caption() is deterministic)

`size` is the side of the shape's bounding box (circle diameter, square side, triangle base
and height). (x, y) is the centroid of the shape's area, not its box centre, so an
alignment checker can read positions from image moments without knowing the shape.
"""
import json
import math
import re

import numpy as np

# Saturated colours: every one has a channel at 255, so a pixel blended with the black
# background keeps its chromaticity (rgb / max(rgb)), and the chromaticities are at least
# 0.5 apart: nearest-palette colour stays exact after anti-aliasing, blur or downsampling.
COLOURS = {
    "red": (255, 0, 0),
    "orange": (255, 128, 0),
    "yellow": (255, 255, 0),
    "green": (0, 255, 0),
    "cyan": (0, 255, 255),
    "blue": (0, 0, 255),
    "magenta": (255, 0, 255),
    "white": (255, 255, 255),
}
COLOUR_NAMES = tuple(COLOURS)
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("top", "bottom", "left", "right", "center")
RELATIONS = ("left of", "right of", "above", "below")
KINDS = ("single", "count", "relation")
SPLITS = ("train", "validation", "held_out")
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}

# (colour, shape) combinations never seen in train/validation; held_out scenes always
# contain at least one. One per shape, each colour and shape still appears in train.
HELD_OUT_COMBOS = (("blue", "triangle"), ("yellow", "circle"), ("magenta", "square"))
TRAIN_COMBOS = tuple((c, s) for c in COLOUR_NAMES for s in SHAPES if (c, s) not in HELD_OUT_COMBOS)

DEFAULT_KIND_PROBS = {
    "train": {"single": 0.5, "count": 0.25, "relation": 0.25},
    "validation": {"single": 0.5, "count": 0.25, "relation": 0.25},
    "held_out": {"single": 0.8, "count": 0.1, "relation": 0.1},
}

# Geometry, in image fractions. BOUND_RADIUS bounds every shape around its centroid
# (square corner 0.707 s; triangle base corners 0.601 s); objects keep at least GAP
# between these bounding circles so they never touch, even at 16x16.
BOUND_RADIUS = 0.71
GAP = 0.12
SINGLE_SIZE = (0.24, 0.34)
COUNT_SIZE = (0.18, 0.24)
RELATION_SIZE = (0.2, 0.28)
# Single-object placement: offset of the centroid from the image centre. A checker that
# calls "center" when max(|dx|, |dy|) < 0.13 and otherwise takes the dominant axis
# recovers these exactly with a margin of >= 0.07 image widths.
SIDE_OFFSET = (0.2, 0.26)     # along the named axis
SIDE_JITTER = 0.08            # across it
CENTER_JITTER = 0.06
# Relation placement: the displacement along the named axis is >= RELATION_DOMINANCE
# times the displacement across it.
RELATION_DOMINANCE = 2.5

_POSITION_PHRASES = {
    "top": "at the top", "bottom": "at the bottom", "left": "on the left",
    "right": "on the right", "center": "in the center",
}
_RELATION_PHRASES = {
    "left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below",
}
_A_BEFORE_VOWEL = re.compile(r"\ba (?=[aeiou])")
TEMPLATES = {
    "single": (
        "a {colour} {shape} {where}",
        "a {colour} {shape} {where} of the image",
        "a picture of a {colour} {shape} {where}",
        "there is a {colour} {shape} {where}",
        "a {colour} {shape} positioned {where}",
    ),
    "count": (
        "{count} {colour} {shape}s",
        "a picture of {count} {colour} {shape}s",
        "there are {count} {colour} {shape}s",
        "{count} {colour} {shape}s on a black background",
    ),
    "relation": (
        "a {colour} {shape} {relation} a {colour2} {shape2}",
        "a {colour} {shape} {relation_long} a {colour2} {shape2}",
        "a picture of a {colour} {shape} {relation} a {colour2} {shape2}",
        "a {colour} {shape} is {relation_long} a {colour2} {shape2}",
    ),
}


def scene_rng(seed, split, index):
    """A generator owned by one example: no global state, independent across splits."""
    return np.random.default_rng([int(seed), SPLITS.index(split), int(index)])


def _object(shape, colour, size, x, y):
    return {"shape": shape, "colour": colour, "size": float(size), "x": float(x), "y": float(y)}


def _pick(rng, items):
    return items[int(rng.integers(len(items)))]


def _sample_combo(rng, split):
    return _pick(rng, HELD_OUT_COMBOS if split == "held_out" else TRAIN_COMBOS)


def _sample_separated(rng, sizes, accept=None, tries=64):
    """Centroids for objects of `sizes`, inside the image and pairwise separated.

    Rejection sampling, vectorised over `tries` candidate layouts at a time.
    """
    sizes = np.asarray(sizes, np.float64)
    radii = BOUND_RADIUS * sizes
    lo, hi = radii + 0.02, 1.0 - radii - 0.02
    need = radii[:, None] + radii[None, :] + GAP
    need2 = np.where(np.eye(len(sizes), dtype=bool), 0.0, need * need)  # squared distances
    while True:
        pts = rng.uniform(lo[None, :, None], hi[None, :, None], size=(tries, len(sizes), 2))
        diff = pts[:, :, None, :] - pts[:, None, :, :]
        ok = ((diff * diff).sum(-1) >= need2).all(axis=(1, 2))
        if accept is not None:
            ok &= accept(pts)
        if ok.any():
            return pts[int(np.argmax(ok))]


def _single(rng, split):
    colour, shape = _sample_combo(rng, split)
    size = rng.uniform(*SINGLE_SIZE)
    position = _pick(rng, POSITIONS)
    if position == "center":
        dx, dy = rng.uniform(-CENTER_JITTER, CENTER_JITTER, size=2)
    else:
        along = rng.uniform(*SIDE_OFFSET) * (-1 if position in ("top", "left") else 1)
        across = rng.uniform(-SIDE_JITTER, SIDE_JITTER)
        dx, dy = (along, across) if position in ("left", "right") else (across, along)
    return {"kind": "single", "objects": [_object(shape, colour, size, 0.5 + dx, 0.5 + dy)],
            "position": position, "relation": None}


def _count(rng, split):
    colour, shape = _sample_combo(rng, split)
    n = int(rng.integers(2, 4))
    size = rng.uniform(*COUNT_SIZE)
    pts = _sample_separated(rng, [size] * n)
    return {"kind": "count", "objects": [_object(shape, colour, size, x, y) for x, y in pts],
            "position": None, "relation": None}


def _relation(rng, split):
    combo_a = _sample_combo(rng, split)
    while True:  # the other object is any training combination, different from the first
        combo_b = _pick(rng, TRAIN_COMBOS)
        if combo_b != combo_a:
            break
    if rng.random() < 0.5:  # in held_out the held-out object is subject or reference
        combo_a, combo_b = combo_b, combo_a
    sizes = rng.uniform(*RELATION_SIZE, size=2)

    def dominant_axis(pts):
        d = np.abs(pts[:, 1] - pts[:, 0])
        return np.maximum(d[:, 0], d[:, 1]) >= RELATION_DOMINANCE * np.minimum(d[:, 0], d[:, 1])

    (xa, ya), (xb, yb) = _sample_separated(rng, sizes, accept=dominant_axis)
    dx, dy = xb - xa, yb - ya  # from subject a to reference b; y points down
    if abs(dx) > abs(dy):
        relation = "left of" if dx > 0 else "right of"
    else:
        relation = "above" if dy > 0 else "below"
    objects = [_object(combo_a[1], combo_a[0], sizes[0], xa, ya),
               _object(combo_b[1], combo_b[0], sizes[1], xb, yb)]
    return {"kind": "relation", "objects": objects, "position": None, "relation": relation}


_SAMPLERS = {"single": _single, "count": _count, "relation": _relation}


def sample_scene(seed, split, index, kind_probs=None):
    """The scene for example `index` of `split`; same arguments, same scene, always.

    kind_probs: {"single": p, "count": p, "relation": p}; default DEFAULT_KIND_PROBS[split].
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    probs = dict(DEFAULT_KIND_PROBS[split] if kind_probs is None else kind_probs)
    p = [float(probs.get(k, 0.0)) for k in KINDS]
    if set(probs) - set(KINDS) or min(p) < 0 or sum(p) <= 0:
        raise ValueError(f"kind_probs must map {KINDS} to non-negative weights with a positive "
                         f"sum, got {kind_probs}")
    rng = scene_rng(seed, split, index)
    u, cumulative = rng.random() * sum(p), 0.0
    for kind, pk in zip(KINDS, p):
        cumulative += pk
        if u < cumulative and pk > 0:
            break
    scene = _SAMPLERS[kind](rng, split)
    scene["count"] = len(scene["objects"])
    scene["template"] = int(rng.integers(len(TEMPLATES[kind])))
    return scene


def caption(scene, template=None):
    """The caption of `scene`, using its stored template unless `template` is given."""
    kind = scene["kind"]
    templates = TEMPLATES[kind]
    text = templates[(scene["template"] if template is None else template) % len(templates)]
    first = scene["objects"][0]
    fields = {"colour": first["colour"], "shape": first["shape"]}
    if kind == "single":
        fields["where"] = _POSITION_PHRASES[scene["position"]]
    elif kind == "count":
        fields["count"] = COUNT_WORDS[scene["count"]]
    else:
        second = scene["objects"][1]
        fields.update(colour2=second["colour"], shape2=second["shape"],
                      relation=scene["relation"], relation_long=_RELATION_PHRASES[scene["relation"]])
    # "a orange circle" -> "an orange circle" (orange is the only vowel-initial colour).
    return _A_BEFORE_VOWEL.sub("an ", text.format(**fields))


_SUPERSAMPLE = 4


def _coverage(shape, x, y, size, resolution):
    """Anti-aliased coverage of one shape, evaluated only over its bounding box.

    Returns (row0, col0, counts): counts[i, j] in 0..16 is how many of the 4x4 sub-pixel
    samples of pixel (row0 + i, col0 + j) fall inside the shape.
    """
    s = _SUPERSAMPLE
    n = resolution * s
    half = BOUND_RADIUS * size + 1.0 / resolution  # a pixel of slack around the shape
    r0 = max(0, math.floor((y - half) * resolution))
    r1 = max(0, math.floor((x - half) * resolution))
    r_end = min(resolution, math.ceil((y + half) * resolution))
    c_end = min(resolution, math.ceil((x + half) * resolution))
    v = (np.arange(r0 * s, r_end * s) + 0.5) / n - y  # sub-pixel centres, relative
    u = (np.arange(r1 * s, c_end * s) + 0.5) / n - x
    v, u = v[:, None], u[None, :]
    h = size / 2
    if shape == "circle":
        inside = u * u + v * v <= h * h
    elif shape == "square":
        inside = (np.abs(u) <= h) & (np.abs(v) <= h)
    elif shape == "triangle":
        # Upright, apex 2/3 size above the centroid, base 1/3 size below; the half-width
        # grows by 1/2 per unit of depth below the apex.
        inside = (v <= size / 3) & (np.abs(u) <= (v + 2 * size / 3) / 2)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    rows, cols = inside.shape[0] // s, inside.shape[1] // s
    # Box-filter the sub-samples: sum 4 rows, then 4 columns (uint8 is enough for 16).
    counts = inside.view(np.uint8).reshape(rows, s, cols * s).sum(axis=1, dtype=np.uint8)
    counts = counts.reshape(rows, cols, s).sum(axis=2, dtype=np.uint8)
    return r0, r1, counts


def render_alpha(shape, x, y, size, resolution):
    """Coverage of a single shape in [0, 1], float32 [R, R] (also the checker's template)."""
    out = np.zeros((resolution, resolution), np.float32)
    r0, c0, counts = _coverage(shape, x, y, size, resolution)
    out[r0:r0 + counts.shape[0], c0:c0 + counts.shape[1]] = counts / _SUPERSAMPLE ** 2
    return out


def render(scene, resolution):
    """uint8 [R, R, 3]: the scene on black, anti-aliased by 4x4 supersampling.

    Objects never overlap, so each pixel is one colour scaled by its coverage.
    """
    if resolution < 16:
        raise ValueError(f"resolution must be >= 16, got {resolution}")
    acc = np.zeros((resolution, resolution, 3), np.float32)
    for obj in scene["objects"]:
        r0, c0, counts = _coverage(obj["shape"], obj["x"], obj["y"], obj["size"], resolution)
        colour = np.asarray(COLOURS[obj["colour"]], np.float32) / _SUPERSAMPLE ** 2
        acc[r0:r0 + counts.shape[0], c0:c0 + counts.shape[1]] += counts[..., None] * colour
    return np.round(acc).astype(np.uint8)


def example(seed, split, index, resolution, kind_probs=None):
    """One dataset example: image, caption, attributes (JSON string) and a unique key."""
    scene = sample_scene(seed, split, index, kind_probs)
    return {
        "image": render(scene, resolution),
        "caption": caption(scene),
        "attributes": json.dumps(scene, sort_keys=True),
        "key": f"{split}/{index}",
    }
