"""A frozen autoencoder's latents of every packed training image, computed once into a
memory-mapped store that every rank maps read-only, so training never runs the encoder.
A folder per (split, image size, autoencoder identity), under the data cache folder:

    latents_<split>_<S>px_<autoencoder>_<weights>/     (see `store_folder`)
        moments.npy   fp16 [N, 2C, S/f, S/f]  row i = packed row i: mean (C), then std (C)
        meta.json     `store_key`: the autoencoder's identity and the packed split's fingerprint

Storing the distribution, not one sample, lets each step draw a fresh z = mean + std * eps,
as encoding live would. Built like the text store (tti/text/store.py): under a lock, into
`<folder>.partial/` that a killed build resumes, renamed into place when complete.
docs/latent_store.md has the design.
"""
from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from tti.infra.atomic_file import write_json
from tti.infra.build_progress import clear_progress, open_array, save_progress, swap_in
from tti.infra.cli import UserError
from tti.infra.run_lock import RunLock

FORMAT = 1
FILES = ("moments.npy", "meta.json")
SAVE_EVERY_CHUNKS = 16  # a killed build loses at most this many chunks of work


class LatentStoreError(UserError, ValueError):
    """A store folder of another autoencoder, or one that does not match its images."""


def store_folder(cache_dir: str, split: str, image_size: int, identity: dict) -> str:
    """`<cache_dir>/latents_<split>_<S>px_<autoencoder>_<weights fingerprint>`."""
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in identity["autoencoder"])
    safe = safe[-60:]  # a long local path keeps its informative end
    name = f"latents_{split}_{image_size}px_{safe}_{identity['weights'][:10]}"
    return os.path.join(cache_dir, name)


def is_built(folder: str) -> bool:
    return all(os.path.isfile(os.path.join(folder, f)) for f in FILES)


def store_key(identity: dict, dataset) -> dict:
    """What a store's moments depend on: the autoencoder and the packed images."""
    return {"format": FORMAT, **identity, "split": dataset.split, "image_size": dataset.image_size,
            "rows": len(dataset), "data": dataset.fingerprint()}


def _read_meta(folder: str) -> dict:
    return json.loads(Path(folder, "meta.json").read_text(encoding="utf-8"))


# ---------------------------------------------------------------- writing

def build_latent_store(autoencoder, dataset, folder: str, chunk: int = 32,
                       progress: bool = False) -> int:
    """Make `folder` hold the moments of every image of `dataset` (a CaptionDataset, read in
    chunks of `chunk` images); a store made from other packed images is rebuilt.

    autoencoder: has `identity()` and `moments(images float [B, 3, S, S] in [-1, 1])` ->
    float [B, 2C, s, s] (tti.models.autoencoder.FrozenAutoencoder). Returns how many images
    were encoded now: 0 if the store held them, fewer than all if a killed build resumed.
    """
    key = store_key(autoencoder.identity(), dataset)
    parent, name = os.path.split(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    # One builder at a time (two runs on a node, or nodes sharing a disk): the others wait.
    with RunLock(parent, f"{name}.lock").acquire(wait_s=math.inf):
        for stale in glob.glob(glob.escape(folder) + ".old-*"):  # a swap that was killed
            shutil.rmtree(stale, ignore_errors=True)
        if is_built(folder):
            _check_autoencoder(folder, key)
            if _read_meta(folder) == key:
                return 0
        partial = f"{folder}.partial"
        encoded = _write_partial(autoencoder, dataset, key, partial, chunk, progress)
        swap_in(partial, folder)
    return encoded


def _check_autoencoder(folder: str, key: dict) -> None:
    """LatentStoreError when `folder` holds another autoencoder's latents (a folder copied by
    hand, or a fingerprint prefix shared by two VAEs)."""
    theirs = _read_meta(folder)
    differ = [k for k in ("autoencoder", "weights", "latent_channels", "factor", "scaling_factor")
              if theirs.get(k) != key[k]]
    if differ:
        raise LatentStoreError(f"{folder}: a latent store of another autoencoder ("
                               + ", ".join(f"{k} {theirs.get(k)!r}, not {key[k]!r}" for k in differ)
                               + "); delete the folder or point data.cache_dir elsewhere")


def _write_partial(autoencoder, dataset, key: dict, partial: str, chunk: int,
                   progress: bool) -> int:
    """moments.npy of every packed row (resuming a killed build of the same job), then meta.
    Returns how many rows were encoded now."""
    grid = dataset.image_size // key["factor"]
    shape = (len(dataset), 2 * key["latent_channels"], grid, grid)
    job = hashlib.blake2b(json.dumps([key, chunk], sort_keys=True).encode(),
                          digest_size=16).hexdigest()
    moments, done = open_array(partial, job, "moments.npy", shape)
    done = done or 0
    _encode_chunks(autoencoder, dataset, moments, done, chunk, progress, partial, job)
    del moments
    write_json(os.path.join(partial, "meta.json"), key)
    clear_progress(partial)
    return shape[0] - done


def _encode_chunks(autoencoder, dataset, moments, done: int, chunk: int, progress: bool,
                   partial: str, job: str) -> None:
    """Encode packed rows done.. chunk by chunk into `moments`, saving progress as it goes."""
    from tqdm import tqdm

    images = np.load(dataset.images_path, mmap_mode="r")
    n = len(moments)
    bar = tqdm(total=n, initial=done, desc="latent store: encoding images", unit="img",
               disable=not progress, dynamic_ncols=True)
    try:
        for index, start in enumerate(range(done, n, chunk)):
            pixels = torch.from_numpy(np.array(images[start:start + chunk]))
            # uint8 -> [-1, 1], as tti.models.text_to_image.to_model_range does
            out = autoencoder.moments(pixels.float().div_(127.5).sub_(1.0)).cpu().numpy()
            if not np.isfinite(out.astype(np.float16)).all():
                raise LatentStoreError(f"autoencoder {dataset.split} rows {start}..: moments "
                                       f"overflow fp16 (|value| > 65504): not an SD-family VAE?")
            moments[start:start + len(out)] = out
            bar.update(len(out))
            done = start + len(out)
            if (index + 1) % SAVE_EVERY_CHUNKS == 0 or done == n:
                moments.flush()
                save_progress(partial, job, done)
    finally:
        bar.close()


# ---------------------------------------------------------------- reading

class LatentCaptions(Dataset):
    """A CaptionDataset (`source`) whose items carry latent moments instead of pixels.

    `ds[i]` -> (moments fp16 [2C, s, s], the caption the dataset draws for row i this epoch).
    The store is attached by `use_store` once built (the loader may be made before). The map
    is opened lazily in each process and never pickled. Other attributes are the dataset's.
    """

    def __init__(self, dataset):
        self.source = dataset
        self.folder: str | None = None
        self._moments = None

    def use_store(self, folder: str, identity: dict) -> None:
        """Read from the store at `folder`; LatentStoreError unless it holds the latents of
        this dataset's images by the autoencoder `identity` describes."""
        meta = _read_meta(folder)
        key = store_key(identity, self.source)
        if meta != key:
            differ = ", ".join(k for k in key if meta.get(k) != key[k])
            raise LatentStoreError(f"{folder}: its latents are not of this split's images by "
                                   f"this autoencoder (they differ in {differ}); rebuild it")
        self.folder, self._moments = folder, None

    def __len__(self) -> int:
        return len(self.source)

    def __getattr__(self, name):
        if name == "source":  # not yet set (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.source, name)

    def set_epoch(self, epoch: int) -> None:
        self.source.set_epoch(epoch)

    def __getitem__(self, i):
        caption = self.source.captions(i)[self.source.caption_choice(i)]
        if self.folder is None:
            raise RuntimeError("LatentCaptions: no latent store attached (use_store)")
        if self._moments is None:
            self._moments = np.load(os.path.join(self.folder, "moments.npy"), mmap_mode="r")
        return torch.from_numpy(np.array(self._moments[i])), caption  # copy: the map is read-only

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_moments"] = None  # never pickle the map
        return state
