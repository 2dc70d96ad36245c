"""What a launch checks before it starts processes, packs data or makes a run directory: the
config is valid for the processes that share its batch, the text encoder's weights can be
found, the checkpoint it would resume from (or sample) asks to run no code, and on CUDA the
GPUs can run it (a driver, the ids named, enough free memory on each for the config's
estimate, tti/training/memory_estimate.py; a GPU per process). `tti.train` runs
`check_training` before it joins the process group; the bash launchers run this module once
before torchrun, so a mistake prints one line instead of one per rank:

    python -m tti.preflight --world-size 4 --config configs/coco64_ft_roberta.yaml --set ...
    python -m tti.preflight --device cuda --gpus 0,1,2,3 --world-size 8 --nnodes 2 \
        --config configs/coco64_ft_roberta.yaml
    python -m tti.preflight --run-dir-only --config configs/coco64_ft_roberta.yaml \
        --set run.run_idx=0
    python -m tti.preflight --checkpoint results/coco64_ft_roberta_diffusion/0

With --config it prints the run directory, results/<run.dataset>_<model.kind>/<run.run_idx>;
with --checkpoint, the checkpoint file (or release folder) it checked. --gpus names GPUs as
CUDA_VISIBLE_DEVICES does (the launchers' $gpu_ids): run it with every GPU visible.
"""
from __future__ import annotations

import argparse
import contextlib
import os

import torch

import tti.models  # noqa: F401  (registers the plug-ins the config names)
from tti.config.load import load_config
from tti.config.rules import validate
from tti.config.schema import Config
from tti.infra import gpus
from tti.infra.checkpoints import checkpoint_file, latest_checkpoint, refuse_unsafe
from tti.infra.cli import check_at_least, run_cli
from tti.infra.gpus import TRAIN_CPU, GPUError
from tti.infra.release_folder import is_release_folder
from tti.models.autoencoder import check_autoencoder
from tti.text.source import check_text_encoder
from tti.training.memory_estimate import estimate

# What to run instead of a GPU that cannot run the launch, in the launchers' words.
LAUNCHER_CPU = "run on the CPU with $gpu_ids cpu (one process) or cpu:N (N processes)"


def check_training(cfg: Config, world_size: int, device: str | None = "cpu") -> None:
    """ConfigError unless `cfg` is valid for `world_size` processes; TextEncoderError or
    AutoencoderError unless text.name and model.autoencoder (if set) can be loaded here;
    UnsafeCheckpointError if the checkpoint it would resume from asks to run code; with
    device "cuda" (or None where CUDA works: tti.train's default), GPUError unless this
    process's GPU (LOCAL_RANK's) can run it. Fast: reads no data and no weights."""
    validate(cfg, world_size=world_size)
    check_text_encoder(cfg.text.name)
    if cfg.model.autoencoder:
        check_autoencoder(cfg.model.autoencoder)
    resume_from = latest_checkpoint(cfg.run_dir())
    if resume_from is not None:
        refuse_unsafe(resume_from)
    if device == "cuda" or (device is None and torch.cuda.is_available()):
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        gpus.check_cuda(TRAIN_CPU)
        gpus.check_ids([local_rank], "torchrun's --nproc_per_node must not exceed the GPUs per "
                       "node (CUDA_VISIBLE_DEVICES lists the ones to use)", what="LOCAL_RANK")
        check_memory(cfg, [local_rank], world_size, TRAIN_CPU)


def check_gpus(cfg: Config, ids: list[int], world_size: int, nnodes: int) -> None:
    """The launcher's GPU check: CUDA works, every id in `ids` is a GPU here, the world
    gives one process per listed GPU on each of `nnodes` nodes, each has memory enough."""
    gpus.check_cuda(LAUNCHER_CPU)
    gpus.check_ids(ids, f"list ids among those, or {LAUNCHER_CPU}")
    per_node, uneven = divmod(world_size, nnodes)
    if uneven or per_node > len(ids):
        raise GPUError(f"a world of {world_size} processes over {nnodes} node(s) needs "
                       f"{world_size / nnodes:g} GPUs per node, one per process, and "
                       f"{len(ids)} are listed ({','.join(map(str, ids))}): list that many ids "
                       f"on every node, or set --world-size {len(ids) * nnodes}")
    check_memory(cfg, ids, world_size, LAUNCHER_CPU)


def _gpus_with_room(need: int, exclude: list[int]) -> list[int]:
    """The other visible GPUs with `need` bytes free (one that cannot be opened has none)."""
    room = []
    for index in range(torch.cuda.device_count()):
        with contextlib.suppress(GPUError):
            if index not in exclude and gpus.free_memory(index)[0] >= need:
                room.append(index)
    return room


def check_memory(cfg: Config, ids: list[int], world_size: int, instead: str) -> None:
    """GPUError naming the first GPU of `ids` whose free memory is below the config's
    estimate at its micro-batch (at 1 for auto: the least a run needs); the message says
    what would fit: auto's search, other GPUs, freeing this one, or `instead`."""
    need = estimate(cfg, world_size)
    micro = 1 if cfg.train.micro_batch == "auto" else cfg.micro_batch(world_size)
    for index in ids:
        free, total = gpus.free_memory(index)
        if free >= need.at(micro):
            continue
        fixes = []
        if micro > 1 and need.largest_micro(free) != 0:
            fixes.append(f"set --set train.micro_batch=auto (the largest that fits, measured at "
                         f"start; about {need.largest_micro(free)} by the estimate)")
        room = _gpus_with_room(need.at(micro), ids)
        if room:
            fixes.append(f"run on GPUs with room ({','.join(map(str, room))})")
        fixes.append("free that GPU (nvidia-smi shows what uses it)")
        raise GPUError(f"{gpus.describe(index, free, total)} is short of memory: "
                       f"{cfg.run.dataset} needs {need.describe(micro)}, by an estimate: "
                       f"{', '.join(fixes)}, or {instead}")


def _gpu_ids(text: str) -> list[int]:
    """argparse type of --gpus: '0,1,3' -> [0, 1, 3]."""
    try:
        return [int(i) for i in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated GPU ids (0,1,2,3), "
                                         f"got {text!r}") from None


def check_checkpoint(path: str) -> str:
    """The checkpoint file (or release folder) `path` names, after checking that it exists and
    asks to run no code (CheckpointError otherwise). Fast: reads the pickle, not the weights."""
    if is_release_folder(path):  # JSON and safetensors: nothing in it can run
        return path
    path = checkpoint_file(path)
    refuse_unsafe(path)
    return path


def main(argv=None) -> str:
    p = argparse.ArgumentParser(prog="python -m tti.preflight", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file under configs/")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, as tti.train takes it (repeatable)")
    p.add_argument("--world-size", type=int, default=1,
                   help="processes the run will have (nodes x processes per node)")
    p.add_argument("--nnodes", type=int, default=1, help="nodes the world is spread over")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where the run trains (cuda: the GPUs are checked too)")
    p.add_argument("--gpus", type=_gpu_ids, default=None, metavar="IDS",
                   help="cuda: comma-separated GPU ids the run uses (default: every visible one)")
    p.add_argument("--run-dir-only", action="store_true",
                   help="only read the config and print its run directory (to find a run)")
    p.add_argument("--checkpoint", help="only check this checkpoint file, run directory or "
                                        "release folder (what a sampling launch loads)")
    args = p.parse_args(argv)
    check_at_least(p, args, {"world_size": 1, "nnodes": 1})
    if args.checkpoint:
        path = check_checkpoint(args.checkpoint)
        print(path)
        return path
    if not args.config:
        p.error("--config is required (or --checkpoint PATH)")
    cfg = load_config(args.config, args.set)
    if not args.run_dir_only:
        check_training(cfg, args.world_size)
        if args.device == "cuda":
            ids = args.gpus if args.gpus is not None else list(range(torch.cuda.device_count()))
            check_gpus(cfg, ids, args.world_size, args.nnodes)
    print(cfg.run_dir())
    return cfg.run_dir()


if __name__ == "__main__":
    run_cli(main)
