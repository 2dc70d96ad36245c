"""COCO-format captions (pycocotools) over a packed uint8 image cache.

    ds = load_split("/data/coco", "train2014", 64)   # prepares the cache once, then opens it
    ds.set_epoch(epoch)                               # a new caption draw per epoch
    image, caption = ds[i]                            # uint8 [3, 64, 64], one of its captions
    loader = DataLoader(ds, batch_size=64, shuffle=True, num_workers=2, collate_fn=collate)

The cache (decoding, resizing, bad data, resume) is built by `tti.data.prepare`; build it
ahead of training with `python -m tti.data.coco /data/coco --split train2014 --image-size 64`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import operator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from tti.data.prepare import (  # noqa: F401  (re-exported: this module is the entry point)
    AnnotationError, BadDataError, cache_paths, decode_image, load_annotations, prepare)


class CaptionDataset(Dataset):
    """Images of one packed split, each with all its captions; one caption drawn per item.

    source: the cache `.npy` (or its `.json` index) that `prepare` returned, or the COCO
    root together with `split` and `image_size` (and `cache_dir` if not `<root>/cache`).
    `ds[i]` -> (image uint8 [3, S, S] in 0..255, caption str); the caption is one of
    `captions(i)`, chosen from (seed, epoch, i) alone, so a resumed run sees the same data.
    The memory map is opened lazily in each process and never pickled. Call `set_epoch`
    before creating the loader's iterator, without persistent_workers (persistent workers
    keep the epoch they started with, so the caption draw would never change).
    """

    def __init__(self, source, split: str | None = None, image_size: int | None = None,
                 cache_dir=None, seed: int = 0):
        if int(seed) < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.images_path, self.index_path = _resolve_cache(source, split, image_size, cache_dir)
        index = json.loads(self.index_path.read_text(encoding="utf-8"))
        rows = index["rows"]
        header = np.load(self.images_path, mmap_mode="r")
        shape, dtype = header.shape, header.dtype
        del header  # only the shape was needed: each process maps the file itself, lazily
        expected = (len(rows), 3, index["image_size"], index["image_size"])
        if shape != expected or dtype != np.uint8:
            raise ValueError(f"{self.images_path} holds {dtype} {shape} but {self.index_path} "
                             f"describes uint8 {expected}: rebuild the cache with prepare()")
        self.split = index["split"]
        self.image_size = index["image_size"]
        self.skipped = index["skipped"]
        self.seed = int(seed)
        self.epoch = 0
        # Flat numpy arrays, not lists of str: forked workers would copy lists page by page.
        self._image_ids = np.asarray([row["image_id"] for row in rows])
        self._file_names = np.asarray([row["file_name"] for row in rows])
        encoded = [c.encode("utf-8") for row in rows for c in row["captions"]]
        self._caption_bytes = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        self._caption_ends = np.cumsum([len(e) for e in encoded], dtype=np.int64)
        self._first_caption = np.cumsum([0] + [len(row["captions"]) for row in rows],
                                        dtype=np.int64)
        self._images = None

    def __len__(self) -> int:
        return len(self._image_ids)

    def __getitem__(self, i):
        i = self._row(i)
        if self._images is None:
            self._images = np.load(self.images_path, mmap_mode="r")
        image = torch.from_numpy(np.array(self._images[i]))  # copy: the map is read-only
        return image, self._caption(i, self.caption_choice(i))

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose caption draw `__getitem__` uses (epoch >= 0)."""
        if int(epoch) < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def caption_choice(self, i: int, epoch: int | None = None) -> int:
        """Index into `captions(i)` drawn for (seed, epoch, i); epoch defaults to the current."""
        i = self._row(i)
        epoch = self.epoch if epoch is None else int(epoch)
        count = int(self._first_caption[i + 1] - self._first_caption[i])
        state = np.random.SeedSequence([self.seed, epoch, i]).generate_state(1, np.uint64)[0]
        return int(state % count)

    def captions(self, i: int) -> list[str]:
        """All captions of row i, in annotation-file order."""
        i = self._row(i)
        return [self._caption(i, k) for k in range(self._first_caption[i + 1] - self._first_caption[i])]

    def image_id(self, i: int):
        """COCO image id of row i (an int for COCO files)."""
        return self._image_ids[self._row(i)].item()

    def file_name(self, i: int) -> str:
        """The image's file name, as in the annotation file."""
        return str(self._file_names[self._row(i)])

    def fingerprint(self) -> str:
        """sha256 hex of the split's image size, image ids, file names and captions (not the
        pixels): the same under another root or cache folder, changed by edited annotations."""
        digest = hashlib.sha256(repr((self.image_size, self._image_ids.tolist(),
                                      self._file_names.tolist())).encode())
        digest.update(self._caption_bytes.tobytes())
        digest.update(self._caption_ends.tobytes())
        digest.update(self._first_caption.tobytes())
        return digest.hexdigest()

    def _caption(self, i: int, k: int) -> str:
        flat = int(self._first_caption[i]) + k
        start = int(self._caption_ends[flat - 1]) if flat else 0
        return self._caption_bytes[start:int(self._caption_ends[flat])].tobytes().decode("utf-8")

    def _row(self, i) -> int:
        i, n = operator.index(i), len(self)
        if not -n <= i < n:
            raise IndexError(f"row {i} out of range for {n} images")
        return i % n

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_images"] = None  # never pickle the map (it would pickle every image)
        return state


def collate(batch):
    """[(image uint8 [3, S, S], caption str)] -> (images uint8 [B, 3, S, S], list of B str)."""
    images, captions = zip(*batch)
    return torch.stack(images), list(captions)


def load_split(root, split: str, image_size: int, cache_dir=None, seed: int = 0,
               num_workers: int = 2, max_bad_fraction: float = 0.01) -> CaptionDataset:
    """Prepare the cache of `<root>` `split` at `image_size` if needed, then open it."""
    path = prepare(root, split, image_size, cache_dir=cache_dir, num_workers=num_workers,
                   max_bad_fraction=max_bad_fraction)
    return CaptionDataset(path, seed=seed)


def _resolve_cache(source, split, image_size, cache_dir) -> tuple[Path, Path]:
    if split is not None or image_size is not None:
        if split is None or image_size is None:
            raise ValueError("give both split and image_size with a COCO root, or a cache path")
        paths = cache_paths(source, split, image_size, cache_dir)
        images, index = paths.images, paths.index
    else:
        source = Path(source)
        if source.suffix not in (".npy", ".json"):
            raise ValueError(f"{source}: expected the cache .npy or .json that prepare() wrote, "
                             "or a COCO root with split= and image_size=")
        images, index = source.with_suffix(".npy"), source.with_suffix(".json")
    for path in (images, index):
        if not path.exists():
            raise FileNotFoundError(f"no complete cache: {path} is missing; run "
                                    "tti.data.coco.prepare(root, split, image_size) first")
    return images, index


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Pack a COCO caption split into a uint8 cache.")
    parser.add_argument("root", help="COCO 2014 layout: annotations/ and <split>/ inside")
    parser.add_argument("--split", default="train2014")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--cache-dir", default=None, help="default: <root>/cache")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--max-bad-fraction", type=float, default=0.01)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ds = load_split(args.root, args.split, args.image_size, args.cache_dir,
                    num_workers=args.num_workers, max_bad_fraction=args.max_bad_fraction)
    captions = int(ds._first_caption[-1])
    print(f"{ds.images_path}: {len(ds)} images, {captions} captions, skipped {ds.skipped}")


if __name__ == "__main__":
    from tti.infra.cli import run_cli
    run_cli(main)
