"""Exact caption judge for the embedded shapes dataset: does an image show what its caption says?

Per image:
1. Background = per-channel median of the 1-pixel frame (BACKGROUND if that is nearer a
   palette colour, i.e. an object covers the frame).
2. Each pixel takes the palette colour whose segment background->colour passes nearest, so
   anti-aliased edges and darker or lighter shades keep their hue; pixels far from every
   segment are "unknown". A pixel is "strong" when at least half way along its segment.
3. Objects are the 8-connected components of strong pixels of one colour with area >=
   MIN_AREA_FRACTION of the image. Each object's soft coverage map (its pixels plus the faint
   ring around them, scaled by the object's own brightness) gives width/height = largest
   row/column sum, fill = area / (width * height) (square 1, circle 0.785, triangle 0.5),
   skew = third moment along y or x (a triangle's mass sits towards its base), centroid.
4. Caption objects are matched to the largest objects of their colour.

Verdicts: colour = every stated colour has an object; shape / size = every matched object has
the stated shape / size (False when one is missing); relation = both objects found and the
centroid offset along the stated axis has the right sign, dominates the offset across it and
is at least half the touching distance (None for one-object captions); all = every fact right
AND no extra object (one that no caption object matched, e.g. a second shape beside a
one-object caption).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

from tti.data.shapes import BACKGROUND, COLOURS, SIZES, is_held_out, parse_caption

_PALETTE = np.asarray(list(COLOURS.values()), np.float32)  # [K, 3]
_COLOUR_NAMES = list(COLOURS)
MAX_SEGMENT_DISTANCE = 65.0  # about half the smallest gap between two palette segments
MAX_BRIGHTNESS = 1.5  # segments run past the palette colour: brighter shades keep their hue
MIN_AREA_FRACTION = 0.3 * 0.5 * SIZES["small"] ** 2  # 30% of the smallest object (small triangle)
# Extent (max(width, height) / image side) bands for each size; small/large split at the geometric mean.
_SPLIT = float(np.sqrt(SIZES["small"] * SIZES["large"]))
SIZE_BANDS = {"small": (0.6 * SIZES["small"], _SPLIT), "large": (_SPLIT, 1.4 * SIZES["large"])}
MAX_ASPECT = 1.4  # width/height beyond this is no circle, square or triangle
# Fill = area / (width * height); measured at 32 px: triangle 0.54-0.67, circle 0.78-0.82, square 1.0.
TRIANGLE_MAX_FILL, CIRCLE_MIN_FILL, SQUARE_MIN_FILL, SQUARE_MAX_FILL = 0.82, 0.7, 0.89, 1.15
# |skew| of the coverage along y or x: an upright triangle ~0.57, circle and square ~0.
TRIANGLE_MIN_SKEW, ROUND_MAX_SKEW = 0.3, 0.2


def to_hwc_uint8(image) -> np.ndarray:
    """uint8 [H, W, 3] numpy from a square uint8 [H, W, 3] or [3, H, W] numpy array or torch tensor."""
    if hasattr(image, "detach"):  # torch tensor, without importing torch here
        image = image.detach().cpu().numpy()
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"judge: image must be uint8 in [0, 255], got dtype {image.dtype}")
    if image.ndim != 3 or 3 not in (image.shape[0], image.shape[-1]):
        raise ValueError(f"judge: image must be [H, W, 3] or [3, H, W], got shape {tuple(image.shape)}")
    if image.shape[-1] != 3:
        image = np.ascontiguousarray(image.transpose(1, 2, 0))
    if image.shape[0] != image.shape[1] or image.shape[0] < 16:
        raise ValueError(f"judge: image must be square and at least 16 px, got shape {tuple(image.shape)}")
    return image


def _background(x: np.ndarray) -> np.ndarray:
    """Step 1 of the module docstring: the background colour [3]."""
    bg = np.median(np.concatenate([x[0], x[-1], x[1:-1, 0], x[1:-1, -1]]), axis=0)
    default = np.asarray(BACKGROUND, np.float32)
    return bg if np.linalg.norm(bg - default) < np.linalg.norm(_PALETTE - bg, axis=1).min() else default


def _classify_pixels(img: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pixel: nearest palette index (-1 unknown) [H, W], unclipped position along each
    colour's segment t [H, W, K] and segment distance [H, W, K]."""
    x = img.astype(np.float32)
    bg = _background(x)
    d = _PALETTE - bg  # [K, 3]
    rel = x - bg  # [H, W, 3]
    t = rel @ d.T / np.maximum((d * d).sum(1), 1.0)  # [H, W, K]
    closest = np.clip(t, 0.0, MAX_BRIGHTNESS)[..., None] * d  # [H, W, K, 3]
    dist = np.linalg.norm(rel[..., None, :] - closest, axis=-1)
    label = dist.argmin(-1)
    label[np.take_along_axis(dist, label[..., None], -1)[..., 0] > MAX_SEGMENT_DISTANCE] = -1
    return label, t, dist


def _measure(component: np.ndarray, k: int, t: np.ndarray, dist: np.ndarray, strong_other: np.ndarray) -> dict:
    """Geometry of one object from its soft coverage map."""
    tk = t[..., k]
    brightness = max(float(np.percentile(tk[component], 80)), 0.5)  # the object's own shade
    ring = ndimage.binary_dilation(component, np.ones((3, 3), bool)) & ~component & ~strong_other
    ring &= dist[..., k] <= MAX_SEGMENT_DISTANCE
    alpha = np.where(component | ring, np.clip(tk / brightness, 0.0, 1.0), 0.0)
    area = float(alpha.sum())
    width, height = float(alpha.sum(1).max()), float(alpha.sum(0).max())
    ys, xs = np.indices(alpha.shape, dtype=np.float64)
    cy, cx = float((alpha * ys).sum() / area), float((alpha * xs).sum() / area)

    def skew(coord: np.ndarray, centre: float) -> float:
        var = float((alpha * (coord - centre) ** 2).sum() / area)
        return float((alpha * (coord - centre) ** 3).sum() / area) / max(var, 1e-6) ** 1.5

    return {"area": area, "width": width, "height": height, "cx": cx, "cy": cy,
            "fill": area / max(width * height, 1e-6), "skew": max(abs(skew(ys, cy)), abs(skew(xs, cx)))}


def classify_shape(m: dict) -> str | None:
    """'circle' / 'square' / 'triangle' from measured fill, skew and aspect; None if none fits."""
    aspect = m["width"] / max(m["height"], 1e-6)
    if not 1 / MAX_ASPECT <= aspect <= MAX_ASPECT:
        return None
    if m["skew"] >= TRIANGLE_MIN_SKEW:
        return "triangle" if m["fill"] < TRIANGLE_MAX_FILL else None
    if m["skew"] > ROUND_MAX_SKEW:
        return None
    if CIRCLE_MIN_FILL <= m["fill"] < SQUARE_MIN_FILL:
        return "circle"
    return "square" if SQUARE_MIN_FILL <= m["fill"] <= SQUARE_MAX_FILL else None


def classify_size(m: dict, image_side: int) -> str | None:
    """'small' / 'large' from max(width, height) / image side; None if outside both bands."""
    extent = max(m["width"], m["height"]) / image_side
    for name, (lo, hi) in SIZE_BANDS.items():
        if lo <= extent < hi:
            return name
    return None


def find_objects(image) -> list[dict]:
    """Every plausible object in a shapes image, largest first within each colour.

    image: uint8 [H, W, 3] or [3, H, W]. Each object: colour, shape, size (None when no class
    fits), area (pixels), width, height, cx, cy (pixels), fill, skew.
    """
    img = to_hwc_uint8(image)
    label, t, dist = _classify_pixels(img)
    strong = (label >= 0) & (np.take_along_axis(t, np.maximum(label, 0)[..., None], -1)[..., 0] >= 0.5)
    min_area = MIN_AREA_FRACTION * img.shape[0] * img.shape[1]
    objects = []
    for k, name in enumerate(_COLOUR_NAMES):
        mine = strong & (label == k)
        components, n = ndimage.label(mine, np.ones((3, 3), bool))
        sizes = np.bincount(components.ravel(), minlength=n + 1)[1:]
        for idx in np.argsort(-sizes, kind="stable"):
            if sizes[idx] < min_area:
                break
            m = _measure(components == idx + 1, k, t, dist, strong & ~mine)
            m.update(colour=name, shape=classify_shape(m), size=classify_size(m, img.shape[0]))
            objects.append(m)
    return objects


def _relation_holds(a: dict, b: dict, relation: str) -> bool:
    """`a relation b` for relation in ('left of', 'above'), on centroids."""
    main, cross, extent = ("cx", "cy", "width") if relation == "left of" else ("cy", "cx", "height")
    offset = b[main] - a[main]
    return offset > abs(b[cross] - a[cross]) and offset >= 0.5 * (a[extent] + b[extent]) / 2


RELATION_OUTCOMES = ("correct", "swapped", "other axis", "too close", "missing")


def relation_outcome(verdict: dict, caption: str) -> str | None:
    """What a two-object image did with its caption's relation, from judge_image's verdict.

    "correct": the relation holds; "swapped": the objects stand on the stated axis in the
    opposite order (the model knows "left of" is horizontal, not which object goes where);
    "other axis": apart mainly along the other axis; "too close": right direction, not clearly
    apart; "missing": an object of a stated colour was not found. None for one-object captions.
    """
    scene = parse_caption(caption)
    if scene.relation is None:
        return None
    a, b = verdict["objects"]
    if a is None or b is None:
        return "missing"
    if verdict["relation"]:
        return "correct"
    main, cross = ("cx", "cy") if scene.relation == "left of" else ("cy", "cx")
    d_main, d_cross = b[main] - a[main], b[cross] - a[cross]
    if abs(d_cross) >= abs(d_main):
        return "other axis"
    return "too close" if d_main > 0 else "swapped"


def judge_image(image, caption: str) -> dict:
    """Judge one image against one shapes caption (ValueError if the caption does not parse).

    image: square uint8 [H, W, 3] numpy, or uint8 [3, H, W] numpy or torch tensor; side >= 16
    (32/64/128 tested). Returns {"colour", "shape", "size": bool, "relation": bool or None
    (one-object caption), "all": bool, "extra_objects": int, "objects": the matched
    measurements (None if missing)}.
    """
    scene = parse_caption(caption)
    found = find_objects(image)
    pools = {c: [o for o in found if o["colour"] == c] for c in COLOURS}
    matched = []
    for obj in scene.objects:
        pool = pools[obj.colour]
        matched.append(pool.pop(0) if pool else None)
    colour = all(m is not None for m in matched)
    shape = colour and all(m["shape"] == o.shape for m, o in zip(matched, scene.objects))
    size = colour and all(m["size"] == o.size for m, o in zip(matched, scene.objects))
    relation = None
    if scene.relation is not None:
        relation = colour and _relation_holds(matched[0], matched[1], scene.relation)
    extra = sum(len(p) for p in pools.values())
    return {"colour": colour, "shape": shape, "size": size, "relation": relation,
            "all": colour and shape and size and relation is not False and extra == 0,
            "extra_objects": extra, "objects": matched}


def _accuracies(verdicts: list[dict]) -> dict:
    rel = [v["relation"] for v in verdicts if v["relation"] is not None]
    out = {"count": len(verdicts), "relation_count": len(rel)}
    for key in ("colour", "shape", "size", "all"):
        out[key] = float(np.mean([v[key] for v in verdicts])) if verdicts else None
    out["relation"] = float(np.mean(rel)) if rel else None
    return out


def judge_batch(images, captions: Sequence[str]) -> dict:
    """Accuracy of each fact over a batch, overall and split by seen / held-out captions.

    images: uint8 [B, H, W, 3] or [B, 3, H, W] (numpy or torch), or a sequence of images as
    judge_image takes them; captions: B shapes captions. Returns {"colour", "shape", "size",
    "relation" (two-object captions only), "all": float in [0, 1] (None when there is nothing
    to count); "count", "relation_count": int; "seen", "held_out": {the same keys}}.
    """
    if len(images) != len(captions):
        raise ValueError(f"judge_batch: {len(images)} images but {len(captions)} captions")
    return summarize_verdicts([judge_image(img, cap) for img, cap in zip(images, captions)],
                              captions)


def summarize_verdicts(verdicts: Sequence[dict], captions: Sequence[str]) -> dict:
    """judge_batch's result from judge_image verdicts already made for these captions (for
    callers that also need the per-image verdicts, without judging twice)."""
    if len(verdicts) != len(captions):
        raise ValueError(f"summarize_verdicts: {len(verdicts)} verdicts but {len(captions)} captions")
    held = [is_held_out(c) for c in captions]
    out = _accuracies(verdicts)
    out["seen"] = _accuracies([v for v, h in zip(verdicts, held) if not h])
    out["held_out"] = _accuracies([v for v, h in zip(verdicts, held) if h])
    return out
