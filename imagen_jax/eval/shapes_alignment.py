"""Exact text-image alignment for the synthetic shapes set.

Given an image (uint8 HWC, any resolution >= 16; a dataset render or a generated sample)
and the scene attributes it was meant to show, say per attribute whether it is right.

Method (no learned parts, so the score means the same thing on every run):
  1. Foreground: alpha = max(r, g, b) / 255, after subtracting the background colour (the
     median pixel; black on dataset renders). Every palette colour has a channel at 255,
     so on the dataset's renders alpha is exactly the anti-aliased coverage.
  2. Objects: connected components (8-connected) of alpha > 0.5; every other pixel with
     alpha > 0.1 joins its nearest component, so anti-aliased/blurred edges count towards
     the object they belong to. Components with less than 0.5% of the image area, or less
     than 10% of the largest component, are noise and ignored.
  3. Colour: alpha-weighted mean chromaticity rgb / max(rgb) of the object's pixels (it is
     unchanged by blending with the black background), nearest palette chromaticity.
  4. Shape: template matching. For each candidate shape the size that explains the
     object's area (mass) is derived, the shape is rendered at the object's centroid with
     the dataset's own renderer (also blurred by sigma 0.5 and 0.8 px, for soft samples),
     and the candidate with the smallest L1 difference wins.
  5. Position: the object's alpha-weighted centroid. "center" when it lies within 0.13
     of the image centre on both axes, otherwise the dominant axis and its sign
     (top/bottom/left/right). The dataset places objects with >= 0.07 margin to these
     boundaries.

Needs numpy and scipy (a jax dependency), not TensorFlow.

Per-kind meaning of the four attributes (None = not applicable):
  single   ("a red circle at the top"): colour/shape/position of the largest object;
           count = exactly one object.
  count    ("three red circles"): count = number of objects equals the caption's number;
           colour/shape = at least one object and all objects have the caption's
           colour/shape; position = None.
  relation ("a red circle left of a blue square"): count = exactly two objects; colour
           (shape) = the two described colours (shapes) are found on two distinct
           objects; position = the relation holds between the two detected objects that
           best match the description (most colour+shape agreements): the displacement
           from subject to reference is along the named axis, in the named direction,
           and larger than the displacement across it. False with fewer than two objects.
"""
import itertools
import json

import numpy as np
from scipy import ndimage

from imagen_jax.data import shapes

ATTRIBUTES = ("colour", "shape", "count", "position")
CORE_ALPHA = 0.5
EDGE_ALPHA = 0.1
MIN_AREA_FRACTION = 0.005
MIN_RELATIVE_MASS = 0.1
CENTER_RADIUS = 0.13
# Templates are also compared blurred (Gaussian sigma in pixels): a slightly soft sample
# should match the blurred version of its own shape better than any other shape.
BLUR_SIGMAS = (0.0, 0.5, 0.8)
# Fraction of its bounding box that each shape fills: sets the template size from the mass.
_FILL = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}
_CHROMA = np.array([shapes.COLOURS[c] for c in shapes.COLOUR_NAMES], np.float64) / 255.0
_MAX_CANDIDATES = 6  # objects considered when matching a relation caption


def _gaussian_kernel(sigma):
    taps = np.arange(-int(np.ceil(3 * sigma)), int(np.ceil(3 * sigma)) + 1)
    kernel = np.exp(-0.5 * (taps / sigma) ** 2)
    return kernel / kernel.sum()


_KERNELS = {sigma: _gaussian_kernel(sigma) for sigma in BLUR_SIGMAS if sigma > 0}


def _blur(x, sigma):
    if sigma == 0:
        return x
    k = _KERNELS[sigma]
    x = ndimage.correlate1d(x, k, axis=0, mode="constant")
    return ndimage.correlate1d(x, k, axis=1, mode="constant")


def detect_objects(image):
    """Objects in `image`, largest first: [{"colour", "shape", "x", "y", "mass"}].

    x, y are the centroid in image fractions; mass is the area in image fractions.
    """
    image = np.asarray(image)
    if (image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3
            or image.shape[0] != image.shape[1]):
        raise ValueError("expected a square uint8 [R, R, 3] image (convert [-1, 1] floats with "
                         f"round((x + 1) * 127.5)), got {image.dtype} {image.shape}")
    res = image.shape[0]
    if res < 16:
        raise ValueError(f"resolution must be >= 16, got {res}")
    rgb = image.astype(np.float64) / 255.0
    # Generated samples may have a grey-ish background: measure it (objects cover well
    # under half the image, so the median pixel is background) and take it away.
    background = np.median(rgb.reshape(-1, 3), axis=0)
    rgb = np.clip((rgb - background) / np.maximum(1.0 - background.max(), 0.25), 0.0, 1.0)
    alpha = rgb.max(axis=-1)
    core = alpha > CORE_ALPHA
    labels, num = ndimage.label(core, structure=np.ones((3, 3), bool))
    if num == 0:
        return []
    # Each pixel joins the component of its nearest core pixel (soft edges, blur).
    _, (near_r, near_c) = ndimage.distance_transform_edt(~core, return_indices=True)
    owner = np.where(alpha > EDGE_ALPHA, labels[near_r, near_c], 0)
    weight = np.where(owner > 0, alpha, 0.0)
    index = np.arange(1, num + 1)
    mass = ndimage.sum_labels(weight, owner, index) / res ** 2
    keep = (mass >= MIN_AREA_FRACTION) & (mass >= MIN_RELATIVE_MASS * mass.max())
    centres = (np.arange(res) + 0.5) / res
    ys = ndimage.sum_labels(weight * centres[:, None], owner, index) / res ** 2
    xs = ndimage.sum_labels(weight * centres[None, :], owner, index) / res ** 2
    chroma = rgb / np.maximum(alpha, 1e-6)[..., None]
    objects = []
    boxes = ndimage.find_objects(owner, max_label=num)
    for k in np.flatnonzero(keep):
        x, y = xs[k] / mass[k], ys[k] / mass[k]
        # Compare within a window holding the object, every candidate template (the
        # largest is the triangle, sqrt(2) times the square) and its blur.
        half = shapes.BOUND_RADIUS * np.sqrt(mass[k] / _FILL["triangle"])
        pad = int(np.ceil(3 * max(BLUR_SIGMAS))) + 1
        rows, cols = boxes[k]
        r0 = max(0, min(rows.start, int((y - half) * res)) - pad)
        r1 = min(res, max(rows.stop, int(np.ceil((y + half) * res))) + pad)
        c0 = max(0, min(cols.start, int((x - half) * res)) - pad)
        c1 = min(res, max(cols.stop, int(np.ceil((x + half) * res))) + pad)
        window = (slice(r0, r1), slice(c0, c1))
        mine = owner[window] == k + 1
        a = np.where(mine, alpha[window], 0.0)
        w = a[mine] ** 2  # favour the object's interior over its blended edge
        mean_chroma = (chroma[window][mine] * w[:, None]).sum(0) / w.sum()
        colour = shapes.COLOUR_NAMES[int(np.argmin(((_CHROMA - mean_chroma) ** 2).sum(-1)))]
        errors = {}
        for shape, fill in _FILL.items():
            template = shapes.render_alpha(shape, x, y, np.sqrt(mass[k] / fill), res)[window]
            errors[shape] = min(np.abs(_blur(template, sigma) - a).sum() for sigma in BLUR_SIGMAS)
        objects.append({"colour": colour, "shape": min(errors, key=errors.get),
                        "x": float(x), "y": float(y), "mass": float(mass[k])})
    return sorted(objects, key=lambda o: -o["mass"])


def position_of(x, y):
    """Region of a centroid: one of shapes.POSITIONS."""
    dx, dy = x - 0.5, y - 0.5
    if max(abs(dx), abs(dy)) < CENTER_RADIUS:
        return "center"
    if abs(dy) >= abs(dx):
        return "top" if dy < 0 else "bottom"
    return "left" if dx < 0 else "right"


def relation_holds(relation, subject, reference):
    """Whether `subject` is `relation` (e.g. "left of") `reference` (dicts with x, y)."""
    dx, dy = reference["x"] - subject["x"], reference["y"] - subject["y"]  # y points down
    along, across = {"left of": (dx, dy), "right of": (-dx, dy),
                     "above": (dy, dx), "below": (-dy, dx)}[relation]
    return bool(along > abs(across))


def _matches(expected, found, key):
    return sum(e[key] == f[key] for e, f in zip(expected, found))


def check(image, attributes):
    """Per-attribute correctness {"colour", "shape", "count", "position"}: bool or None.

    attributes: the scene dict (or its JSON string) from imagen_jax.data.shapes.
    """
    if isinstance(attributes, str):
        attributes = json.loads(attributes)
    found = detect_objects(image)
    expected = attributes["objects"]
    kind = attributes["kind"]
    if kind == "single":
        if not found:
            return {"colour": False, "shape": False, "count": False, "position": False}
        main, want = found[0], expected[0]
        return {"colour": main["colour"] == want["colour"], "shape": main["shape"] == want["shape"],
                "count": len(found) == 1,
                "position": position_of(main["x"], main["y"]) == attributes["position"]}
    if kind == "count":
        want = expected[0]
        return {"colour": bool(found) and all(o["colour"] == want["colour"] for o in found),
                "shape": bool(found) and all(o["shape"] == want["shape"] for o in found),
                "count": len(found) == attributes["count"], "position": None}
    if kind == "relation":
        # All ordered choices of two distinct detected objects for (subject, reference).
        pairs = list(itertools.permutations(found[:_MAX_CANDIDATES], 2))
        if not pairs:
            return {"colour": False, "shape": False, "count": False, "position": False}
        best = max(pairs, key=lambda p: _matches(expected, p, "colour") + _matches(expected, p, "shape"))
        return {"colour": any(_matches(expected, p, "colour") == 2 for p in pairs),
                "shape": any(_matches(expected, p, "shape") == 2 for p in pairs),
                "count": len(found) == 2,
                "position": relation_holds(attributes["relation"], *best)}
    raise ValueError(f"unknown caption kind {kind!r}")


def aggregate(results):
    """{"attr": {"accuracy": mean over applicable results (None if none), "n": count}}."""
    out = {}
    for attr in ATTRIBUTES:
        values = [r[attr] for r in results if r[attr] is not None]
        out[attr] = {"accuracy": float(np.mean(values)) if values else None, "n": len(values)}
    return out


def chance_levels():
    """Accuracy of a uniform random guess over the dataset's own value sets.

    colour: 1 of 8 colours; shape: 1 of 3; count: 1 of {one, two, three} objects;
    position: 1 of the 5 single-object positions (a relation alone would be 1 of 4).
    """
    return {"colour": 1 / len(shapes.COLOUR_NAMES), "shape": 1 / len(shapes.SHAPES),
            "count": 1 / len(shapes.COUNT_WORDS), "position": 1 / len(shapes.POSITIONS)}


def group_of(attributes, split):
    """Report group: held_out for the held_out split, else single_object / multi_object."""
    if split == "held_out":
        return "held_out"
    return "single_object" if attributes["kind"] == "single" else "multi_object"


def report(images, attributes, splits):
    """The alignment report for images meant to show `attributes` (dicts or JSON strings).

    splits: the dataset split of each example. Returns
    {"single_object": {"colour": {"accuracy", "n"}, ...}, "multi_object": ..., "held_out": ...,
     "chance": {"colour": p, ...}}. single_object / multi_object hold validation or train
    examples by caption kind; held_out holds every held_out-split example (any kind).
    """
    groups = {"single_object": [], "multi_object": [], "held_out": []}
    for image, attrs, split in zip(images, attributes, splits, strict=True):
        attrs = json.loads(attrs) if isinstance(attrs, str) else attrs
        groups[group_of(attrs, split)].append(check(image, attrs))
    out = {name: aggregate(results) for name, results in groups.items()}
    out["chance"] = chance_levels()
    return out
