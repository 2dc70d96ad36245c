"""What a training run carries from step to step and across restarts: `TrainState` (model,
EMA, optimizer, LR schedule, fp16 loss scaler, step counters), made fresh, saved as one
checkpoint with the config and every rank's RNG states, and resumed from the latest one."""
from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from tti.config.errors import ConfigError
from tti.config.schema import Config
from tti.infra import distributed
from tti.infra.checkpoints import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from tti.infra.precision import amp_dtype, precision_name
from tti.models.text_to_image import (TextToImage, current_names, load_trainable_state,
                                      text_extra_state, trainable_state)
from tti.training.ema import EMA
from tti.training.run_log import RunLog


@dataclass
class TrainState:
    """What the loop updates and a checkpoint holds (besides the config and RNG states)."""
    model: TextToImage
    ema: EMA
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    amp: torch.dtype | None  # autocast dtype of the forward pass; None = fp32
    step: int = 0
    bad_steps: int = 0
    data: str | None = None  # the training split's fingerprint (CaptionDataset.fingerprint)

    def trained_parameters(self) -> list:
        return [p for group in self.optimizer.param_groups for p in group["params"]]


def rng_state() -> dict:
    """Every random state a resumed run needs: python, numpy, torch CPU and CUDA, as plain
    data (tuples of numbers, byte tensors) that a weights-only load reads back."""
    kind, key, *rest = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": (kind, key.tolist(), *rest),  # the uint32 key array as a list of ints
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    """Restore `rng_state()`'s states (or a legacy checkpoint's, whose numpy key is an array)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, key, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(key, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def lr_lambda(cfg: Config):
    """Step -> learning-rate factor: linear warm-up, then constant or cosine down to 0.1."""
    tr = cfg.train

    def factor(step: int) -> float:
        if step < tr.warmup_steps:
            return (step + 1) / tr.warmup_steps
        if tr.lr_decay == "cosine":
            progress = (step - tr.warmup_steps) / max(1, tr.steps - tr.warmup_steps)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0
    return factor


def group_lrs(cfg: Config) -> list:
    """Base learning rates of the optimizer's groups: the image model's, then a fine-tuned
    encoder's (a model with a frozen encoder has the first group only)."""
    return [cfg.train.lr, cfg.text.lr]


def make_train_state(cfg: Config, model: TextToImage, device: torch.device, log: RunLog) -> TrainState:
    """AdamW over the trainable weights (a fine-tuned encoder at text.lr), its LR schedule,
    the fp16 loss scaler (off otherwise) and the EMA, all fresh."""
    tr = cfg.train
    image_lr, text_lr = group_lrs(cfg)
    groups = [{"params": [p for p in model.image_model.parameters() if p.requires_grad],
               "lr": image_lr}]
    text_params = [p for p in model.text.parameters() if p.requires_grad]
    if text_params:
        groups.append({"params": text_params, "lr": text_lr})
    # Fused: one kernel updates every parameter (the per-parameter loop costs time on CPU).
    optimizer = torch.optim.AdamW(groups, weight_decay=tr.weight_decay, betas=(0.9, 0.999),
                                  fused=device.type in ("cpu", "cuda"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    amp = amp_dtype(tr.precision, device)
    model.sample_dtype = amp  # in-loop grids sample at the training precision
    log.print(f"precision: {precision_name(amp)} (train.precision={tr.precision})")
    scaler = torch.amp.GradScaler(device.type, enabled=amp is torch.float16)
    return TrainState(model, EMA(model, tr.ema_decay), optimizer, scheduler, scaler, amp)


def find_checkpoint(run_dir: str, info: distributed.DistInfo) -> tuple[str | None, dict | None]:
    """(path, contents) of the checkpoint this run resumes from, or (None, None) when fresh.
    Rank 0 picks it, so every rank resumes from the same one."""
    path = distributed.broadcast_object(latest_checkpoint(run_dir))
    if path is None:
        return None, None
    if not os.path.isfile(path):
        raise CheckpointError(f"rank {info.rank} cannot see {path}, which rank 0 resumes "
                              f"from: run.results_dir must be on storage shared by all nodes")
    return path, load_checkpoint(path)


def resume_state(state: TrainState, resume: dict, path: str, cfg: Config,
                 info: distributed.DistInfo, log: RunLog) -> None:
    """Load the checkpoint at `path` (the contents `find_checkpoint` returned) into `state`:
    weights and EMA strictly, optimizer moments, step, this rank's RNGs. The config's
    hyperparameters win over the checkpoint's (follow_config). Raises CheckpointError when
    the weights do not fit the model, ConfigError when the training data changed."""
    if resume.get("data") is not None and resume["data"] != state.data:
        raise ConfigError(f"{path}: the training data differ from the data this run trained "
                          f"on (data.root={cfg.data.root}, {cfg.data.train_split}: other images "
                          f"or captions); point data.root at that data, or set another "
                          f"run.run_idx to start a new run", ("data.root",))
    try:
        load_trainable_state(state.model, resume["model"])
        state.ema.load_state_dict({**resume["ema"], "shadow": current_names(resume["ema"]["shadow"])})
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    state.optimizer.load_state_dict(resume["optimizer"])
    state.scheduler.load_state_dict(resume["scheduler"])
    if state.scaler.is_enabled() and not resume["scaler"]:
        log.print("fp16 loss scaler starts fresh (the checkpoint was trained without it)")
    else:
        state.scaler.load_state_dict(resume["scaler"])  # a no-op when the scaler is off
    state.step, state.bad_steps = resume["step"], resume.get("bad_steps", 0)
    saved_lr = state.optimizer.param_groups[0]["lr"]
    follow_config(state, cfg)
    lr = state.optimizer.param_groups[0]["lr"]
    if lr != saved_lr:
        log.print(f"learning rate at step {state.step}: {saved_lr:.6g} -> {lr:.6g} "
                  f"(the schedule of train.lr/warmup_steps/lr_decay/steps as configured now)")
    if len(resume["rng"]) == info.world_size:
        set_rng_state(resume["rng"][info.rank])
    else:  # another world size: per-rank random streams cannot continue
        seed_everything(cfg.train.seed + 1_000_003 * state.step + info.rank)
        log.print(f"warning: the checkpoint was written by {len(resume['rng'])} ranks, this "
                  f"run has {info.world_size}: random streams re-seeded")


def follow_config(state: TrainState, cfg: Config) -> None:
    """Make a loaded optimizer and schedule (which hold the settings they were saved with)
    follow `cfg`: each group's base LR (train.lr, text.lr), weight decay, and the LR of
    `cfg`'s schedule at the resumed step, as if the run had been launched with `cfg`."""
    scheduler, groups = state.scheduler, state.optimizer.param_groups
    scheduler.base_lrs = group_lrs(cfg)[:len(groups)]
    for group, base, factor in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas):
        # base * factor(step): LambdaLR's own arithmetic, so an unchanged config resumes bitwise.
        group.update(initial_lr=base, lr=base * factor(scheduler.last_epoch),
                     weight_decay=cfg.train.weight_decay)


def checkpoint_contents(state: TrainState, cfg: Config, info: distributed.DistInfo) -> dict | None:
    """What a checkpoint of `state` holds, every rank's RNG states included: the dict on rank
    0, None elsewhere. A collective: every rank calls it."""
    rngs = distributed.all_gather_object(rng_state())  # every rank's RNG, for exact resume
    if not info.is_main:
        return None
    return {"model": trainable_state(state.model), "ema": state.ema.state_dict(),
            "optimizer": state.optimizer.state_dict(), "scheduler": state.scheduler.state_dict(),
            "scaler": state.scaler.state_dict(), "step": state.step,
            "bad_steps": state.bad_steps, "rng": rngs, "config": cfg.to_dict(),
            "text_vocab": text_extra_state(state.model), "world_size": info.world_size,
            "data": state.data}


def save_train_state(state: TrainState, cfg: Config, info: distributed.DistInfo, log: RunLog) -> None:
    """Rank 0 writes a checkpoint of `state` with every rank's RNG states; all ranks wait."""
    checkpoint = checkpoint_contents(state, cfg, info)
    if info.is_main:
        path = save_checkpoint(checkpoint, cfg.run_dir(), state.step, keep_last=cfg.train.keep_last)
        log.print(f"step {state.step}: checkpoint {path}")
    distributed.barrier()
