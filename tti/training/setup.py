"""Everything a training run sets up before its first step: the run's log and config file,
the datasets and the loader, the model (with its text store), the model as the loop calls
it (DDP, torch.compile), and its training FLOPs per image."""
from __future__ import annotations

import os
import time

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from tti.config.errors import ConfigError
from tti.config.load import save_config
from tti.config.registry import model_label
from tti.config.schema import Config
from tti.data.coco import collate, load_split
from tti.data.order import ResumableSampler
from tti.infra import distributed
from tti.infra.threads import usable_cpus
from tti.models.text_to_image import TextToImage, build, model_input
from tti.text.store import TextStore, build_store
from tti.training.latents import latent_dataset, open_latent_store
from tti.training.run_log import RunLog
from tti.training.utilisation import model_flops_per_image


def start_run(cfg: Config, info: distributed.DistInfo, args) -> RunLog:
    """Open the run directory's log (rank 0 writes; other ranks log nothing). config.yaml
    follows once the run's settings are settled (settle_config)."""
    run_dir = cfg.run_dir()
    log = RunLog(run_dir, info.is_main)
    log.print(f"run directory: {run_dir}  (world size {info.world_size}, device {info.device})")
    # The folder is named by run.dataset whatever --set changed: say what did change.
    log.print(f"config: {args.config}" + "".join(f" --set {item}" for item in args.set))
    return log


def settle_config(cfg: Config, args, info: distributed.DistInfo) -> None:
    """Rank 0 writes config.yaml, headed by the file and --set items it came from; called once
    any resume passed its checks, so a refused relaunch leaves the old one in place."""
    if info.is_main:
        save_config(cfg, os.path.join(cfg.run_dir(), "config.yaml"), source=args.config,
                    overrides=args.set)


def data_workers(cfg: Config, log: RunLog) -> int:
    """data.num_workers, capped by the CPUs this rank may use (shared by the node's ranks)."""
    asked, cpus = cfg.data.num_workers, len(usable_cpus())
    ranks = distributed.local_world_size()
    if asked <= cpus // ranks:
        return asked
    log.print(f"data.num_workers={asked} capped to {cpus // ranks}: this process may use "
              f"{cpus} CPU(s), shared by {ranks} rank(s) on this node")
    return cpus // ranks


def open_datasets(cfg: Config, info: distributed.DistInfo, workers: int):
    """Generate the embedded dataset if asked, pack the image caches (in `workers` processes),
    open both splits. Local rank 0 does the work on each node, so nodes need no shared disk."""
    d = cfg.data
    open_split = lambda split: load_split(d.root, split, d.image_size, cache_dir=d.cache_dir,
                                          num_workers=max(1, workers),
                                          max_bad_fraction=d.max_bad_fraction,
                                          seed=cfg.train.seed)
    if info.local_rank == 0:
        if d.generate_shapes:
            from tti.data.shapes import write_coco
            write_coco(d.root, n_train=d.shapes_train, n_val=d.shapes_val,
                       image_size=d.image_size, seed=0)
        for split in (d.train_split, d.val_split):
            open_split(split)
    distributed.barrier()  # the other ranks open the caches local rank 0 finished
    train_set = latent_dataset(cfg, open_split(d.train_split))  # latents, in a latent space
    if d.canonical_caption_fraction > 0:  # shapes only: a share of plain-word-order captions
        from tti.data.canonical import CanonicalCaptionMix
        train_set = CanonicalCaptionMix(train_set, d.canonical_caption_fraction, seed=cfg.train.seed)
    return train_set, open_split(d.val_split)


def make_loader(cfg: Config, info: distributed.DistInfo, train_set, workers: int,
                micro: int | None = None) -> DataLoader:
    """This rank's loader of micro-batches of `micro` images (default: the split the config
    states, Config.micro_batch) uint8 [B, 3, S, S] with B captions, in an order a resumed
    run can continue, read by `workers` processes (0: this one)."""
    tr = cfg.train
    micro = micro or cfg.micro_batch(info.world_size)
    sampler = ResumableSampler(train_set, num_replicas=info.world_size, rank=info.rank,
                               seed=tr.seed)
    loader = DataLoader(train_set, batch_size=micro, sampler=sampler, drop_last=True,
                        num_workers=workers, collate_fn=collate,
                        pin_memory=info.device.type == "cuda",
                        # Its own generator: creating an iterator must not draw from the
                        # global RNG, or a resumed run (new iterator mid-epoch) diverges.
                        generator=torch.Generator().manual_seed(tr.seed))
    check_epoch(cfg, info, train_set)
    return loader


def check_epoch(cfg: Config, info: distributed.DistInfo, train_set) -> None:
    """ConfigError unless an epoch holds at least one step: each rank's shard of the training
    set (drop_last) at least its share of train.batch_size, however that share splits."""
    if len(train_set) // info.world_size < cfg.train.batch_size // info.world_size:
        raise ConfigError(f"train.batch_size {cfg.train.batch_size} is larger than the training "
                          f"set ({len(train_set)} images)")


def build_model(cfg: Config, info: distributed.DistInfo, train_set, val_set, resume: dict | None,
                log: RunLog) -> TextToImage:
    """The model a config describes, on this rank's device, its text store open."""
    captions = [c for i in range(len(train_set)) for c in train_set.captions(i)]
    # alignDRAW's word vocabulary: rebuilt from the checkpoint on resume, else from the captions.
    vocab = resume.get("text_vocab") if resume else None
    model = build(cfg, train_captions=captions, vocab_state=vocab).to(info.device)
    if getattr(model.text, "use_cache", False):  # the captions matter where the store is built
        every = (captions + [c for i in range(len(val_set)) for c in val_set.captions(i)]
                 + cfg.sample.captions) if info.local_rank == 0 else []
        open_text_store(model.text, every, info, log)
    if model.autoencoder is not None:
        open_latent_store(model.autoencoder, train_set, cfg, info, log)
    n_params = sum(p.numel() for p in model.image_model.parameters())
    log.print(f"{model_label(cfg)}: {n_params / 1e6:.2f}M parameters")
    return model


def open_text_store(encoder, captions: list[str], info: distributed.DistInfo, log: RunLog) -> None:
    """A frozen encoder's states of `captions` (and ""), computed once: local rank 0 of each
    node writes the store, or adds what it lacks; then every rank maps it read-only.
    `captions` are read on local rank 0 only."""
    if info.local_rank == 0:
        t0 = time.time()
        n = build_store(encoder, captions, encoder.store_dir, progress=True)
        log.print(f"text store {encoder.store_dir}: {n} captions encoded in {time.time() - t0:.1f}s")
    distributed.barrier()
    encoder.use_store(TextStore(encoder.store_dir))


def for_training(model: TextToImage, cfg: Config, info: distributed.DistInfo):
    """The model as the loop calls it: behind DDP with several processes (wrapped after any
    resume: DDP broadcasts rank 0's weights), compiled if train.compile."""
    if info.enabled:
        model = DDP(model, device_ids=[info.local_rank] if info.device.type == "cuda" else None)
    return torch.compile(model) if cfg.train.compile else model


def count_flops(model: TextToImage, train_set, cfg: Config, info: distributed.DistInfo,
                amp: torch.dtype | None, log: RunLog, micro: int | None = None) -> float:
    """Training FLOPs per image, counted on the first `micro` training items (default: the
    config's split), the loader and the random streams untouched."""
    micro = micro or cfg.micro_batch(info.world_size)
    images, captions = collate([train_set[i] for i in range(micro)])
    flops = model_flops_per_image(model, model_input(images.to(info.device)), captions, amp)
    log.print(f"training FLOPs per image: {flops / 1e9:.3f} GFLOP (forward + backward, "
              f"torch.utils.flop_counter on {micro} images)")
    return flops
