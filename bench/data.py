"""Data throughput: the packed uint8 cache against decoding and resizing JPEGs per item, and
the share of a training step spent waiting for data in the embedded default.

1. The same images, read two ways through the same DataLoader (batch, workers, shuffle):
   - "decode per item": open the JPEG, decode, centre-crop and resize to S (exactly the
     `decode_image` that `prepare` runs once), every time an item is read;
   - "packed cache": `CaptionDataset` over the uint8 [N, 3, S, S] memory map `prepare` wrote.
   The images are synthetic photos at COCO's usual 640x480 (smooth colour fields plus grain,
   JPEG quality 90, ~75 KB each), or the first --images files of a real COCO split given
   with --coco-root. Both loaders are timed in this one run, one full pass each, repeated.
2. The embedded default (configs/shapes32.yaml: batch 64, num_workers 0) trained for a few
   steps: the time spent in `next(batches)` against the whole step, as train.py logs it
   (`data_wait` in log.txt).

Run from the repository root:
    python -m bench.data                         # about 2 minutes on 2 CPU cores
    python -m bench.data --coco-root /data/coco --images 2000 --workers 8
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from tti.data.coco import CaptionDataset, collate, decode_image, prepare


def synthetic_photo(seed: int, width: int = 640, height: int = 480) -> Image.Image:
    """A photo-like RGB image: a smooth random colour field, a few blobs and sensor grain."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), np.float32)
    yy, xx = np.mgrid[0:height, 0:width]
    for _ in range(4):
        cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(20, 120)
        field[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(0, 256, 3)
    field += rng.normal(0, 6, field.shape)
    return Image.fromarray(np.clip(field, 0, 255).astype(np.uint8))


def write_synthetic_coco(root: Path, n: int, split: str) -> None:
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    images, annotations = [], []
    for i in range(n):
        name = f"COCO_{split}_{i:012d}.jpg"
        synthetic_photo(i).save(root / split / name, quality=90)
        images.append({"id": i, "file_name": name, "width": 640, "height": 480})
        annotations.append({"id": i, "image_id": i, "caption": f"synthetic photo number {i}"})
    with open(root / "annotations" / f"captions_{split}.json", "w") as f:
        json.dump({"images": images, "annotations": annotations}, f)


class DecodePerItem(Dataset):
    """The cache's images, decoded from their files on every read (what a plain loader does)."""

    def __init__(self, cache: CaptionDataset, image_dir: Path, image_size: int):
        self.cache, self.image_dir, self.image_size = cache, image_dir, image_size

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, i):
        pixels = decode_image(self.image_dir / self.cache.file_name(i), self.image_size)
        return torch.from_numpy(pixels), self.cache.captions(i)[0]


def images_per_second(dataset, batch: int, workers: int, min_seconds: float) -> float:
    """Full shuffled passes over `dataset` until `min_seconds` have passed; images/s.

    Workers persist across passes: a pass over a small bench set would otherwise time
    mostly the start of fresh worker processes, which a real epoch pays once.
    """
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers,
                        collate_fn=collate, generator=torch.Generator().manual_seed(0),
                        persistent_workers=workers > 0)
    next(iter(loader))  # start the workers outside the timing
    seen, start = 0, time.perf_counter()
    while True:
        for images, _ in loader:
            seen += images.shape[0]
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return seen / elapsed


def loader_comparison(args, work: Path) -> None:
    split = args.split
    if args.coco_root:
        root = Path(args.coco_root)
        annotation = root / "annotations" / f"captions_{split}.json"
        data = json.loads(annotation.read_text())
        keep = {im["id"] for im in data["images"][: args.images]}
        root_small = work / "coco_subset"
        (root_small / "annotations").mkdir(parents=True)
        os.symlink(root / split, root_small / split)
        subset = {"images": [im for im in data["images"] if im["id"] in keep],
                  "annotations": [a for a in data["annotations"] if a["image_id"] in keep]}
        (root_small / "annotations" / f"captions_{split}.json").write_text(json.dumps(subset))
        root = root_small
        source = f"the first {args.images} images of {args.coco_root}/{split}"
    else:
        root = work / "synthetic"
        t0 = time.perf_counter()
        write_synthetic_coco(root, args.images, split)
        sizes = [p.stat().st_size for p in (root / split).iterdir()]
        source = (f"{args.images} synthetic 640x480 JPEGs (mean {statistics.mean(sizes) / 1024:.0f} KB, "
                  f"written in {time.perf_counter() - t0:.1f}s)")
    t0 = time.perf_counter()
    cache = CaptionDataset(prepare(root, split, args.size, cache_dir=work / "cache",
                                  num_workers=args.prepare_workers))
    pack_s = time.perf_counter() - t0
    per_item = DecodePerItem(cache, root / split, args.size)
    assert torch.equal(per_item[3][0], cache[3][0]), "the two loaders must give the same pixels"
    print(f"images: {source}; packed to {args.size}px in {pack_s:.1f}s "
          f"({args.prepare_workers} worker processes, once)")
    print(f"DataLoader: batch {args.batch}, shuffle, same images, one pass or more each")
    print(f"{'workers':>8} {'decode per item':>18} {'packed cache':>16} {'speed-up':>9}")
    for workers in args.workers:
        slow = images_per_second(per_item, args.batch, workers, args.seconds)
        fast = images_per_second(cache, args.batch, workers, args.seconds)
        print(f"{workers:>8} {slow:>12.0f} img/s {fast:>10.0f} img/s {fast / slow:>8.0f}x")


def data_wait_share(args, work: Path) -> None:
    from tti import train

    results = work / "results"
    run_dir = train.main([
        "--config", "configs/shapes32.yaml", "--device", args.device,
        "--set", f"data.root={work / 'shapes'}", "--set", f"data.shapes_train={args.shapes_train}",
        "--set", "data.shapes_val=64", "--set", f"run.results_dir={results}",
        "--set", f"train.steps={args.train_steps}", "--set", "train.log_every=5",
        "--set", f"train.ckpt_every={args.train_steps}", "--set", "train.sample_every=100000",
        "--set", "train.eval_samples=0", "--set", "sample.captions=['a large red circle']"])
    log = Path(run_dir, "log.txt").read_text()
    rows = [(int(s), float(ips), float(w)) for s, ips, w in
            re.findall(r"^step (\d+) .*img_per_s=(\S+) data_wait=(\S+)", log, re.M)]
    steady = [r for r in rows if r[0] > 5] or rows  # the first window holds iterator start-up
    share = statistics.mean(r[2] for r in steady)
    speed = statistics.mean(r[1] for r in steady)
    print(f"embedded default (configs/shapes32.yaml, batch 64, num_workers 0, {args.device}), "
          f"steps 6-{args.train_steps}: {speed:.0f} img/s, data wait {100 * share:.2f}% of the step "
          f"(per 5-step window: {', '.join(f'{100 * r[2]:.2f}%' for r in steady)})")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--size", type=int, default=64, help="packed image side S")
    p.add_argument("--split", default="train2014")
    p.add_argument("--coco-root", default=None, help="use real COCO JPEGs instead of synthetic")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader workers")
    p.add_argument("--prepare-workers", type=int, default=2)
    p.add_argument("--seconds", type=float, default=3.0, help="least time per measurement")
    p.add_argument("--train-steps", type=int, default=30)
    p.add_argument("--shapes-train", type=int, default=2000)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the box is shared)")
    p.add_argument("--skip-training", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="tti-bench-data-") as tmp:
        loader_comparison(args, Path(tmp))
        if not args.skip_training:
            data_wait_share(args, Path(tmp))


if __name__ == "__main__":
    main()
