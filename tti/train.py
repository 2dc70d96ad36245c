"""Train a text-to-image model: one script for CPU, one GPU, N GPUs and N nodes.

CPU, or one GPU:
    python -m tti.train --config configs/shapes32.yaml
One node, 8 GPUs (one process per GPU; each picks its GPU by LOCAL_RANK):
    torchrun --standalone --nproc_per_node=8 -m tti.train --config configs/coco64_ft_roberta.yaml
Two nodes, 8 GPUs each: run this on every node (MASTER = node 0's address; the run
directory, under run.results_dir, must be on storage every node sees; the variable gives
every restart a new store, see tti/infra/distributed.py):
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --nnodes=2 --nproc_per_node=8 \
        --rdzv-backend=c10d --rdzv-endpoint=MASTER:29500 --rdzv-id=tti-coco64 --max-restarts=3 \
        -m tti.train --config configs/coco64_ft_roberta.yaml
With --max-restarts=N, torchrun restarts the whole group after a worker failure and every
rank resumes from the last checkpoint.

Any config field can be overridden: `--set train.steps=200 --set run.run_idx=3`.
A run lives in results/<dataset>_<model>/<run_idx>/ and resumes from its checkpoints/latest.pt
(model, EMA, optimizer, LR schedule, data order, every rank's RNGs: bitwise on CPU with
train.deterministic=true); a relaunch may change only the settings tti/config/resume.py marks
APPLIED (recorded in history.jsonl). train.batch_size is the global batch; train.micro_batch
(auto: the largest that fits each GPU) sets how much of it a process runs per forward pass,
the rest by gradient accumulation. Only rank 0 writes logs, samples and checkpoints. A NaN/inf
loss skips the step on all ranks; running out of GPU memory, or more than train.max_bad_steps
bad steps, stops the run in one line naming the fix. With train.fid_every > 0,
checkpoints/best.pt keeps the step of lowest FID (tti/training/fid_monitor.py).
"""
from __future__ import annotations

import argparse
import os

import torch

from tti.config.load import load_config
from tti.config.resume import resume_changes
from tti.data.order import resumable_batches
from tti.infra import distributed
from tti.infra.cli import run_cli
from tti.infra.run_lock import lock_run_dir
from tti.infra.threads import use_free_cpus
from tti.preflight import check_training
from tti.training.batch_plan import longest_captions, plan_batches
from tti.training.fid_monitor import FIDMonitor
from tti.training.loop import train_loop
from tti.training.run_log import describe_data, record_launch
from tti.training.sample_monitor import SampleMonitor
from tti.training.setup import (build_model, check_epoch, count_flops, data_workers, for_training,
                                make_loader, open_datasets, settle_config, start_run)
from tti.training.state import find_checkpoint, make_train_state, resume_state, seed_everything


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML file under configs/")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. train.steps=200 (repeatable)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    return p.parse_args(argv)


def main(argv=None) -> str:
    """Train the run `argv` describes (see the module docstring); returns its run directory."""
    args = parse_args(argv)
    # ------------------------------------------------------------ setup
    cfg = load_config(args.config, args.set)
    # Config and encoder mistakes fail here: no process group, no data packed, no run directory.
    check_training(cfg, distributed.world_size_from_env(), args.device)
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
    check_epoch(cfg, info, train_set)  # before the model is built (the loader comes later)

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

    # ------------------------------------------------------------ micro-batch and loader
    plan = plan_batches(cfg, info, state, longest_captions(train_set), log)  # auto: measured
    loader = make_loader(cfg, info, train_set, workers, plan.micro)
    record_launch(log, state.step, changes, resume_path, info.world_size, plan.record())
    flops = (count_flops(model, train_set, cfg, info, state.amp, log, plan.micro)
             if info.is_main else 0.0)
    forward = for_training(model, cfg, info)

    # ------------------------------------------------------------ loop
    batches = resumable_batches(loader, plan.accum, start_step=state.step)
    samples = SampleMonitor(cfg, run_dir, val_set, info) if info.is_main else None
    fid = FIDMonitor(cfg, val_set, info, log) if tr.fid_every else None  # on every rank
    try:
        train_loop(state, forward, batches, cfg, info, log, samples, fid, flops)
    finally:
        log.close()
        if run_lock is not None:
            run_lock.release()
    distributed.cleanup()
    return run_dir


if __name__ == "__main__":
    use_free_cpus()  # not in main(): in-process callers (tests) keep their own thread count
    run_cli(main)
