"""FID while training (train.fid_every > 0) of the EMA weights, measured the same way at
every check, and the best checkpoint by it.

The protocol is fixed for the run: train.fid_samples val images (rows and captions drawn
from train.seed, as tti.export draws them), image i sampled from its own seed, the config's
sampler and steps, the clean resize. Every rank turns its share (items rank::world) into
Inception features, gathered (never the images) for FID against the same val images' (cached);
on the shapes dataset the judge reads the same images. At a new lowest FID every rank joins in
writing this step's checkpoint as checkpoints/best.pt, its FID record under "fid".
"""
from __future__ import annotations

import hashlib
import os
import time

import numpy as np
import torch

from tti.data.shapes_folder import is_shapes_dataset
from tti.eval.items import choose_items, generate_items
from tti.eval.metrics.fid import (DEFAULT_RESIZE, FEATURE_DIM, INCEPTION_FILE, fid_from_features,
                                  inception_features)
from tti.eval.metrics.judge import judge_image, summarize_verdicts
from tti.infra import distributed
from tti.infra.atomic_file import atomic_file
from tti.infra.checkpoints import atomic_save, checkpoint_dir, safe_load
from tti.training.sample_monitor import log_judge
from tti.training.state import checkpoint_contents

BEST_FILE = "best.pt"
JUDGED_FACTS = ("colour", "shape", "size", "relation", "all")


def gather_in_item_order(shard, world_size: int):
    """Every rank's `shard` (its values for items rank::world_size: an array or a list), put
    back in item order. A collective; every rank gets the whole."""
    parts = distributed.all_gather_object(shard)
    n = sum(len(p) for p in parts)
    positions = np.concatenate([np.arange(r, n, world_size) for r in range(len(parts))])
    order = np.argsort(positions, kind="stable")
    if isinstance(shard, np.ndarray):
        return np.concatenate(parts)[order]
    flat = [v for p in parts for v in p]
    return [flat[i] for i in order]


def read_best(run_dir: str) -> dict | None:
    """The FID record of <run_dir>/checkpoints/best.pt (None if there is none). Memory-mapped:
    the weights are not read."""
    path = os.path.join(checkpoint_dir(run_dir), BEST_FILE)
    if not os.path.isfile(path):
        return None
    return safe_load(path, mmap=True).get("fid")


class FIDMonitor:
    """One run's FID protocol and the lowest FID so far. Made on every rank; `run` is a
    collective that every rank calls at the same steps."""

    def __init__(self, cfg, val_set, info, log):
        tr = cfg.train
        self.cfg, self.val_set, self.info = cfg, val_set, info
        self.items = choose_items(val_set, tr.fid_samples, tr.seed)
        if len(self.items) < tr.fid_samples:
            log.print(f"train.fid_samples={tr.fid_samples} is more than the {len(val_set)} val "
                      f"images: FID uses {len(self.items)}")
        self.mine = self.items[info.rank::info.world_size]
        self.batch_size = max(1, tr.batch_size // info.world_size)
        self.judged = is_shapes_dataset(cfg.data.root)
        self.started = False
        self.reference = None  # rank 0: the subset's real images' features [n, 2048]
        self.best = None       # rank 0: the FID record of best.pt

    def due(self, step: int, last: bool) -> bool:
        """Whether `step` is a FID step: every train.fid_every steps, and the run's last."""
        every = self.cfg.train.fid_every
        return every > 0 and (step % every == 0 or (last and step >= every))

    def _shard_features(self, images_of) -> np.ndarray:
        """float32 [len(self.mine), 2048]: this rank's items' features, one batch at a time;
        images_of(items) -> uint8 [B, 3, S, S]."""
        features = [np.zeros((0, FEATURE_DIM), np.float32)]
        for start in range(0, len(self.mine), self.batch_size):
            images = images_of(self.mine[start:start + self.batch_size])
            features.append(inception_features(images, device=str(self.info.device),
                                               progress=False, resize=DEFAULT_RESIZE))
        return np.concatenate(features)

    def reference_path(self) -> str:
        """The cache file of the subset's real features, beside the packed val images, keyed
        by those images' pixels (data, split, size, subset), the resize and the network."""
        digest = hashlib.sha256(f"{DEFAULT_RESIZE}|{INCEPTION_FILE}".encode())
        for it in self.items:
            digest.update(self.val_set[it.row][0].numpy().tobytes())
        name = (f"fid_reference_{self.val_set.split}_{self.val_set.image_size}px_"
                f"{len(self.items)}_{DEFAULT_RESIZE}_{digest.hexdigest()[:16]}.npz")
        return os.path.join(os.path.dirname(os.path.abspath(self.val_set.images_path)), name)

    def reference_features(self, log) -> np.ndarray | None:
        """Rank 0: the real images' features, from the cache, or computed by every rank's share
        and cached (None on other ranks). A collective."""
        path = self.reference_path() if self.info.is_main else None
        if distributed.broadcast_object(path is not None and os.path.isfile(path)):
            return np.load(path)["features"] if self.info.is_main else None
        real = lambda items: torch.stack([self.val_set[it.row][0] for it in items])
        features = gather_in_item_order(self._shard_features(real), self.info.world_size)
        if not self.info.is_main:
            return None
        with atomic_file(path, "wb") as f:
            np.savez(f, features=features, resize=np.array(DEFAULT_RESIZE))
        log.print(f"FID reference: {len(features)} val images' features cached in {path}")
        return features

    def generated_features(self, model) -> tuple[np.ndarray, list]:
        """The subset's images from `model` (each from its own seed): (features [n, 2048],
        judge verdicts, [] off shapes), whole on every rank. A collective."""
        opts, verdicts = model.sampler_options(self.cfg), []

        def images_of(items):
            images = generate_items(model, items, self.cfg.train.seed, **opts)
            if self.judged:
                for image, it in zip(images, items):
                    verdict = judge_image(image, it.caption)
                    verdicts.append({k: verdict[k] for k in JUDGED_FACTS})
            return images
        features = gather_in_item_order(self._shard_features(images_of), self.info.world_size)
        return features, gather_in_item_order(verdicts, self.info.world_size)

    def protocol(self, model) -> dict:
        """What makes two FIDs comparable: the subset, its seeds, the sampler, the resize."""
        return {"samples": len(self.items), "seed": self.cfg.train.seed, "resize": DEFAULT_RESIZE,
                "sampler": model.sampler_options(self.cfg)}

    def start(self, model, log) -> None:
        """First check of this process: the reference features, and best.pt's record when it
        was measured the same way (else the next FID replaces it)."""
        self.reference, self.started = self.reference_features(log), True
        if self.info.is_main:
            best = read_best(self.cfg.run_dir())
            if best is not None and best.get("protocol") != self.protocol(model):
                log.print(f"{BEST_FILE} (step {best['step']}, FID {best['fid']:.3f}) was measured "
                          f"another way ({best.get('protocol')}); the next FID replaces it")
                best = None
            self.best = best

    def run(self, state, log) -> None:
        """All ranks: FID of the EMA weights at state.step, logged by rank 0; at a new lowest
        FID, checkpoints/best.pt. The training random streams are left as they were."""
        start, model = time.perf_counter(), state.model
        devices = [self.info.device] if self.info.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), state.ema.swapped_into(model):
            model.eval()
            try:
                if not self.started:
                    self.start(model, log)
                features, verdicts = self.generated_features(model)
            finally:
                model.train()
        seconds = time.perf_counter() - start
        record = (self.report(state.step, model, features, verdicts, seconds, log)
                  if self.info.is_main else None)
        if distributed.broadcast_object(record is not None and record["best"]):
            contents = checkpoint_contents(state, self.cfg, self.info)
            if self.info.is_main:
                self.best = {k: v for k, v in record.items() if k != "best"}
                atomic_save({**contents, "fid": self.best},
                            os.path.join(checkpoint_dir(self.cfg.run_dir()), BEST_FILE))

    def report(self, step: int, model, features: np.ndarray, verdicts: list, seconds: float,
               log) -> dict:
        """Rank 0: FID (and the judge's accuracy) to log.txt, tensorboard and history.jsonl;
        returns the record, with "best": whether it is the lowest so far."""
        fid = fid_from_features(features, self.reference)
        best = self.best is None or fid < self.best["fid"]
        record = {"step": step, "fid": fid, "protocol": self.protocol(model), "best": best}
        opts = record["protocol"]["sampler"]
        log.scalars(step, {"fid": fid, "fid_seconds": seconds})
        log.print(f"step {step}: FID {fid:.3f} on {len(self.items)} val images ({opts['sampler']} "
                  f"{opts['steps']} steps, guidance {opts['guidance']}, EMA, {DEFAULT_RESIZE} "
                  f"resize) in {seconds:.1f}s; " + ("new best" if best else
                  f"best {self.best['fid']:.3f} at step {self.best['step']}"))
        judge = {}
        if verdicts:
            acc = summarize_verdicts(verdicts, [it.caption for it in self.items])
            judge = log_judge(log, step, acc, "fid_judge", f"on the {len(verdicts)} FID images")
        log.record({"event": "fid", **record, "seconds": round(seconds, 3),
                    **{f"judge/{k}": v for k, v in judge.items()}})
        return record
