"""Embedded "shapes" dataset: seeded renders of 1-2 coloured shapes with true captions.

Each image shows one or two objects (6 colours x 3 shapes x 2 sizes) on black; two objects
stand in one of four relations (left of, right of, above, below), never overlap, have
distinct colours and are placed so the relation is unambiguous (see `sample_centres`).
A fixed set of (colour, shape) pairs never appears in train; about 30% of val images
contain one, to measure compositional generalisation.

`write_coco` writes the MS-COCO 2014 caption layout, so the COCO loader reads it unchanged:

    python -m tti.data.shapes --out data/shapes --train 20000 --val 1000 --size 32 --seed 0
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from tti.infra.atomic_file import write_json
from tti.data.shapes_folder import (LOCK_FILE, META_FILE, ShapesFolderError, check_may_write, is_complete,
                                    read_meta, settings)
from tti.infra.run_lock import RunLock

# Saturated colours far apart in RGB, so slightly-off generated colours stay classifiable.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30), "green": (40, 200, 40), "blue": (30, 50, 240),
    "yellow": (240, 220, 30), "purple": (170, 40, 210), "cyan": (30, 210, 220),
}
BACKGROUND: tuple[int, int, int] = (0, 0, 0)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: dict[str, float] = {"small": 0.28, "large": 0.43}  # bounding box side / image side
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
INVERSE_RELATION = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
RELATION_PHRASES = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
# (colour, shape) pairs that never occur in train; each colour and shape still occurs in train.
HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("red", "triangle"), ("green", "square"), ("blue", "circle"), ("yellow", "triangle"))
MARGIN = 0.03  # free border, fraction of the side
GAP = 0.06  # minimum free space between two objects along the relation's axis
MAX_CROSS_OFFSET = 0.5  # offset across the relation's axis, relative to the separation along it
TWO_OBJECT_FRACTION = 0.75
VAL_HELD_OUT_FRACTION = 0.3
SUPERSAMPLE = 4
GENERATOR_VERSION = 1

TWO_OBJECT_TEMPLATES: tuple[str, ...] = (
    "a {a} {rel} a {b}",
    "a {a} is {rel} a {b}",
    "there is a {a} {rel} a {b}",
    "a {a} placed {rel} a {b}",
    "a picture of a {a} {rel} a {b}",
    "{rel} a {b} there is a {a}",
    "a {b} with a {a} {rel} it",
)
ONE_OBJECT_TEMPLATES: tuple[str, ...] = (
    "a {a}",
    "a picture of a {a}",
    "there is a {a}",
    "an image of a single {a}",
)


@dataclass(frozen=True)
class ShapeObject:
    """One object's facts: colour in COLOURS, shape in SHAPES, size in SIZES."""
    colour: str
    shape: str
    size: str

    def phrase(self) -> str:
        return f"{self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """The facts a caption states, in canonical form so equal facts compare equal.

    objects: 1 or 2 ShapeObjects. relation: None for one object, else "left of" or "above",
    read as `objects[0] relation objects[1]` ("A right of B" is stored as "B left of A").
    """
    objects: tuple[ShapeObject, ...]
    relation: str | None = None

    @staticmethod
    def of(a: ShapeObject, relation: str | None = None, b: ShapeObject | None = None) -> "Scene":
        """Scene for "a" alone, or for "a <relation> b" with any relation in RELATIONS."""
        if relation is None and b is None:
            return Scene((a,), None)
        if relation not in RELATIONS or b is None:
            raise ValueError(f"Scene.of: need a relation in {RELATIONS} and a second object, got {relation!r}, {b!r}")
        if relation in ("right of", "below"):
            return Scene((b, a), INVERSE_RELATION[relation])
        return Scene((a, b), relation)


@dataclass(frozen=True)
class Example:
    """One generated image: its scene, object centres (x, y as fractions of the side, y down,
    same order as scene.objects) and its captions."""
    scene: Scene
    centres: tuple[tuple[float, float], ...]
    captions: tuple[str, ...]


def caption_variants(scene: Scene) -> list[str]:
    """Every caption the templates can write for `scene` (both orders for two objects)."""
    if len(scene.objects) == 1:
        return [t.format(a=scene.objects[0].phrase()) for t in ONE_OBJECT_TEMPLATES]
    a, b = scene.objects
    orders = [(a, scene.relation, b), (b, INVERSE_RELATION[scene.relation], a)]
    return [t.format(a=x.phrase(), rel=RELATION_PHRASES[r], b=y.phrase())
            for t in TWO_OBJECT_TEMPLATES for x, r, y in orders]


def _template_regex(template: str) -> re.Pattern:
    obj = r"(small|large) ({}) ({})".format("|".join(COLOURS), "|".join(SHAPES))
    rel = "|".join(re.escape(p) for p in RELATION_PHRASES.values())
    parts = re.split(r"(\{a\}|\{b\}|\{rel\})", template)
    groups = {"{a}": f"(?P<a>{obj})", "{b}": f"(?P<b>{obj})", "{rel}": f"(?P<rel>{rel})"}
    return re.compile("".join(groups.get(p, re.escape(p)) for p in parts))


_PARSERS = [_template_regex(t) for t in TWO_OBJECT_TEMPLATES + ONE_OBJECT_TEMPLATES]
_PHRASE_TO_RELATION = {p: r for r, p in RELATION_PHRASES.items()}


def _object_from(phrase: str) -> ShapeObject:
    size, colour, shape = phrase.split(" ")
    return ShapeObject(colour, shape, size)


def parse_caption(text: str) -> Scene:
    """The canonical Scene of a caption written by any template (case, extra spaces and a
    final '.' ignored); raises ValueError naming the caption if no template matches."""
    if not isinstance(text, str):
        raise ValueError(f"parse_caption: expected a str caption, got {type(text).__name__}")
    norm = " ".join(text.lower().strip().rstrip(".").split())
    for pattern in _PARSERS:
        m = pattern.fullmatch(norm)
        if m is None:
            continue
        a = _object_from(m.group("a"))
        if "rel" not in pattern.groupindex:
            return Scene.of(a)
        return Scene.of(a, _PHRASE_TO_RELATION[m.group("rel")], _object_from(m.group("b")))
    raise ValueError(f"parse_caption: cannot parse shapes caption {text!r}")


def canonical_caption(caption: str) -> str:
    """The caption's facts in the one phrasing whose word order gives the layout: "a A", or
    "a A to the left of a B" / "a A above a B" with A the left/top object. Raises ValueError
    (naming the caption) for a caption no template wrote."""
    scene = parse_caption(caption)
    if scene.relation is None:
        return f"a {scene.objects[0].phrase()}"
    a, b = scene.objects
    return f"a {a.phrase()} {RELATION_PHRASES[scene.relation]} a {b.phrase()}"


def is_held_out(caption: str) -> bool:
    """True when the caption mentions a (colour, shape) pair from HELD_OUT_PAIRS."""
    return any((o.colour, o.shape) in HELD_OUT_PAIRS for o in parse_caption(caption).objects)


def _allowed_pairs(held_out: bool) -> list[tuple[str, str]]:
    return [(c, s) for c in COLOURS for s in SHAPES if ((c, s) in HELD_OUT_PAIRS) == held_out]


def _sample_object(rng: np.random.Generator, pairs: list[tuple[str, str]],
                   exclude_colour: str | None = None) -> ShapeObject:
    pairs = [p for p in pairs if p[0] != exclude_colour]
    colour, shape = pairs[rng.integers(len(pairs))]
    return ShapeObject(colour, shape, ("small", "large")[rng.integers(2)])


def sample_centres(rng: np.random.Generator, scene: Scene) -> tuple[tuple[float, float], ...]:
    """Centres in [0, 1] (fractions of the side) that keep every object inside the margin.

    For two objects, the centres are separated along the relation's axis by both half-sizes
    plus GAP, and offset across it by at most MAX_CROSS_OFFSET of that separation."""
    halves = [SIZES[o.size] / 2 for o in scene.objects]
    if len(scene.objects) == 1:
        lo, hi = MARGIN + halves[0], 1 - MARGIN - halves[0]
        return ((float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))),)
    h1, h2 = halves  # objects[0] is left of / above objects[1]
    d_min, d_max = h1 + h2 + GAP, 1 - 2 * MARGIN - h1 - h2
    d = rng.uniform(d_min, d_max)
    main1 = rng.uniform(MARGIN + h1, 1 - MARGIN - h2 - d)
    cross1 = rng.uniform(MARGIN + h1, 1 - MARGIN - h1)
    lo = max(MARGIN + h2, cross1 - MAX_CROSS_OFFSET * d)
    hi = min(1 - MARGIN - h2, cross1 + MAX_CROSS_OFFSET * d)
    cross2 = rng.uniform(lo, hi)
    first, second = (main1, cross1), (main1 + d, cross2)
    if scene.relation == "above":  # main axis is y
        first, second = first[::-1], second[::-1]
    return ((float(first[0]), float(first[1])), (float(second[0]), float(second[1])))


def _sample_example(rng: np.random.Generator, held_out: bool, captions_per_image: int) -> Example:
    seen, unseen = _allowed_pairs(False), _allowed_pairs(True)
    if rng.random() < TWO_OBJECT_FRACTION:
        # Held out: at least one held-out pair; the other object may be anything.
        first = _sample_object(rng, unseen if held_out else seen)
        others = seen + unseen if held_out else seen
        objs = [first, _sample_object(rng, others, exclude_colour=first.colour)]
        if held_out and rng.random() < 0.5:
            objs.reverse()
        scene = Scene(tuple(objs), ("left of", "above")[rng.integers(2)])
    else:
        scene = Scene((_sample_object(rng, unseen if held_out else seen),))
    variants = caption_variants(scene)
    order = rng.permutation(len(variants))
    captions = tuple(variants[order[i % len(variants)]] for i in range(captions_per_image))
    return Example(scene, sample_centres(rng, scene), captions)


def generate_examples(n: int, split: str = "train", seed: int = 0, captions_per_image: int = 3) -> list[Example]:
    """`n` examples of `split` ("train": seen pairs only; "val": ~30% with a held-out pair).
    Each split has its own random stream, so val does not depend on the train size."""
    if split not in ("train", "val"):
        raise ValueError(f"generate_examples: split must be 'train' or 'val', got {split!r}")
    if n < 0 or captions_per_image < 1:
        raise ValueError(f"generate_examples: need n >= 0 and captions_per_image >= 1, got {n}, {captions_per_image}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0 if split == "train" else 1]))
    examples = []
    for _ in range(n):
        held_out = split == "val" and rng.random() < VAL_HELD_OUT_FRACTION
        examples.append(_sample_example(rng, held_out, captions_per_image))
    return examples


def _coverage(shape: str, xs: np.ndarray, ys: np.ndarray, cx: float, cy: float, half: float) -> np.ndarray:
    """Boolean [len(ys), len(xs)]: which sample points lie inside the shape."""
    dx, dy = xs[None, :] - cx, ys[:, None] - cy
    if shape == "circle":
        return dx * dx + dy * dy <= half * half
    if shape == "square":
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    # Upright isosceles triangle filling its box: apex at the top centre, base at the bottom.
    return (dy <= half) & (np.abs(dx) <= (dy + half) / 2)


def render(objects: Sequence[ShapeObject], centres: Sequence[tuple[float, float]], image_size: int = 32) -> np.ndarray:
    """uint8 [image_size, image_size, 3]: objects drawn at centres (fractions of the side),
    antialiased with SUPERSAMPLE^2 samples per pixel."""
    if image_size < 8:
        raise ValueError(f"render: image_size must be >= 8, got {image_size}")
    img = np.empty((image_size, image_size, 3), np.float32)
    img[:] = BACKGROUND
    for obj, (cx, cy) in zip(objects, centres):
        half = SIZES[obj.size] * image_size / 2
        px, py = cx * image_size, cy * image_size
        x0, x1 = max(int(np.floor(px - half)), 0), min(int(np.ceil(px + half)), image_size)
        y0, y1 = max(int(np.floor(py - half)), 0), min(int(np.ceil(py + half)), image_size)
        xs = x0 + (np.arange((x1 - x0) * SUPERSAMPLE) + 0.5) / SUPERSAMPLE
        ys = y0 + (np.arange((y1 - y0) * SUPERSAMPLE) + 0.5) / SUPERSAMPLE
        inside = _coverage(obj.shape, xs, ys, px, py, half)
        alpha = inside.reshape(y1 - y0, SUPERSAMPLE, x1 - x0, SUPERSAMPLE).mean(axis=(1, 3), dtype=np.float32)
        patch = img[y0:y1, x0:x1]
        patch += alpha[..., None] * (np.asarray(COLOURS[obj.colour], np.float32) - patch)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render_example(example: Example, image_size: int = 32) -> np.ndarray:
    """uint8 [image_size, image_size, 3] image of a generated example."""
    return render(example.scene.objects, example.centres, image_size)


def image_file_name(split: str, image_id: int) -> str:
    return f"{split}2014/COCO_{split}2014_{image_id:012d}.png"


def _meta(n_train: int, n_val: int, image_size: int, seed: int, captions_per_image: int) -> dict:
    return json.loads(json.dumps({
        "generator": "tti.data.shapes", "version": GENERATOR_VERSION, "n_train": n_train, "n_val": n_val,
        "image_size": image_size, "seed": seed, "captions_per_image": captions_per_image,
        "colours": COLOURS, "background": BACKGROUND, "shapes": SHAPES, "sizes": SIZES,
        "relations": RELATIONS, "held_out_pairs": HELD_OUT_PAIRS, "margin": MARGIN, "gap": GAP,
        "max_cross_offset": MAX_CROSS_OFFSET, "two_object_fraction": TWO_OBJECT_FRACTION,
        "val_held_out_fraction": VAL_HELD_OUT_FRACTION, "supersample": SUPERSAMPLE,
        "two_object_templates": TWO_OBJECT_TEMPLATES, "one_object_templates": ONE_OBJECT_TEMPLATES}))


def _split_ids(split: str, n: int) -> range:
    # Disjoint image (and annotation) id ranges, as in real COCO; val ids do not depend on n_train.
    base = 0 if split == "train" else 1_000_000_000
    return range(base + 1, base + n + 1)


def _output_files(meta: dict) -> list[str]:
    files = ["annotations/captions_train2014.json", "annotations/captions_val2014.json", "held_out_pairs.json"]
    return files + [image_file_name(s, i) for s, n in (("train", meta["n_train"]), ("val", meta["n_val"]))
                    for i in _split_ids(s, n)]


def _complete(out_dir: str, meta: dict) -> bool:
    old = read_meta(out_dir)
    if old is None or not is_complete(old) or settings(old) != meta:
        return False
    return all(os.path.exists(os.path.join(out_dir, p)) for p in _output_files(meta))


def write_coco(out_dir: str, n_train: int = 20000, n_val: int = 1000, image_size: int = 32, seed: int = 0,
               captions_per_image: int = 3, replace: bool = False) -> None:
    """Write the dataset in MS-COCO 2014 caption layout under out_dir (nothing to do if it is
    complete with these settings): annotations/captions_{train,val}2014.json,
    {train,val}2014/COCO_{split}2014_%012d.png (uint8 RGB), held_out_pairs.json, meta.json.

    Raises ShapesFolderError before any write unless `check_may_write` allows out_dir.
    meta.json is written first, marked incomplete, so a killed run is redone by the next call;
    files are renamed into place. One process at a time writes a folder; others wait for it.
    """
    if image_size not in (32, 64, 128):
        raise ValueError(f"write_coco: image_size must be 32, 64 or 128, got {image_size}")
    meta = _meta(n_train, n_val, image_size, seed, captions_per_image)
    check_may_write(out_dir, meta, replace)  # before anything is created
    if _complete(out_dir, meta):
        return
    with RunLock(out_dir, LOCK_FILE).acquire(wait_s=math.inf):  # e.g. one process per node, shared disk
        old = check_may_write(out_dir, meta, replace)  # another process may have written it meanwhile
        if _complete(out_dir, meta):
            return
        if old is not None:  # replacing: drop the old images the new settings will not write
            for name in set(_output_files(old)) - set(_output_files(meta)):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(out_dir, name))
        write_json(os.path.join(out_dir, META_FILE), {**meta, "complete": False})
        _write_files(out_dir, meta)
        write_json(os.path.join(out_dir, META_FILE), {**meta, "complete": True})


def _write_files(out_dir: str, meta: dict) -> None:
    """Render both splits of `meta`'s settings and write their PNGs and annotation files."""
    from PIL import Image
    from tqdm import tqdm

    n_train, n_val, image_size = meta["n_train"], meta["n_val"], meta["image_size"]
    os.makedirs(os.path.join(out_dir, "annotations"), exist_ok=True)
    splits = {s: generate_examples(n, s, meta["seed"], meta["captions_per_image"])
              for s, n in (("train", n_train), ("val", n_val))}
    bar = tqdm(total=n_train + n_val, desc=f"shapes -> {out_dir}", unit="img")
    for split, examples in splits.items():
        ann_id = _split_ids(split, 0).start - 1  # annotation ids use the split's disjoint range too
        os.makedirs(os.path.join(out_dir, f"{split}2014"), exist_ok=True)
        images, annotations = [], []
        for image_id, example in zip(_split_ids(split, len(examples)), examples):
            name = image_file_name(split, image_id)
            path = os.path.join(out_dir, name)
            Image.fromarray(render_example(example, image_size)).save(path + ".tmp", format="PNG")
            os.replace(path + ".tmp", path)
            images.append({"id": image_id, "file_name": os.path.basename(name), "height": image_size,
                           "width": image_size})
            for caption in example.captions:
                ann_id += 1
                annotations.append({"id": ann_id, "image_id": image_id, "caption": caption})
            bar.update(1)
        info = {"description": f"tti shapes dataset ({split}), generated by tti.data.shapes",
                "version": str(GENERATOR_VERSION), "year": 2014}
        write_json(os.path.join(out_dir, "annotations", f"captions_{split}2014.json"),
                   {"info": info, "images": images, "annotations": annotations, "licenses": []})
    bar.close()
    write_json(os.path.join(out_dir, "held_out_pairs.json"), [list(p) for p in HELD_OUT_PAIRS])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the embedded shapes dataset in COCO 2014 layout.")
    parser.add_argument("--out", default="data/shapes")
    parser.add_argument("--train", type=int, default=20000)
    parser.add_argument("--val", type=int, default=1000)
    parser.add_argument("--size", type=int, default=32, choices=(32, 64, 128))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--captions-per-image", type=int, default=3)
    parser.add_argument("--replace", action="store_true",
                        help="replace a shapes dataset made with other settings in --out (never "
                             "a folder the generator did not write)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    write_coco(args.out, args.train, args.val, args.size, args.seed, args.captions_per_image,
               replace=args.replace)
    print(f"shapes dataset ready in {args.out} ({time.perf_counter() - start:.1f}s)")


if __name__ == "__main__":
    from tti.infra.cli import run_cli
    run_cli(main)
