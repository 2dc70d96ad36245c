"""A small COCO-2014-like caption set, written by code (no committed binaries).

    from coco_fixture import write_coco_fixture       # tests/ is on sys.path under pytest
    fixture = write_coco_fixture(tmp_path / "coco")   # ~0.5 s; fixture.root is the COCO root
    python tests/coco_fixture.py /tmp/coco            # the same from a shell

Layout and fields as the real files: annotations/captions_{train,val}2014.json with info,
licenses, images (license, file_name, coco_url, height, width, date_captured, flickr_url,
id) and annotations (image_id, id, caption); train2014/ and val2014/ with
COCO_<split>_<id:012d>.jpg files. Each image is a plain background with two flat shapes
(left and right, of named colours) that its five captions describe, so a model has
something to learn. Sparse large ids, COCO's sizes and aspect ratios, and the oddities
real COCO has, each in one named image (`Fixture.odd`):

    long_caption      one caption of ~300 tokens, longer than any text.max_length here
    non_ascii         one caption with accents, a typographic apostrophe and an emoji
    grayscale         JPEGs stored in mode L (train: 2, val: 1)
    cmyk              a CMYK JPEG
    exif_rotated      pixels stored rotated, with an EXIF Orientation tag (6) that uprights them
    png_as_jpg        a PNG file under a .jpg name
    no_caption        an image listed in "images" with no annotation
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# (width, height) of COCO photos: 640 on the long side mostly, landscape and portrait.
SIZES = [(640, 480), (480, 640), (640, 427), (500, 375), (612, 612), (427, 640), (640, 360),
         (375, 500), (640, 512), (333, 500)]
COLOURS = {"red": (210, 40, 35), "green": (40, 160, 60), "blue": (35, 70, 200),
           "yellow": (235, 205, 40), "purple": (130, 50, 160), "orange": (240, 130, 30)}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = {"grey": (128, 128, 128), "white": (235, 235, 230), "dark": (40, 40, 45)}
LICENSES = [
    (1, "Attribution-NonCommercial-ShareAlike License", "by-nc-sa"),
    (2, "Attribution-NonCommercial License", "by-nc"),
    (3, "Attribution-NonCommercial-NoDerivs License", "by-nc-nd"),
    (4, "Attribution License", "by"),
    (5, "Attribution-ShareAlike License", "by-sa"),
    (6, "Attribution-NoDerivs License", "by-nd"),
]
# Which image of a split carries which oddity (split -> {oddity: position in the split}).
ODDITIES = {
    "train2014": {"long_caption": 0, "non_ascii": 1, "grayscale": (2, 3), "cmyk": 4,
                  "exif_rotated": 5, "png_as_jpg": 6, "no_caption": 7},
    "val2014": {"grayscale": (0,), "non_ascii": 1},
}
EXIF_ORIENTATION = 0x0112
ROTATED_90_CW = 6  # "rotate the stored pixels 90 degrees clockwise to view them"


@dataclass(frozen=True)
class Scene:
    """What one image shows: two shapes left and right on a background."""

    left: tuple[str, str]   # (colour, shape)
    right: tuple[str, str]
    background: str
    size: tuple[int, int]   # upright (width, height)
    grayscale: bool = False


@dataclass
class Fixture:
    """Where the fixture is and what is in it."""

    root: Path
    scenes: dict = field(default_factory=dict)     # image id -> Scene
    odd: dict = field(default_factory=dict)        # oddity -> image id (or list of ids)
    captions: dict = field(default_factory=dict)   # image id -> its captions as written
    splits: dict = field(default_factory=dict)     # split -> image ids in file order

    def path(self, image_id: int) -> Path:
        split = next(s for s, ids in self.splits.items() if image_id in ids)
        return self.root / split / file_name(split, image_id)

    def all_captions(self) -> list[str]:
        return [c for captions in self.captions.values() for c in captions]


def file_name(split: str, image_id: int) -> str:
    return f"COCO_{split}_{image_id:012d}.jpg"


def render(scene: Scene) -> Image.Image:
    """The upright RGB picture of `scene` (grayscale scenes are converted when saved).
    The shapes sit in the centred square, so a centre crop keeps both."""
    width, height = scene.size
    img = Image.new("RGB", scene.size, BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    side = min(width, height)
    x0, y0, r = (width - side) / 2, (height - side) / 2, side * 0.16
    for (colour, shape), fx in ((scene.left, 0.28), (scene.right, 0.72)):
        cx, cy = x0 + fx * side, y0 + 0.5 * side
        box = [cx - r, cy - r, cx + r, cy + r]
        fill = COLOURS[colour]
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    return img


def captions_for(scene: Scene) -> list[str]:
    """Five captions of uneven length, phrased as COCO annotators do (one with a trailing space)."""
    (c1, s1), (c2, s2), bg = scene.left, scene.right, scene.background
    if scene.grayscale:
        c1 = c2 = "grey"
    return [
        f"A {c1} {s1} to the left of a {c2} {s2}.",
        f"{c2.capitalize()} {s2} and {c1} {s1}.",
        f"Two shapes on a {bg} background: a {c1} {s1} on the left and a {c2} {s2} on the right.",
        f"a {c1} {s1} next to a {c2} {s2} ",
        f"There is a {c2} {s2} to the right of the {c1} {s1}, both drawn flat on a plain {bg} "
        f"backdrop with nothing else in view" + (", in black and white." if scene.grayscale else "."),
    ]


def long_caption(scene: Scene) -> str:
    (c1, s1), (c2, s2) = scene.left, scene.right
    clause = (f"the {c1} {s1} on the left side of the picture is a little closer to the edge "
              f"than the {c2} {s2} on the right side, and ")
    return f"In this picture {clause * 12}that is all there is to see."


def non_ascii_caption(scene: Scene) -> str:
    (c1, s1), (c2, s2) = scene.left, scene.right
    return f"Un {s1} {c1} à gauche d’un {s2} {c2} — naïve café ☕ ({c1} {s1}, {c2} {s2})"


def write_coco_fixture(root, n_train: int = 24, n_val: int = 8, seed: int = 0) -> Fixture:
    """Write the fixture into `root` (new or empty folder); returns what is where.
    n_train >= 8 and n_val >= 2 leave room for every oddity. Same seed, same bytes."""
    root = Path(root)
    if n_train < 8 or n_val < 2:
        raise ValueError(f"need n_train >= 8 and n_val >= 2, got {n_train} and {n_val}")
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root}: not empty; the fixture is written into a new folder")
    rng = np.random.default_rng(seed)
    # Sparse, large, unsorted ids, unique across splits, as in COCO 2014.
    image_ids = rng.choice(np.arange(9, 581_930), size=n_train + n_val, replace=False).tolist()
    caption_ids = iter(rng.choice(np.arange(48, 829_718), size=5 * (n_train + n_val),
                                  replace=False).tolist())
    fixture = Fixture(root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split, ids in (("train2014", image_ids[:n_train]), ("val2014", image_ids[n_train:])):
        (root / split).mkdir()
        odd = ODDITIES[split]
        entries, annotations = [], []
        for position, image_id in enumerate(ids):
            scene = _random_scene(rng, position, grayscale=position in odd.get("grayscale", ()))
            kind = next((k for k, v in odd.items() if v == position), None)
            _save_image(render(scene), root / split / file_name(split, image_id), kind, scene)
            fixture.scenes[image_id] = scene
            entries.append(_image_entry(split, image_id, root / split / file_name(split, image_id), rng))
            captions = captions_for(scene)
            if kind == "long_caption":
                captions[4] = long_caption(scene)
            if kind == "non_ascii":
                captions[1] = non_ascii_caption(scene)
            if kind == "no_caption":
                captions = []
            fixture.captions[image_id] = captions
            annotations += [{"image_id": image_id, "id": next(caption_ids), "caption": c}
                            for c in captions]
        for kind, position in odd.items():
            many = isinstance(position, tuple)
            fixture.odd[f"{split}/{kind}"] = [ids[p] for p in position] if many else ids[position]
        fixture.splits[split] = ids
        rng.shuffle(annotations)  # COCO lists captions in no particular order
        _write_json(root / "annotations" / f"captions_{split}.json", {
            "info": {"description": "COCO-like test fixture (tti tests/coco_fixture.py)",
                     "url": "http://cocodataset.org", "version": "1.0", "year": 2014,
                     "contributor": "tti tests", "date_created": "2017/09/01"},
            "images": entries,
            "licenses": [{"url": f"http://creativecommons.org/licenses/{slug}/2.0/", "id": i,
                          "name": name} for i, name, slug in LICENSES],
            "annotations": annotations})
    return fixture


def _random_scene(rng, position: int, grayscale: bool) -> Scene:
    colours, shapes = list(COLOURS), list(SHAPES)
    left_colour, right_colour = rng.choice(len(colours), size=2, replace=False)
    return Scene(left=(colours[left_colour], shapes[rng.integers(len(shapes))]),
                 right=(colours[right_colour], shapes[rng.integers(len(shapes))]),
                 background=list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))],
                 size=SIZES[position % len(SIZES)], grayscale=grayscale)


def _save_image(img: Image.Image, path: Path, kind: str | None, scene: Scene) -> None:
    if scene.grayscale:
        img.convert("L").save(path, "JPEG", quality=90)
    elif kind == "cmyk":
        img.convert("CMYK").save(path, "JPEG", quality=90)
    elif kind == "png_as_jpg":
        img.save(path, "PNG")
    elif kind == "exif_rotated":
        # Stored turned a quarter counter-clockwise; the tag says to turn it back clockwise.
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = ROTATED_90_CW
        img.transpose(Image.Transpose.ROTATE_90).save(path, "JPEG", quality=90, exif=exif)
    else:
        img.save(path, "JPEG", quality=90)


def _image_entry(split: str, image_id: int, path: Path, rng) -> dict:
    with Image.open(path) as stored:  # the stored size, as COCO lists it
        width, height = stored.size
    day, second = int(rng.integers(1, 29)), int(rng.integers(0, 86_400))
    return {"license": int(rng.integers(1, len(LICENSES) + 1)), "file_name": file_name(split, image_id),
            "coco_url": f"http://images.cocodataset.org/{split}/{file_name(split, image_id)}",
            "height": height, "width": width,
            "date_captured": f"2013-11-{day:02d} {second // 3600:02d}:{second // 60 % 60:02d}:{second % 60:02d}",
            "flickr_url": f"http://farm{image_id % 9 + 1}.staticflickr.com/{image_id % 9000}/"
                          f"{image_id}_{image_id * 7919 % 10**10:010x}_z.jpg",
            "id": image_id}


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Write the COCO-like test fixture.")
    parser.add_argument("root", help="new or empty folder")
    parser.add_argument("--train", type=int, default=24, help="training images (>= 8)")
    parser.add_argument("--val", type=int, default=8, help="validation images (>= 2)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        fixture = write_coco_fixture(args.root, args.train, args.val, args.seed)
    except (OSError, ValueError) as e:
        sys.exit(f"coco_fixture: {e}")
    print(f"{fixture.root}: {args.train} train + {args.val} val images, "
          f"{len(fixture.all_captions())} captions; oddities {fixture.odd}")


if __name__ == "__main__":
    main()
