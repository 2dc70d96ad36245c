"""How each optimizer step's global batch splits: micro-batch x accumulation x processes.

train.batch_size (the global batch) is fixed for a run; train.micro_batch sets its split:
null: batch_size / processes / train.grad_accum per forward pass; a number: that many images
per forward pass, the rest accumulated; auto: on a GPU, the largest micro-batch that fits
every rank's GPU (tti/training/micro_batch_search.py; the ranks agree on the smallest), on a
CPU, where memory is seldom the limit and a search would cost minutes, the config's split.

Every split sees the same images per step (tti/data/order.py) and averages the same
per-micro-batch losses, so a 24 GB and an 80 GB GPU train a config through the same steps.
The choice goes to log.txt and history.jsonl; a resume may choose another.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Callable

import torch

from tti.config.schema import Config
from tti.infra import distributed
from tti.infra.gpus import GPUError
from tti.training.micro_batch_search import (CudaMemory, MemoryOracle, pending_bytes,
                                             probe_step, search_micro_batch)
from tti.training.run_log import RunLog
from tti.training.state import TrainState


@dataclass(frozen=True)
class BatchPlan:
    """micro: images per process per forward pass; accum: micro-batches per optimizer step;
    world: processes; how: why this micro-batch (one line, for the log)."""
    micro: int
    accum: int
    world: int
    how: str

    def describe(self) -> str:
        """'micro-batch 16 x 4 accumulation steps x 2 processes = global batch 128'."""
        return (f"micro-batch {self.micro} x {self.accum} accumulation step"
                f"{'s' if self.accum != 1 else ''} x {self.world} process"
                f"{'es' if self.world != 1 else ''} = global batch "
                f"{self.micro * self.accum * self.world}")

    def record(self) -> dict:
        """What history.jsonl keeps of it."""
        return {"micro_batch": self.micro, "grad_accum": self.accum, "micro_batch_how": self.how}


def stated_plan(cfg: Config, world_size: int, how: str) -> BatchPlan:
    """The split the config states (Config.micro_batch); `how` says why it is the one used."""
    micro = cfg.micro_batch(world_size)
    return BatchPlan(micro, cfg.train.batch_size // (world_size * micro), world_size, how)


def memory_oracle(device: torch.device) -> MemoryOracle | None:
    """The oracle `auto` searches with on `device`: None on a CPU (no search). Tests replace
    this function with a fake GPU (tests/fake_gpu.py)."""
    return CudaMemory(device) if device.type == "cuda" else None


def longest_captions(train_set) -> Callable[[int], list[str]]:
    """n -> the n longest captions of `train_set`: the costliest text a micro-batch can draw."""
    def longest(n: int) -> list[str]:
        every = (c for i in range(len(train_set)) for c in train_set.captions(i))
        return heapq.nlargest(n, every, key=len)
    return longest


def plan_batches(cfg: Config, info: distributed.DistInfo, state: TrainState,
                 captions: Callable[[int], list[str]], log: RunLog) -> BatchPlan:
    """This run's split, as the config states it or (auto) searched on every rank's GPU;
    logged. `captions`: n -> the n captions the search's probes read (longest_captions).
    A collective under auto on a GPU: every rank calls it."""
    tr, world = cfg.train, info.world_size
    if tr.micro_batch != "auto":
        how = (f"train.micro_batch={tr.micro_batch}" if tr.micro_batch is not None
               else f"train.grad_accum={tr.grad_accum}")
        plan = stated_plan(cfg, world, how)
    else:
        oracle = memory_oracle(info.device)
        if oracle is None:
            plan = stated_plan(cfg, world, f"train.micro_batch=auto on {info.device.type}: no "
                               f"memory search off a GPU, the config's own split")
        else:
            plan = _searched_plan(cfg, info, state, captions, oracle, log)
    log.print(f"batch: {plan.describe()} ({plan.how})")
    return plan


def _searched_plan(cfg: Config, info: distributed.DistInfo, state: TrainState,
                   captions: Callable[[int], list[str]], oracle: MemoryOracle,
                   log: RunLog) -> BatchPlan:
    """auto on a GPU: each rank's search, the smallest result on every rank."""
    per_process = cfg.train.batch_size // info.world_size
    probe = probe_step(state.model, cfg.data.image_size, captions(per_process), state.amp,
                       info.device)
    found = search_micro_batch(state.model, per_process, probe, oracle,
                               pending_bytes(state.optimizer, info.world_size), info.device)
    log.print(f"micro-batch search on {info.device} (rank {info.rank}): {found.describe()}")
    every = distributed.all_gather_object(found.micro)
    micro = min(every)
    if micro == 0:
        short = [r for r, m in enumerate(every) if m == 0]
        raise GPUError(f"train.micro_batch=auto: not even one image per micro-batch fits the "
                       f"GPU of rank(s) {','.join(map(str, short))} ({found.describe()} here): "
                       f"free those GPUs, use GPUs with more memory, or a smaller model")
    how = ("train.micro_batch=auto: the largest that fits every rank's GPU"
           + (f", ranks found {every}" if len(set(every)) > 1 else ""))
    return BatchPlan(micro, per_process // micro, info.world_size, how)
