"""Process-group setup for `python -m tti.train` (one process) and `torchrun` (N processes).

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them we run as a single process.
The device is chosen by LOCAL_RANK (the rank within this node), never the global rank,
so multi-node runs put each process on its own local GPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or dist.is_initialized()


def setup(device: str | None = None) -> DistInfo:
    """Initialise the process group when launched by torchrun (NCCL on CUDA, gloo on CPU)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if "RANK" not in os.environ:
        dev = torch.device("cuda", 0) if device == "cuda" else torch.device(device)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return DistInfo(0, 0, 1, dev)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    if device == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        dev, backend = torch.device(device), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(minutes=30))
    return DistInfo(rank, local_rank, world_size, dev)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_gather_object(obj) -> list:
    """Every rank's `obj`, in rank order (a one-element list without a process group)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_ranks_true(flag: bool, device: torch.device) -> bool:
    """True only if `flag` is True on every rank (so all ranks take the same branch)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0)
