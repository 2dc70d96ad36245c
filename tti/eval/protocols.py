"""FID protocols: which generated images are compared with which real ones, and how both reach
the Inception. Papers' COCO numbers differ in all three, and users mix them up, so each
protocol has a name that `tti.export` and `tti.evaluate` take (`--protocol`) and every FID
records (docs/training_on_coco.md, "Which FID is which").

    pairs         the export's n generated images against the same n val images as training
                  saw them (the packed cache), clean-fid's resize: tti's default, and what the
                  in-training FID computes.
    coco-fid30k   the U-ViT / LDM COCO 256 table's: 30,000 generated images, one per val2014
                  image drawn at random with one of its captions (seeded), against every
                  val2014 image (40,504) prepared as U-ViT's datasets.center_crop does
                  (reference_image); pytorch-fid's resize, as U-ViT's tools/fid_score.py.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from tti.data.prepare import load_annotations
from tti.eval.metrics import fid
from tti.infra.cli import UserError


@dataclass(frozen=True)
class Protocol:
    """n: generated images (None: the export's --n); image_size: the side generated images
    must have (None: any); reference: "pairs" (the export's gt images) or "split" (every
    image of the val split, prepared by `reference_image`); resize: how FID reaches 299."""
    name: str
    n: int | None
    image_size: int | None
    reference: str
    resize: str
    description: str


PAIRS = Protocol("pairs", None, None, "pairs", fid.DEFAULT_RESIZE,
                 "the export's generated images against the same val images as training saw them")
COCO_FID30K = Protocol("coco-fid30k", 30_000, 256, "split", "pytorch-fid",
                       "30,000 val captions (one per image, seeded) against every val image "
                       "centre-cropped (integer offsets) and resized to 256 with PIL Lanczos, "
                       "as U-ViT's COCO evaluation")
PROTOCOLS = {p.name: p for p in (PAIRS, COCO_FID30K)}


class ProtocolError(UserError, ValueError):
    """An export or evaluation that cannot follow the protocol asked for."""


def check_image_size(protocol: Protocol, image_size: int) -> None:
    if protocol.image_size is not None and image_size != protocol.image_size:
        raise ProtocolError(f"--protocol {protocol.name} compares {protocol.image_size}x"
                            f"{protocol.image_size} images; this model makes {image_size}x"
                            f"{image_size}")


def reference_image(path, size: int) -> np.ndarray:
    """uint8 [size, size, 3] of one image file as U-ViT prepares COCO: PIL's RGB conversion
    (no EXIF rotation), the centred square of side min(H, W) at integer offsets, resized with
    PIL Lanczos. tti's packed cache (tti/data/prepare.py) differs by up to half a pixel in the
    crop and applies EXIF orientation, so the reference is made here, from the JPEGs."""
    array = fid.read_rgb(path)
    h, w = array.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = Image.fromarray(array[top:top + side, left:left + side])
    return np.asarray(square.resize((size, size), Image.Resampling.LANCZOS))


def split_images(data_root: str, split: str) -> list[str]:
    """Every image the split's caption file lists (with a caption or not), in id order."""
    annotations = Path(data_root) / "annotations" / f"captions_{split}.json"
    images = load_annotations(annotations).dataset["images"]
    paths = [str(Path(data_root) / split / im["file_name"]) for im in sorted(images, key=lambda im: im["id"])]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise ProtocolError(f"{len(missing)} of the {len(paths)} images {annotations} lists are "
                            f"missing (e.g. {missing[0]}): the reference needs all of them")
    return paths


def reference_stats(protocol: Protocol, data_root: str, split: str, device: str = "cpu",
                    batch_size: int = 50, cache_dir: str | None = fid.DEFAULT_CACHE_DIR,
                    num_workers: int = 0, progress: bool = True) -> tuple[np.ndarray, np.ndarray, int]:
    """(mu, sigma, number of images) of the protocol's reference: every image of `split`
    under `data_root`, prepared by reference_image, through the protocol's resize. Cached in
    `cache_dir` as fid_reference_<protocol>_<split>_<size>px_<key>.npz, the key covering the
    files (names, sizes, times), the crop, the resize and the network (about 34 MB)."""
    paths = split_images(data_root, split)
    size, resize = protocol.image_size, protocol.resize
    salt = f"{protocol.name}|uvit-centre-crop-lanczos|{size}|{resize}|{fid.INCEPTION_FILE}"
    name = f"fid_reference_{protocol.name}_{split}_{size}px_{fid.image_set_key(paths, salt)[:20]}.npz"
    cache = os.path.join(os.path.expanduser(cache_dir), name) if cache_dir else None
    mu, sigma = fid.files_stats(paths, resize, cache, batch_size, device, num_workers, progress,
                                functools.partial(reference_image, size=size))
    return mu, sigma, len(paths)
