"""Pack a COCO-format caption split into a uint8 image cache, decoding every image once.

Input: `<root>/annotations/captions_<split>.json` and the images in `<root>/<split>/`.
Output, in `<cache_dir>` (default `<root>/cache`):

    <split>_<S>px.npy    uint8 [N, 3, S, S] RGB, short side resized to S (Lanczos) and
                         centre-cropped: the aspect ratio is never distorted
    <split>_<S>px.json   per row: image_id, file_name and ALL its captions, plus skip counts

A killed run resumes from `*.partial.npy` + `*.progress.json`; the `.npy` appears only at
the end, by one atomic rename, so if it exists the cache is complete.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from pycocotools.coco import COCO
from tqdm import tqdm

from tti.infra.atomic_file import write_json
from tti.infra.cli import UserError
from tti.infra.run_lock import RunLock

log = logging.getLogger(__name__)

# Bump when the pixels a cache holds would change (decoding, resize, crop); old caches restart.
CACHE_FORMAT = 1
NUM_EXAMPLES = 5  # bad items the log and error messages name
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


class AnnotationError(UserError, ValueError):
    """A caption annotation file that cannot be read as COCO (names the file and position)."""


class BadDataError(UserError, RuntimeError):
    """Too many unreadable images, or no usable image at all."""


@dataclass(frozen=True)
class CachePaths:
    """Where one (split, image size) cache lives; `images` exists only once it is complete."""

    images: Path
    index: Path
    partial: Path
    progress: Path
    compact: Path
    lock: Path

    def complete(self) -> bool:
        return self.images.exists() and self.index.exists()


def cache_paths(root, split: str, image_size: int, cache_dir=None) -> CachePaths:
    """File names of the cache for `split` at `image_size` (default folder `<root>/cache`)."""
    folder = Path(cache_dir) if cache_dir is not None else Path(root) / "cache"
    stem = f"{split}_{image_size}px"
    return CachePaths(*(folder / f"{stem}{ext}" for ext in (
        ".npy", ".json", ".partial.npy", ".progress.json", ".compact.npy", ".lock")))


def load_annotations(path) -> COCO:
    """Read a COCO caption file; a malformed, truncated or incomplete one raises
    AnnotationError naming the file (and a JSON error's line, column and offset)."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")  # tolerate a byte-order mark
    except FileNotFoundError:
        raise AnnotationError(f"annotation file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise AnnotationError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        hint = " (the file ends early: truncated?)" if e.pos >= len(text.rstrip()) else ""
        raise AnnotationError(
            f"{path}: invalid JSON at line {e.lineno}, column {e.colno} "
            f"(char {e.pos} of {len(text)}): {e.msg}{hint}") from None
    _check_coco_structure(data, path)
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress lines
        coco.createIndex()
    return coco


def _check_coco_structure(data, path: Path) -> None:
    if not isinstance(data, dict):
        raise AnnotationError(f"{path}: top level must be a JSON object with 'images' and "
                              f"'annotations', got a JSON {type(data).__name__}")
    missing = [key for key in ("images", "annotations") if key not in data]
    if missing:
        raise AnnotationError(f"{path}: missing required key(s) {missing}; a COCO caption file "
                              f"has 'images' and 'annotations' (found {sorted(data)[:10]})")
    for key in ("images", "annotations"):
        if not isinstance(data[key], list):
            raise AnnotationError(f"{path}: '{key}' must be a list, got {type(data[key]).__name__}")
    needs = {"images": ("id", "file_name"), "annotations": ("id", "image_id")}
    for key, fields in needs.items():
        for k, item in enumerate(data[key]):
            if not isinstance(item, dict) or any(f not in item for f in fields):
                raise AnnotationError(f"{path}: {key}[{k}] must be an object with {list(fields)}, "
                                      f"got {str(item)[:120]}")
            if any(not isinstance(item[f], (int, str)) for f in fields if f != "file_name"):
                raise AnnotationError(f"{path}: {key}[{k}] ids must be integers or strings, "
                                      f"got {str(item)[:120]}")


def collect_captioned_images(coco: COCO) -> tuple[list[dict], dict]:
    """Rows to pack, in the file's image order: {"image_id", "file_name", "captions"}.

    Captions are stripped of surrounding whitespace, otherwise kept exactly (any length,
    any script). Skipped and counted: annotations for an image id not in "images", empty /
    whitespace-only / non-text captions, images left with no caption.
    """
    skipped = {"orphan_annotations": [], "empty_captions": [], "images_without_captions": []}
    for ann in coco.dataset["annotations"]:
        if ann["image_id"] not in coco.imgs:
            skipped["orphan_annotations"].append(f"annotation {ann['id']} -> image {ann['image_id']}")
    records = []
    for image_id in coco.getImgIds():
        captions = []
        for ann in coco.imgToAnns.get(image_id, []):
            text = ann.get("caption")
            if isinstance(text, str) and text.strip():
                captions.append(text.strip())
            else:
                skipped["empty_captions"].append(f"annotation {ann['id']}: {text!r}")
        file_name = coco.imgs[image_id]["file_name"]
        if captions:
            records.append({"image_id": image_id, "file_name": file_name, "captions": captions})
        else:
            skipped["images_without_captions"].append(f"image {image_id} ({file_name})")
    for key, items in skipped.items():
        if items:
            log.warning("skipped %d %s, e.g. %s", len(items), key.replace("_", " "),
                        "; ".join(items[:NUM_EXAMPLES]))
    return records, {key: len(items) for key, items in skipped.items()}


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> "RGB": transparency composited on white, 16-bit scaled (not clipped)."""
    if img.mode == "RGB":
        return img
    if img.mode in SIXTEEN_BIT_MODES:
        # 0..65535 -> 0..255 with rounding; PIL's own convert("L") clips everything above 255.
        wide = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
        return Image.fromarray(((wide + 128) // 257).astype(np.uint8), "L").convert("RGB")
    if img.mode in ALPHA_MODES or (img.mode == "P" and "transparency" in img.info):
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
    return img.convert("RGB")


def decode_image(path, image_size: int) -> np.ndarray:
    """One image file -> uint8 [3, S, S] RGB in 0..255 (upright, centre square, S x S)."""
    return centre_square(load_upright_rgb(path), image_size)


def load_upright_rgb(path) -> Image.Image:
    """An image file decoded by content (not extension), EXIF orientation applied, as RGB."""
    with Image.open(path) as img:
        img.load()  # decode now: a truncated or corrupt file fails here
        try:
            img = ImageOps.exif_transpose(img)
        except Exception:  # broken EXIF: the pixels are still fine, keep them as stored
            pass
        return to_rgb(img)


def centre_square(img: Image.Image, image_size: int) -> np.ndarray:
    """RGB image -> uint8 [3, S, S]: the centred min(W, H) square, Lanczos-resampled to S x S.

    The same as resizing the short side to S and centre cropping, but with one resampling
    and no rounding of an intermediate size."""
    width, height = img.size
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    img = img.resize((image_size, image_size), Image.Resampling.LANCZOS,
                     box=(left, top, left + side, top + side))
    return np.ascontiguousarray(np.asarray(img).transpose(2, 0, 1))


def _decode_task(task):
    """Worker entry: (row, path, S) -> (row, uint8 [3, S, S] or None, reason or None,
    the source's (width, height) upright or None)."""
    row, path, image_size = task
    try:
        img = load_upright_rgb(path)
        return row, centre_square(img, image_size), None, img.size
    except Exception as e:  # any unreadable file is skipped and reported, never fatal
        return row, None, f"{type(e).__name__}: {e}", None


@contextlib.contextmanager
def _ordered_map(num_workers: int):
    """A map(fn, items) that yields in order, in `num_workers` processes (0: this one)."""
    if num_workers == 0:
        yield map
        return
    # fork on Linux (as DataLoader does): spawn would re-run the caller's __main__ in each
    # worker, which breaks scripts fed on stdin and loops forever re-spawning failed workers.
    context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else None)
    with context.Pool(num_workers) as pool:
        yield lambda fn, items: pool.imap(fn, items, chunksize=16)


def prepare(root, split: str, image_size: int, cache_dir=None, num_workers: int = 2,
            max_bad_fraction: float = 0.01, checkpoint_every: int = 1024) -> Path:
    """Build (or resume, or just find) the packed cache of one split; returns the `.npy` path.

    split: e.g. "train2014"; image_size: S, the output side. A complete cache is returned at
    once unless its annotation file is newer (then rebuilt). Unreadable images are skipped
    and logged; raises BadDataError when more than `max_bad_fraction` of the captioned images
    cannot be read. Workers are forked on Linux and spawned elsewhere, so call it from under
    `if __name__ == "__main__":` there.
    """
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
    if num_workers < 0 or checkpoint_every < 1:
        raise ValueError(f"need num_workers >= 0 and checkpoint_every >= 1, "
                         f"got {num_workers} and {checkpoint_every}")
    paths = cache_paths(root, split, image_size, cache_dir)
    annotation_file = Path(root) / "annotations" / f"captions_{split}.json"
    if _complete_and_fresh(paths, annotation_file):
        return paths.images
    paths.images.parent.mkdir(parents=True, exist_ok=True)
    # One builder per cache (nodes sharing a disk, two runs on one node): the others wait.
    with RunLock(paths.lock.parent, paths.lock.name).acquire(wait_s=math.inf):
        if _complete_and_fresh(paths, annotation_file):  # done by another process meanwhile
            return paths.images
        if paths.complete():
            log.warning("%s changed after %s was built: rebuilding it", annotation_file, paths.images)
            paths.images.unlink()
        records, stats = collect_captioned_images(load_annotations(annotation_file))
        if not records:
            raise BadDataError(f"{annotation_file}: no image has a usable caption ({stats})")
        fingerprint = _fingerprint(split, image_size, records)
        bad, upscaled = _pack_rows(records, Path(root) / split, image_size, paths, fingerprint,
                                   num_workers, max_bad_fraction, checkpoint_every)
        _finish(paths, records, bad, stats, split, image_size, max_bad_fraction)
        _note_upscaled(upscaled, records, split, image_size)
    return paths.images


def _complete_and_fresh(paths: CachePaths, annotation_file: Path) -> bool:
    """Complete, and not older than its annotations (a cache whose source is gone is kept)."""
    if not paths.complete():
        return False
    try:
        return annotation_file.stat().st_mtime_ns <= paths.index.stat().st_mtime_ns
    except FileNotFoundError:
        return True


def _fingerprint(split: str, image_size: int, records: list[dict]) -> str:
    rows = [(r["image_id"], r["file_name"]) for r in records]
    blob = json.dumps([CACHE_FORMAT, split, image_size, rows]).encode()
    return hashlib.sha256(blob).hexdigest()


def _pack_rows(records, image_dir: Path, image_size: int, paths: CachePaths, fingerprint: str,
               num_workers: int, max_bad_fraction: float, checkpoint_every: int) -> tuple:
    """Decode rows into the partial file, resuming from saved progress. Returns the bad rows
    and (count of sources smaller than `image_size`, the first as [row, width, height])."""
    n, shape = len(records), (len(records), 3, image_size, image_size)
    state = _load_progress(paths, fingerprint, shape)
    if state is None:
        # Drop old progress first: it must never be paired with the fresh (zeroed) partial file.
        paths.progress.unlink(missing_ok=True)
        images = np.lib.format.open_memmap(paths.partial, mode="w+", dtype=np.uint8, shape=shape)
        state = {"fingerprint": fingerprint, "done": 0, "bad": [], "upscaled": 0}
        write_json(paths.progress, state)
    else:
        images = np.lib.format.open_memmap(paths.partial, mode="r+")
        log.info("resuming %s at row %d of %d", paths.partial, state["done"], n)
    tasks = ((row, str(image_dir / records[row]["file_name"]), image_size)
             for row in range(state["done"], n))
    bar = tqdm(total=n, initial=state["done"], unit="img", desc=f"packing {paths.images.name}")
    try:
        with _ordered_map(num_workers) as ordered_map:
            for row, pixels, reason, source_size in ordered_map(_decode_task, tasks):
                if pixels is None:
                    state["bad"].append([row, str(image_dir / records[row]["file_name"]), reason])
                else:
                    images[row] = pixels
                    if min(source_size) < image_size:
                        state["upscaled"] = state.get("upscaled", 0) + 1
                        state.setdefault("upscaled_example", [row, *source_size])
                state["done"] = row + 1
                bar.update(1)
                _check_bad_fraction(state["bad"], n, max_bad_fraction, final=state["done"] == n)
                if state["done"] % checkpoint_every == 0:
                    images.flush()
                    write_json(paths.progress, state)
    finally:  # also on an exception: what is written so far is kept for the rerun
        bar.close()
        images.flush()
        write_json(paths.progress, state)
        del images
    return state["bad"], (state.get("upscaled", 0), state.get("upscaled_example"))


def _load_progress(paths: CachePaths, fingerprint: str, shape: tuple) -> dict | None:
    """Saved progress if it belongs to this exact job and its partial file is intact."""
    try:
        state = json.loads(paths.progress.read_text(encoding="utf-8"))
        partial = np.load(paths.partial, mmap_mode="r")
        ok = state["fingerprint"] == fingerprint and partial.shape == shape and partial.dtype == np.uint8
        del partial
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return state if ok else None


def _check_bad_fraction(bad: list, total: int, max_bad_fraction: float, final: bool) -> None:
    """Raise once the unreadable images exceed the allowed fraction of all `total`."""
    if len(bad) <= max_bad_fraction * total:
        return
    examples = "; ".join(f"{path} ({reason})" for _, path, reason in bad[:NUM_EXAMPLES])
    at_least = "" if final else "at least "
    raise BadDataError(
        f"{at_least}{len(bad)} of {total} images ({len(bad) / total:.1%}, fraction "
        f"{len(bad) / total:.4f}) could not be read, above max_bad_fraction={max_bad_fraction}; "
        f"e.g. {examples}")


def _finish(paths: CachePaths, records, bad, stats, split, image_size, max_bad_fraction) -> None:
    """Check the bad fraction, write the index, then mark complete by renaming the images."""
    _check_bad_fraction(bad, len(records), max_bad_fraction, final=True)
    bad_rows = {row for row, _, _ in bad}
    keep = [row for row in range(len(records)) if row not in bad_rows]
    stats = {"unreadable_images": len(bad), **stats}
    index = {"format": CACHE_FORMAT, "split": split, "image_size": image_size,
             "num_images": len(keep), "images_file": paths.images.name, "skipped": stats,
             "unreadable_examples": [f"{path}: {reason}" for _, path, reason in bad[:NUM_EXAMPLES]],
             "rows": [records[row] for row in keep]}
    write_json(paths.index, index)
    if bad_rows:  # copy the good rows into a dense file; the rename below is still atomic
        source = np.load(paths.partial, mmap_mode="r")
        dense = np.lib.format.open_memmap(paths.compact, mode="w+", dtype=np.uint8,
                                          shape=(len(keep),) + source.shape[1:])
        for start in range(0, len(keep), 1024):
            dense[start:start + 1024] = source[keep[start:start + 1024]]
        dense.flush()
        del dense, source
        os.replace(paths.compact, paths.images)
        paths.partial.unlink()
    else:
        os.replace(paths.partial, paths.images)
    paths.progress.unlink(missing_ok=True)
    level = logging.WARNING if any(stats.values()) else logging.INFO
    log.log(level, "packed %d images into %s; skipped: %s%s", len(keep), paths.images, stats,
            "".join(f"\n  unreadable: {line}" for line in index["unreadable_examples"]))


def _note_upscaled(upscaled: tuple, records: list, split: str, image_size: int) -> None:
    """Say once, with the count, that sources smaller than the packed size were enlarged."""
    count, example = upscaled
    if not count:
        return
    row, width, height = example
    log.warning("%s: upscaled %d of %d images whose short side is under %d px (e.g. %s, "
                "%dx%d): they hold less detail than the packed size suggests", split, count,
                len(records), image_size, records[row]["file_name"], width, height)
