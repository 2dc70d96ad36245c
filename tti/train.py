"""Train a text-to-image model: one script for CPU, one GPU, N GPUs and N nodes.

CPU or a single GPU (the embedded default):
    python -m tti.train --config configs/shapes32.yaml
One node, 8 GPUs (one process per GPU; each picks its GPU by LOCAL_RANK):
    torchrun --standalone --nproc_per_node=8 -m tti.train --config configs/coco64_ft_roberta.yaml
Two nodes, 8 GPUs each: run this on every node (MASTER = node 0's address; the run
directory, under run.results_dir, must be on storage every node sees):
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=MASTER:29500 \
        --rdzv-id=tti-coco64 -m tti.train --config configs/coco64_ft_roberta.yaml
Survive worker failures: torchrun restarts the whole group (up to 3 times here) and every
rank resumes from the last checkpoint:
    torchrun --standalone --max-restarts=3 --nproc_per_node=8 -m tti.train --config ...

Any config field can be overridden: `--set train.steps=200 --set run.run_idx=3`.
A run lives in results/<dataset>_<model>/<run_idx>/ and resumes automatically from its
checkpoints/latest.pt: model, EMA, optimizer, LR schedule, step, data order and every
rank's RNGs (bitwise on CPU with train.deterministic=true). Only rank 0 writes logs,
samples and checkpoints. A NaN/inf loss skips the step on all ranks, and stops the run
(NonFiniteLossError) once more than train.max_bad_steps steps were bad. Debug and test
switches (TTI_CHECK_REPLICAS, TTI_FAULT_AT_STEP) are described in tti/distributed.py.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import time

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from tti import distributed
from tti.checkpoint import (CheckpointError, latest_checkpoint, load_checkpoint, rng_state,
                            save_checkpoint, set_rng_state)
from tti.config import Config, ConfigError, load_config, save_config, validate
from tti.data.sampler import ResumableSampler, resumable_batches
from tti.ema import EMA
from tti.model import (amp_dtype, build, precision_name, text_extra_state, to_model_range,
                       trainable_state)
from tti.run_lock import lock_run_dir
from tti.run_log import RunLog, describe_data


class NonFiniteLossError(RuntimeError):
    """Training produced more NaN/inf losses than train.max_bad_steps allows."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML file under configs/")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. train.steps=200 (repeatable)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    return p.parse_args(argv)


def lr_lambda(cfg: Config):
    tr = cfg.train

    def factor(step: int) -> float:
        if step < tr.warmup_steps:
            return (step + 1) / tr.warmup_steps
        if tr.lr_decay == "cosine":
            progress = (step - tr.warmup_steps) / max(1, tr.steps - tr.warmup_steps)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0
    return factor


def open_datasets(cfg: Config, info):
    """Generate the embedded dataset if asked, pack the image caches, open both splits.

    One process per node (local rank 0) does the work, so nodes need not share a disk.
    """
    from tti.data.coco import load_split

    d = cfg.data
    open_split = lambda split: load_split(d.root, split, d.image_size, cache_dir=d.cache_dir,
                                          num_workers=max(1, d.num_workers),
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
    train_set = open_split(d.train_split)
    if d.canonical_caption_fraction > 0:  # shapes only: a share of plain-word-order captions
        from tti.data.canonical import CanonicalCaptionMix
        train_set = CanonicalCaptionMix(train_set, d.canonical_caption_fraction, seed=cfg.train.seed)
    return train_set, open_split(d.val_split)


def collate(batch):
    images = torch.stack([b[0] for b in batch])
    return images, [b[1] for b in batch]


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def main(argv=None) -> str:
    args = parse_args(argv)
    # ------------------------------------------------------------ setup
    info = distributed.setup(args.device)
    cfg = load_config(args.config, args.set)
    validate(cfg, world_size=info.world_size)  # fails before any file is written
    tr = cfg.train
    run_dir = cfg.run_dir()
    if tr.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it
        torch.use_deterministic_algorithms(True)
    check_replicas = os.environ.get("TTI_CHECK_REPLICAS") == "1"
    torch.manual_seed(tr.seed)  # same initial weights on every rank; per-rank streams later
    run_lock = lock_run_dir(run_dir) if info.is_main else None  # one writer per run directory
    log = RunLog(run_dir, info.is_main)
    if info.is_main:
        save_config(cfg, os.path.join(run_dir, "config.yaml"))
    log.print(f"run directory: {run_dir}  (world size {info.world_size}, device {info.device})")

    # ------------------------------------------------------------ data
    train_set, val_set = open_datasets(cfg, info)
    if info.is_main:  # images kept, and what prepare skipped and why
        for split in (train_set, val_set):
            log.print(describe_data(split))
    micro = tr.batch_size // (info.world_size * tr.grad_accum)
    sampler = ResumableSampler(train_set, num_replicas=info.world_size, rank=info.rank,
                               seed=tr.seed)
    loader = DataLoader(train_set, batch_size=micro, sampler=sampler, drop_last=True,
                        num_workers=cfg.data.num_workers, collate_fn=collate,
                        pin_memory=info.device.type == "cuda",
                        # Its own generator: creating an iterator must not draw from the
                        # global RNG, or a resumed run (new iterator mid-epoch) diverges.
                        generator=torch.Generator().manual_seed(tr.seed))
    steps_per_epoch = (sampler.num_samples // micro) // tr.grad_accum
    if steps_per_epoch == 0:
        raise ConfigError(f"train.batch_size {tr.batch_size} is larger than the training set "
                          f"({len(train_set)} images)")

    # ------------------------------------------------------------ model
    # Rank 0 picks the checkpoint, so every rank resumes from the same one.
    resume_path = distributed.broadcast_object(latest_checkpoint(run_dir))
    if resume_path and not os.path.isfile(resume_path):
        raise CheckpointError(f"rank {info.rank} cannot see {resume_path}, which rank 0 resumes "
                              f"from: run.results_dir must be on storage shared by all nodes")
    resume = load_checkpoint(resume_path) if resume_path else None
    all_captions = [c for i in range(len(train_set)) for c in train_set.captions(i)]
    model = build(cfg, train_captions=all_captions,
                  vocab_state=resume.get("text_vocab") if resume else None).to(info.device)
    if hasattr(model.text, "warm"):
        t0 = time.time()
        n = model.text.warm(all_captions + cfg.sample.captions, progress=info.is_main)
        log.print(f"text cache: {n} distinct captions encoded in {time.time() - t0:.1f}s")
    n_params = sum(p.numel() for p in model.generator.parameters())
    log.print(f"{cfg.model.kind} model: {n_params / 1e6:.2f}M parameters")

    groups = [{"params": [p for p in model.generator.parameters() if p.requires_grad],
               "lr": tr.lr}]
    text_params = [p for p in model.text.parameters() if p.requires_grad]
    if text_params:
        groups.append({"params": text_params, "lr": cfg.text.lr})
    trained = [p for g in groups for p in g["params"]]
    # The fused kernel updates all parameters in one call; the per-parameter loop was ~5% of
    # a shapes32 CPU step in torch.profiler (same update rule; the throughput bench uses it too).
    optimizer = torch.optim.AdamW(groups, weight_decay=tr.weight_decay, betas=(0.9, 0.999),
                                  fused=info.device.type in ("cpu", "cuda"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    amp = amp_dtype(tr.precision, info.device)
    model.sample_dtype = amp  # in-loop grids sample at the training precision
    log.print(f"precision: {precision_name(amp)} (train.precision={tr.precision})")
    scaler = torch.amp.GradScaler(info.device.type, enabled=amp is torch.float16)
    ema = EMA(model, tr.ema_decay)

    step, bad_steps = 0, 0
    if resume is not None:
        model.load_state_dict(resume["model"], strict=False)
        ema.load_state_dict(resume["ema"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        scaler.load_state_dict(resume["scaler"])
        step, bad_steps = resume["step"], resume.get("bad_steps", 0)
        if len(resume["rng"]) == info.world_size:
            set_rng_state(resume["rng"][info.rank])
        else:  # another world size: per-rank random streams cannot continue
            seed_everything(tr.seed + 1_000_003 * step + info.rank)
            log.print(f"warning: the checkpoint was written by {len(resume['rng'])} ranks, this "
                      f"run has {info.world_size}: random streams re-seeded")
        log.print(f"resumed from {resume_path} at step {step}")
    else:
        seed_everything(tr.seed + info.rank)
    del resume

    ddp_model = DDP(model, device_ids=[info.local_rank] if info.device.type == "cuda" else None) \
        if info.enabled else model
    fwd = torch.compile(ddp_model) if tr.compile else ddp_model

    def checkpoint(at_step: int) -> None:
        rngs = distributed.all_gather_object(rng_state())  # every rank's RNG, for exact resume
        if info.is_main:
            state = {"model": trainable_state(model), "ema": ema.state_dict(),
                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "scaler": scaler.state_dict(), "step": at_step, "bad_steps": bad_steps,
                     "rng": rngs, "config": cfg.to_dict(), "text_vocab": text_extra_state(model),
                     "world_size": info.world_size}
            path = save_checkpoint(state, run_dir, at_step, keep_last=tr.keep_last)
            log.print(f"step {at_step}: checkpoint {path}")
        distributed.barrier()

    # ------------------------------------------------------------ loop
    from tti.in_loop import InLoopMonitor

    monitor = InLoopMonitor(cfg, run_dir, val_set, info) if info.is_main else None
    batches = resumable_batches(loader, sampler, train_set, steps_per_epoch, tr.grad_accum,
                                micro, start_step=step)
    model.train()
    progress = log.progress(step, tr.steps)
    t_last, seen, data_wait = time.perf_counter(), 0, 0.0
    try:
        while step < tr.steps:
            t_fetch = time.perf_counter()
            micro_batches = next(batches)
            data_wait += time.perf_counter() - t_fetch
            # Caption dropout from its own stream keyed by (seed, step, rank): same after resume.
            drop_gen = torch.Generator().manual_seed((tr.seed * 1_000_003 + step) * 4099 + info.rank)
            optimizer.zero_grad(set_to_none=True)
            loss_sum = torch.zeros((), device=info.device)
            for i, (images, captions) in enumerate(micro_batches):
                images = to_model_range(images.to(info.device, non_blocking=True))
                keep = torch.rand(len(captions), generator=drop_gen) >= cfg.text.caption_dropout
                captions = [c if k else "" for c, k in zip(captions, keep.tolist())]
                inner = info.enabled and i < tr.grad_accum - 1  # no all-reduce until the last
                with ddp_model.no_sync() if inner else contextlib.nullcontext():
                    with torch.autocast(info.device.type, dtype=amp or torch.float32,
                                        enabled=amp is not None):
                        loss = fwd(images, captions) / tr.grad_accum
                    scaler.scale(loss).backward()
                loss_sum += loss.detach().float()
                seen += len(captions) * info.world_size
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(trained, tr.grad_clip or float("inf"))
            # A NaN/inf loss on any rank (or NaN/inf gradients, unless the fp16 scaler is on,
            # which skips those steps itself) skips this step on every rank.
            finite = torch.isfinite(loss_sum) & (torch.isfinite(grad_norm) | scaler.is_enabled())
            step += 1
            if distributed.all_ranks_true(finite, info.device):
                scaler.step(optimizer)
                ema.update(model)
            else:
                bad_steps += 1
                log.print(f"step {step}: non-finite loss or gradient, step skipped "
                          f"({bad_steps} bad so far, train.max_bad_steps={tr.max_bad_steps})")
                if bad_steps > tr.max_bad_steps:
                    raise NonFiniteLossError(
                        f"non-finite loss or gradient at step {step} ({bad_steps} bad steps, "
                        f"train.max_bad_steps={tr.max_bad_steps}); stopping. The last good "
                        f"checkpoint is {latest_checkpoint(run_dir) or '(none yet)'}; lower "
                        f"train.lr, or raise train.max_bad_steps to skip a few bad steps")
            scaler.update()
            scheduler.step()
            progress.update(1)
            if check_replicas:
                distributed.assert_replicas_equal(model, step)
            if step % tr.log_every == 0 or step == tr.steps:
                dt = time.perf_counter() - t_last
                loss_mean = distributed.mean_over_ranks(loss_sum)
                log.scalars(step, {"loss": loss_mean, "grad_norm": float(grad_norm),
                                   "lr": scheduler.get_last_lr()[0],
                                   "img_per_s": seen / max(dt, 1e-9),
                                   "data_wait": data_wait / max(dt, 1e-9)})
                progress.set_postfix(loss=f"{loss_mean:.4f}", img_s=f"{seen / max(dt, 1e-9):.0f}")
                t_last, seen, data_wait = time.perf_counter(), 0, 0.0
            if step % tr.ckpt_every == 0 or step == tr.steps:
                checkpoint(step)
            if monitor is not None and (step % tr.sample_every == 0 or step == tr.steps):
                monitor.run(model, ema, step, log)
            distributed.maybe_inject_fault(step, info.rank, info.world_size, run_dir)
    finally:
        progress.close()
        log.close()
        if run_lock is not None:
            run_lock.release()
    distributed.cleanup()
    return run_dir


if __name__ == "__main__":
    from tti.cli import run_cli
    run_cli(main)
