"""Train a text-to-image model: one script for CPU, one GPU, N GPUs and N nodes.

CPU or a single GPU (the embedded default):
    python -m tti.train --config configs/shapes32.yaml
One node, 8 GPUs:
    torchrun --standalone --nproc_per_node=8 -m tti.train --config configs/coco64_ft_roberta.yaml
Two nodes, 8 GPUs each (run on every node; MASTER is node 0's address):
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=MASTER:29500 \
        --rdzv-id=tti-coco64 -m tti.train --config configs/coco64_ft_roberta.yaml
Survive worker failures (the group restarts and resumes from the last checkpoint):
    torchrun --max-restarts=3 --nproc_per_node=8 -m tti.train --config ...

Any config field can be overridden: `--set train.steps=200 --set run.run_idx=3`.
A run lives in results/<dataset>_<model>/<run_idx>/ and resumes automatically from its
checkpoints/latest.pt: model, EMA, optimizer, LR schedule, step, data order and RNGs.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from tti import distributed
from tti.checkpoint import (latest_checkpoint, load_checkpoint, rng_state, save_checkpoint,
                            set_rng_state)
from tti.config import Config, ConfigError, load_config, save_config, validate
from tti.data.sampler import ResumableSampler
from tti.ema import EMA
from tti.model import build, text_extra_state, to_model_range, trainable_state


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
    """Generate the embedded dataset if asked, pack the image cache (rank 0), open splits."""
    from tti.data.coco import load_split

    d = cfg.data
    if info.is_main:
        if d.generate_shapes:
            from tti.data.shapes import write_coco
            write_coco(d.root, n_train=d.shapes_train, n_val=d.shapes_val,
                       image_size=d.image_size, seed=0)
        for split in (d.train_split, d.val_split):
            load_split(d.root, split, d.image_size, cache_dir=d.cache_dir,
                       num_workers=max(1, d.num_workers), max_bad_fraction=d.max_bad_fraction)
    distributed.barrier()  # other ranks open the cache rank 0 finished
    open_split = lambda split: load_split(d.root, split, d.image_size, cache_dir=d.cache_dir,
                                          num_workers=max(1, d.num_workers),
                                          max_bad_fraction=d.max_bad_fraction,
                                          seed=cfg.train.seed)
    return open_split(d.train_split), open_split(d.val_split)


def collate(batch):
    images = torch.stack([b[0] for b in batch])
    return images, [b[1] for b in batch]


def autocast_dtype(cfg: Config, device: torch.device):
    p = cfg.train.precision
    if p == "auto":
        p = "bf16" if device.type == "cuda" else "fp32"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[p]


def main(argv=None) -> str:
    args = parse_args(argv)
    # ------------------------------------------------------------ setup
    info = distributed.setup(args.device)
    cfg = load_config(args.config, args.set)
    validate(cfg, world_size=info.world_size)
    tr = cfg.train
    run_dir = cfg.run_dir()
    if tr.deterministic:
        torch.use_deterministic_algorithms(True)
    # Same seed on every rank for the model's initial weights; per-rank streams after that.
    torch.manual_seed(tr.seed)
    log = RunLog(run_dir, info.is_main)
    if info.is_main:
        os.makedirs(run_dir, exist_ok=True)
        save_config(cfg, os.path.join(run_dir, "config.yaml"))
    log.print(f"run directory: {run_dir}  (world size {info.world_size}, device {info.device})")

    # ------------------------------------------------------------ data
    train_set, val_set = open_datasets(cfg, info)
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
    resume_path = latest_checkpoint(run_dir)
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
    optimizer = torch.optim.AdamW(groups, weight_decay=tr.weight_decay, betas=(0.9, 0.999))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    amp_dtype = autocast_dtype(cfg, info.device)
    scaler = torch.amp.GradScaler(info.device.type, enabled=amp_dtype is torch.float16)
    ema = EMA(model, tr.ema_decay)

    step, bad_steps = 0, 0
    if resume is not None:
        model.load_state_dict(resume["model"], strict=False)
        ema.load_state_dict(resume["ema"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        scaler.load_state_dict(resume["scaler"])
        step, bad_steps = resume["step"], resume.get("bad_steps", 0)
        set_rng_state(resume["rng"][info.rank])
        log.print(f"resumed from {resume_path} at step {step}")
    else:
        torch.manual_seed(tr.seed + info.rank)
        np.random.seed(tr.seed + info.rank)
        random.seed(tr.seed + info.rank)
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
    batches = iterate_batches(loader, sampler, train_set, steps_per_epoch, tr.grad_accum, step,
                              micro)
    model.train()
    progress = log.progress(step, tr.steps)
    t_last, seen = time.time(), 0
    while step < tr.steps:
        # Caption dropout from its own stream keyed by (seed, step, rank): identical after resume.
        drop_gen = torch.Generator().manual_seed((tr.seed * 1_000_003 + step) * 4099 + info.rank)
        optimizer.zero_grad(set_to_none=True)
        loss_sum, ok = 0.0, True
        for i, (images, captions) in enumerate(next(batches)):
            images = to_model_range(images.to(info.device, non_blocking=True))
            keep = torch.rand(len(captions), generator=drop_gen) >= cfg.text.caption_dropout
            captions = [c if k else "" for c, k in zip(captions, keep.tolist())]
            last = i == tr.grad_accum - 1
            sync = last or not info.enabled  # no all-reduce on inner accumulation steps
            with (ddp_model.no_sync() if not sync else _null()):
                with torch.autocast(info.device.type, dtype=amp_dtype or torch.float32,
                                    enabled=amp_dtype is not None):
                    loss = fwd(images, captions) / tr.grad_accum
                ok = distributed.all_ranks_true(bool(torch.isfinite(loss)), info.device) and ok
                if not ok:
                    break
                scaler.scale(loss).backward()
            loss_sum += loss.item()
            seen += len(captions) * info.world_size
        if ok:
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(
                [p for g in groups for p in g["params"]], tr.grad_clip if tr.grad_clip > 0 else float("inf"))
            ok = bool(torch.isfinite(grad_norm))
        if not ok:
            bad_steps += 1
            log.print(f"step {step}: non-finite loss or gradient ({bad_steps} so far, "
                      f"{tr.max_bad_steps} allowed); this step is skipped")
            if bad_steps > tr.max_bad_steps:
                raise NonFiniteLossError(
                    f"non-finite loss at step {step}; stopping. The last good checkpoint is "
                    f"{latest_checkpoint(run_dir) or '(none yet)'}; lower train.lr, or raise "
                    f"train.max_bad_steps to skip a bounded number of bad steps")
            optimizer.zero_grad(set_to_none=True)
            step += 1
            scheduler.step()
            continue
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        ema.update(model)
        step += 1
        progress.update(1)
        if step % tr.log_every == 0 or step == tr.steps:
            dt = time.time() - t_last
            log.scalars(step, {"loss": loss_sum, "grad_norm": float(grad_norm),
                               "lr": scheduler.get_last_lr()[0], "img_per_s": seen / max(dt, 1e-9)})
            progress.set_postfix(loss=f"{loss_sum:.4f}", img_s=f"{seen / max(dt, 1e-9):.0f}")
            t_last, seen = time.time(), 0
        if step % tr.ckpt_every == 0 or step == tr.steps:
            checkpoint(step)
        if monitor is not None and (step % tr.sample_every == 0 or step == tr.steps):
            monitor.run(model, ema, step, log)
    progress.close()
    log.close()
    distributed.cleanup()
    return run_dir


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def iterate_batches(loader, sampler, dataset, steps_per_epoch, accum, start_step, micro):
    """Yield lists of `accum` micro-batches forever, starting exactly at `start_step`."""
    epoch, offset = divmod(start_step, steps_per_epoch)
    while True:
        sampler.set_epoch(epoch, start=offset * accum * micro)
        dataset.set_epoch(epoch)
        it = iter(loader)
        for _ in range(steps_per_epoch - offset):
            yield [next(it) for _ in range(accum)]
        epoch, offset = epoch + 1, 0


class RunLog:
    """log.txt + tensorboard + tqdm, all on rank 0 only."""

    def __init__(self, run_dir: str, is_main: bool):
        self.is_main = is_main
        self.file = self.writer = None
        if is_main:
            os.makedirs(run_dir, exist_ok=True)
            self.file = open(os.path.join(run_dir, "log.txt"), "a")
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(os.path.join(run_dir, "tb"))

    def print(self, message: str) -> None:
        if self.is_main:
            from tqdm import tqdm
            tqdm.write(message)
            self.file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")
            self.file.flush()

    def scalars(self, step: int, values: dict) -> None:
        if self.is_main:
            for k, v in values.items():
                self.writer.add_scalar(f"train/{k}", v, step)
            self.file.write(f"step {step} " + " ".join(f"{k}={v:.5g}" for k, v in values.items()) + "\n")
            self.file.flush()

    def progress(self, start: int, total: int):
        from tqdm import tqdm
        return tqdm(total=total, initial=start, disable=not self.is_main, desc="train",
                    unit="step", dynamic_ncols=True, file=sys.stderr)

    def close(self) -> None:
        if self.is_main:
            self.writer.close()
            self.file.close()


if __name__ == "__main__":
    main()
