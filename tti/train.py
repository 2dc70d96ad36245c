"""Train a text-to-image model: one script for CPU, one GPU, N GPUs and N nodes.

CPU, or one GPU (the embedded default):
    python -m tti.train --config configs/shapes32.yaml
One node, 8 GPUs (one process per GPU; each picks its GPU by LOCAL_RANK):
    torchrun --standalone --nproc_per_node=8 -m tti.train --config configs/coco64_ft_roberta.yaml
Two nodes, 8 GPUs each: run this on every node (MASTER = node 0's address; the run
directory, under run.results_dir, must be on storage every node sees; the variable gives
every restart a new store, see tti/distributed.py):
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --nnodes=2 --nproc_per_node=8 \
        --rdzv-backend=c10d --rdzv-endpoint=MASTER:29500 --rdzv-id=tti-coco64 --max-restarts=3 \
        -m tti.train --config configs/coco64_ft_roberta.yaml
Survive worker failures: torchrun restarts the whole group (up to 3 times here) and every
rank resumes from the last checkpoint:
    torchrun --standalone --max-restarts=3 --nproc_per_node=8 -m tti.train --config ...

Any config field can be overridden: `--set train.steps=200 --set run.run_idx=3`.
A run lives in results/<dataset>_<model>/<run_idx>/ and resumes automatically from its
checkpoints/latest.pt: model, EMA, optimizer, LR schedule, step, data order and every
rank's RNGs (bitwise on CPU with train.deterministic=true). A relaunch may change the
settings tti/resume_config.py marks APPLIED (steps, lr, logging, ...): they are logged and
recorded in the run's history.jsonl; the others (model, data, text encoder, ...) are refused.
Only rank 0 writes logs, samples and checkpoints. A NaN/inf loss skips the step on all
ranks, and stops the run (NonFiniteLossError) once more than train.max_bad_steps steps were
bad; a step the fp16 loss scaler skips (inf/nan gradients) leaves the EMA alone. With
train.fid_every > 0, every rank samples its share of a fixed val subset for FID
(tti/fid_monitor.py) and checkpoints/best.pt keeps the step with the lowest.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import time
from dataclasses import dataclass, field

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from tti import distributed
from tti.checkpoint import latest_checkpoint
from tti.cli import UserError, run_cli
from tti.config import Config, ConfigError, load_config, save_config
from tti.data.coco import collate, load_split
from tti.data.sampler import ResumableSampler, resumable_batches, steps_per_epoch
from tti.fid_monitor import FIDMonitor
from tti.in_loop import InLoopMonitor
from tti.model import TextToImage, build, to_model_range
from tti.preflight import check_training
from tti.resume_config import record_launch, resume_changes
from tti.run_lock import lock_run_dir
from tti.run_log import RunLog, describe_data
from tti.text_store import TextStore, build_store
from tti.threads import use_free_cpus
from tti.train_state import (TrainState, find_checkpoint, make_train_state, resume_state,
                             save_train_state, seed_everything)
from tti.utilisation import model_flops_per_image, utilisation


class NonFiniteLossError(UserError, RuntimeError):
    """Training produced more NaN/inf losses than train.max_bad_steps allows."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML file under configs/")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. train.steps=200 (repeatable)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    return p.parse_args(argv)


# ---------------------------------------------------------------- setup


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
    """Rank 0 writes config.yaml, the config this run uses, headed by the file and the --set
    items it came from; called once any resume has passed its checks, so a refused relaunch
    leaves the old one in place."""
    if info.is_main:
        save_config(cfg, os.path.join(cfg.run_dir(), "config.yaml"), source=args.config,
                    overrides=args.set)


def data_workers(cfg: Config, log: RunLog) -> int:
    """data.num_workers, capped by the CPUs this rank may use (shared by the node's ranks)."""
    asked, cpus = cfg.data.num_workers, distributed.usable_cpus()
    ranks = distributed.local_world_size()
    if asked <= cpus // ranks:
        return asked
    log.print(f"data.num_workers={asked} capped to {cpus // ranks}: this process may use "
              f"{cpus} CPU(s), shared by {ranks} rank(s) on this node")
    return cpus // ranks


# ---------------------------------------------------------------- data


def open_datasets(cfg: Config, info: distributed.DistInfo, workers: int):
    """Generate the embedded dataset if asked, pack the image caches (in `workers` processes),
    open both splits.

    One process per node (local rank 0) does the work, so nodes need not share a disk.
    """
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
    train_set = open_split(d.train_split)
    if d.canonical_caption_fraction > 0:  # shapes only: a share of plain-word-order captions
        from tti.data.canonical import CanonicalCaptionMix
        train_set = CanonicalCaptionMix(train_set, d.canonical_caption_fraction, seed=cfg.train.seed)
    return train_set, open_split(d.val_split)


def make_loader(cfg: Config, info: distributed.DistInfo, train_set, workers: int) -> DataLoader:
    """This rank's loader of micro-batches (train.batch_size / world size / grad_accum
    images uint8 [B, 3, S, S] with B captions), in an order a resumed run can continue,
    read by `workers` processes (0: this one)."""
    tr = cfg.train
    micro = tr.batch_size // (info.world_size * tr.grad_accum)
    sampler = ResumableSampler(train_set, num_replicas=info.world_size, rank=info.rank,
                               seed=tr.seed)
    loader = DataLoader(train_set, batch_size=micro, sampler=sampler, drop_last=True,
                        num_workers=workers, collate_fn=collate,
                        pin_memory=info.device.type == "cuda",
                        # Its own generator: creating an iterator must not draw from the
                        # global RNG, or a resumed run (new iterator mid-epoch) diverges.
                        generator=torch.Generator().manual_seed(tr.seed))
    if steps_per_epoch(loader, tr.grad_accum) == 0:
        raise ConfigError(f"train.batch_size {tr.batch_size} is larger than the training set "
                          f"({len(train_set)} images)")
    return loader


# ---------------------------------------------------------------- model and optimizer


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
    n_params = sum(p.numel() for p in model.generator.parameters())
    log.print(f"{cfg.model.kind} model: {n_params / 1e6:.2f}M parameters")
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


# ---------------------------------------------------------------- one step, one log line


def train_step(state: TrainState, forward, micro_batches: list, cfg: Config,
               info: distributed.DistInfo) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """One optimizer step over the step's micro-batches; state.step advances by one.

    forward: the model as the loop calls it (behind DDP and torch.compile when they are on).
    The update (AdamW, EMA) runs only if every rank's loss and gradients are finite.
    Returns (loss summed over the micro-batches, gradient norm before clipping, updated).
    """
    tr = cfg.train
    # Caption dropout from its own stream keyed by (seed, step, rank): same after resume.
    drop = torch.Generator().manual_seed((tr.seed * 1_000_003 + state.step) * 4099 + info.rank)
    state.optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=info.device)
    for i, (images, captions) in enumerate(micro_batches):
        images = to_model_range(images.to(info.device, non_blocking=True))
        keep = torch.rand(len(captions), generator=drop) >= cfg.text.caption_dropout
        captions = [c if k else "" for c, k in zip(captions, keep.tolist())]
        inner = info.enabled and i < tr.grad_accum - 1  # no all-reduce until the last
        with forward.no_sync() if inner else contextlib.nullcontext():
            with torch.autocast(info.device.type, dtype=state.amp or torch.float32,
                                enabled=state.amp is not None):
                loss = forward(images, captions) / tr.grad_accum
            state.scaler.scale(loss).backward()
        loss_sum += loss.detach().float()
    state.scaler.unscale_(state.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(state.trained_parameters(),
                                               tr.grad_clip or float("inf"))
    # NaN/inf gradients count as bad unless the fp16 scaler is on: it skips those steps itself.
    finite = torch.isfinite(loss_sum) & (torch.isfinite(grad_norm) | state.scaler.is_enabled())
    state.step += 1
    updated = distributed.all_ranks_true(finite, info.device)
    scale = state.scaler.get_scale()
    if updated:
        state.scaler.step(state.optimizer)
    state.scaler.update()
    # The fp16 scaler skips the optimizer step on inf/nan gradients, and then lowers its scale.
    if updated and state.scaler.get_scale() >= scale:
        state.ema.update(state.model)
    state.scheduler.step()
    return loss_sum, grad_norm, updated


def count_bad_step(state: TrainState, cfg: Config, log: RunLog) -> None:
    """Log a skipped step; raise NonFiniteLossError past train.max_bad_steps."""
    state.bad_steps += 1
    limit = cfg.train.max_bad_steps
    log.print(f"step {state.step}: non-finite loss or gradient, step skipped "
              f"({state.bad_steps} bad so far, train.max_bad_steps={limit})")
    if state.bad_steps > limit:
        raise NonFiniteLossError(
            f"non-finite loss or gradient at step {state.step} ({state.bad_steps} bad steps, "
            f"train.max_bad_steps={limit}); stopping. The last good checkpoint is "
            f"{latest_checkpoint(cfg.run_dir()) or '(none yet)'}; lower train.lr, or raise "
            f"train.max_bad_steps to skip a few bad steps")


def count_flops(model: TextToImage, train_set, cfg: Config, info: distributed.DistInfo,
                amp: torch.dtype | None, log: RunLog) -> float:
    """Training FLOPs per image, counted once on one micro-batch of the first training items
    (the loader and the random streams are left untouched)."""
    micro = cfg.train.batch_size // (info.world_size * cfg.train.grad_accum)
    images, captions = collate([train_set[i] for i in range(micro)])
    flops = model_flops_per_image(model, to_model_range(images.to(info.device)), captions, amp)
    log.print(f"training FLOPs per image: {flops / 1e9:.3f} GFLOP (forward + backward, "
              f"torch.utils.flop_counter on {micro} images)")
    return flops


@dataclass
class Interval:
    """Where the run was at the last log line, and the data-loader wait since then (s);
    the run's training FLOPs per image (0 on ranks that do not log)."""
    start_step: int
    flops_per_image: float = 0.0
    start: float = field(default_factory=time.perf_counter)
    data_wait: float = 0.0


def log_interval(interval: Interval, state: TrainState, loss_sum: torch.Tensor,
                 grad_norm: torch.Tensor, cfg: Config, info: distributed.DistInfo, log: RunLog,
                 progress) -> Interval:
    """One log line (loss averaged over ranks, throughput, FLOP/s, data wait, peak memory);
    the next interval."""
    elapsed = max(time.perf_counter() - interval.start, 1e-9)
    images_per_s = (state.step - interval.start_step) * cfg.train.batch_size / elapsed
    loss = distributed.mean_over_ranks(loss_sum)
    log.scalars(state.step, {"loss": loss, "grad_norm": float(grad_norm),
                             "lr": state.scheduler.get_last_lr()[0], "img_per_s": images_per_s,
                             "data_wait": interval.data_wait / elapsed,
                             **utilisation(images_per_s, interval.flops_per_image,
                                           info.world_size, info.device)})
    progress.set_postfix(loss=f"{loss:.4f}", img_s=f"{images_per_s:.0f}")
    return Interval(state.step, interval.flops_per_image)


# ---------------------------------------------------------------- main


def main(argv=None) -> str:
    """Train the run `argv` describes (see the module docstring); returns its run directory."""
    args = parse_args(argv)
    # ------------------------------------------------------------ setup
    cfg = load_config(args.config, args.set)
    # Config and encoder mistakes fail here: no process group, no data packed, no run directory.
    check_training(cfg, distributed.world_size_from_env())
    info = distributed.setup(args.device)
    tr, run_dir = cfg.train, cfg.run_dir()
    if tr.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(tr.seed)  # same initial weights on every rank; per-rank streams later
    run_lock = lock_run_dir(run_dir) if info.is_main else None  # one writer per run directory
    resume_path, resume = find_checkpoint(run_dir, info)
    # A setting that cannot change mid-run fails here, before any file is written.
    changes = resume_changes(resume["config"], cfg, resume["step"], resume_path) if resume else {}
    log = start_run(cfg, info, args)

    # ------------------------------------------------------------ data
    workers = data_workers(cfg, log)
    train_set, val_set = open_datasets(cfg, info, workers)
    if info.is_main:  # images kept, and what prepare skipped and why
        for split in (train_set, val_set):
            log.print(describe_data(split))
    loader = make_loader(cfg, info, train_set, workers)

    # ------------------------------------------------------------ model and optimizer
    model = build_model(cfg, info, train_set, val_set, resume, log)
    state = make_train_state(cfg, model, info.device, log)
    state.data = train_set.fingerprint()

    # ------------------------------------------------------------ resume
    if resume is None:
        seed_everything(tr.seed + info.rank)  # each rank its own random streams from here on
    else:
        resume_state(state, resume, resume_path, cfg, info, log)
        log.print(f"resumed from {resume_path} at step {state.step}")
    del resume  # its tensors now live in `state`
    settle_config(cfg, args, info)
    record_launch(run_dir, state.step, changes, resume_path, info.world_size, log)
    flops = count_flops(model, train_set, cfg, info, state.amp, log) if info.is_main else 0.0
    forward = for_training(model, cfg, info)

    # ------------------------------------------------------------ loop
    batches = resumable_batches(loader, tr.grad_accum, start_step=state.step)
    monitor = InLoopMonitor(cfg, run_dir, val_set, info) if info.is_main else None
    fid = FIDMonitor(cfg, val_set, info, log) if tr.fid_every else None  # on every rank
    model.train()
    progress = log.progress(state.step, tr.steps)
    interval = Interval(state.step, flops)
    try:
        while state.step < tr.steps:
            t_fetch = time.perf_counter()
            micro_batches = next(batches)
            interval.data_wait += time.perf_counter() - t_fetch
            loss_sum, grad_norm, updated = train_step(state, forward, micro_batches, cfg, info)
            if not updated:
                count_bad_step(state, cfg, log)
            progress.update(1)
            last = state.step == tr.steps
            if state.step % tr.log_every == 0 or last:
                interval = log_interval(interval, state, loss_sum, grad_norm, cfg, info, log,
                                        progress)
            if state.step % tr.ckpt_every == 0 or last:
                save_train_state(state, cfg, info, log)
            # The last step samples too, unless train.sample_at_end is off (the caller samples
            # next) or the run is shorter than one interval (a smoke run's grid shows nothing
            # learnt and can cost minutes on a CPU), even when it falls on the interval.
            if last:
                sample_now = tr.sample_at_end and tr.steps >= tr.sample_every
            else:
                sample_now = state.step % tr.sample_every == 0
            if monitor is not None and sample_now:
                monitor.run(model, state.ema, state.step, log)
            if fid is not None and fid.due(state.step, last):
                fid.run(state, log)
    finally:
        progress.close()
        log.close()
        if run_lock is not None:
            run_lock.release()
    distributed.cleanup()
    return run_dir


if __name__ == "__main__":
    use_free_cpus()  # not in main(): in-process callers (tests) keep their own thread count
    run_cli(main)
