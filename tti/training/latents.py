"""A latent-space run's training data: its packed images' latents from the latent store
(tti/data/latent_store.py), built once per node before the first step, so no training step
runs the encoder."""
from __future__ import annotations

import os
import time

from tti.config.schema import Config
from tti.data.latent_store import LatentCaptions, build_latent_store, store_folder
from tti.infra import distributed


def latent_dataset(cfg: Config, train_set):
    """`train_set` as a latent-space run reads it (items: moments, caption), or as it is in
    pixel space. Its store is attached by open_latent_store once the model is built."""
    return LatentCaptions(train_set) if cfg.model.autoencoder else train_set


def open_latent_store(autoencoder, train_set, cfg: Config, info: distributed.DistInfo,
                      log) -> None:
    """Local rank 0 of each node encodes the packed training images it lacks latents of
    (with a progress bar; resumable, under a lock); then every rank maps the store read-only.
    train_set: what latent_dataset returned (possibly wrapped again, e.g. a caption mix)."""
    source = train_set.source  # the CaptionDataset whose packed images are encoded
    cache_dir = cfg.data.cache_dir or os.path.join(cfg.data.root, "cache")
    identity = autoencoder.identity()
    folder = store_folder(cache_dir, source.split, source.image_size, identity)
    if info.local_rank == 0:
        t0 = time.time()
        n = build_latent_store(autoencoder, source, folder, progress=True)
        log.print(f"latent store {folder}: {n} images encoded in {time.time() - t0:.1f}s "
                  f"({autoencoder.name}, scaling factor {autoencoder.scale:g})")
    distributed.barrier()
    train_set.use_store(folder, identity)
