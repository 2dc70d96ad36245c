"""The largest micro-batch that trains within a GPU's memory (`train.micro_batch: auto`).

Each candidate runs one forward and backward pass of this rank's real model at the real
data shape (the config's image size, the training set's longest captions) under the
training precision. A memory oracle says whether it fitted: its peak plus what training adds
later (AdamW's moments, DDP's gradient buckets) within the GPU's free memory less a margin.
Candidates divide the per-process batch (whole accumulation steps); a few seconds on a GPU.
The probes leave no trace (random streams, gradients, buffers), so a run that searched trains
bit for bit like one given the same micro-batch. `CudaMemory` measures a GPU; tests pass a
fake device that "fits up to N" (tests/fake_gpu.py).
"""
from __future__ import annotations

import contextlib
import gc
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np
import torch

from tti.infra.gpus import GIB, is_out_of_memory
from tti.models.text_to_image import TextToImage, to_model_range

# Share of the GPU's memory a search leaves free: batches of longer captions than the probe's
# (it uses the longest, cut at text.max_length), allocator fragmentation, the in-loop samplers.
MARGIN = 0.10


class MemoryOracle(Protocol):
    """How a search measures one probe; `budget` and `total` in bytes."""
    def budget(self) -> int: ...          # what this process may use, margin taken off
    def total(self) -> int: ...           # the device's memory, for messages
    def measure(self, micro: int, probe: Callable[[], None]) -> int: ...  # peak bytes; may raise OOM
    def release(self) -> None: ...        # after an out-of-memory probe


class CudaMemory:
    """The oracle of a CUDA device: its peak allocated bytes while a probe runs."""

    def __init__(self, device: torch.device, margin: float = MARGIN):
        self.device, self.margin = device, margin
        free, self._total = torch.cuda.mem_get_info(device)
        # What this process already holds in its cache is usable by it too.
        self._budget = free + torch.cuda.memory_reserved(device) - int(margin * self._total)

    def budget(self) -> int:
        return self._budget

    def total(self) -> int:
        return self._total

    def measure(self, micro: int, probe: Callable[[], None]) -> int:
        torch.cuda.reset_peak_memory_stats(self.device)
        probe()
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device)

    def release(self) -> None:
        gc.collect()
        torch.cuda.empty_cache()


def largest_fitting(per_process: int, fits: Callable[[int], bool]) -> int:
    """The largest divisor d of `per_process` with fits(d), for a `fits` that holds up to
    some size; 0 when not even 1 fits. Doubling from 1 until one does not fit, then
    bisection between the last that fitted and the first that did not."""
    divisors = [d for d in range(1, per_process + 1) if per_process % d == 0]
    good, bad, i = -1, len(divisors), 0
    while True:
        if not fits(divisors[i]):
            bad = i
            break
        good = i
        if i == len(divisors) - 1:
            break
        # the next try: the smallest divisor at least twice this one, else the largest
        i = next((j for j in range(i + 1, len(divisors)) if divisors[j] >= 2 * divisors[i]),
                 len(divisors) - 1)
    while bad - good > 1:
        mid = (good + bad) // 2
        if fits(divisors[mid]):
            good = mid
        else:
            bad = mid
    return divisors[good] if good >= 0 else 0


@dataclass
class SearchResult:
    """What a search found on this rank: the micro-batch (0: not even 1 fits), each probe's
    peak in bytes (None: out of memory), budget, device total, pending bytes, seconds."""
    micro: int
    peaks: dict = field(default_factory=dict)
    budget: int = 0
    total: int = 0
    pending: int = 0
    seconds: float = 0.0

    def describe(self) -> str:
        """'fits 32 (peak 60.1 GiB + 2.3 GiB to come, budget 71.2 of 79.1 GiB; tried 1, 2, 4,
        8, 16, 32, 64 (out of memory), 48 in 4.1 s)'."""
        tried = ", ".join(f"{m}" + ("" if p is not None and p + self.pending <= self.budget
                                     else " (too large)") for m, p in self.peaks.items())
        peak = self.peaks.get(self.micro)
        at = (f"peak {peak / GIB:.2f} GiB + {self.pending / GIB:.2f} GiB to come, "
              if peak is not None else "")
        return (f"fits {self.micro} ({at}budget {self.budget / GIB:.1f} of "
                f"{self.total / GIB:.1f} GiB; tried {tried} in {self.seconds:.1f} s)")


def pending_bytes(optimizer: torch.optim.Optimizer, world_size: int) -> int:
    """Bytes training allocates after the probe: AdamW's two fp32 moments for every weight
    the optimizer has no state for yet (a fresh run), and DDP's gradient buckets."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    moments = sum(8 * p.numel() for p in params if not optimizer.state.get(p))
    buckets = sum(4 * p.numel() for p in params) if world_size > 1 else 0
    return moments + buckets


@contextlib.contextmanager
def leaves_no_trace(model: TextToImage, device: torch.device):
    """Every random stream, the gradients and the buffers of `model` as they were before."""
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])


def probe_step(model: TextToImage, size: int, captions: list[str], amp: torch.dtype | None,
               device: torch.device) -> Callable[[int], None]:
    """micro -> one forward and backward pass of `model` on `micro` random uint8 images of
    `size` px and the first `micro` of `captions` (cycled), as a training step runs them."""
    def probe(micro: int) -> None:
        images = torch.randint(0, 256, (micro, 3, size, size), dtype=torch.uint8)
        images = to_model_range(images.to(device))
        batch = [captions[i % len(captions)] for i in range(micro)]
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = model(images, batch)
        loss.backward()
        model.zero_grad(set_to_none=True)
    return probe


def search_micro_batch(model: TextToImage, per_process: int, probe: Callable[[int], None],
                       oracle: MemoryOracle, pending: int, device: torch.device) -> SearchResult:
    """The largest micro-batch dividing `per_process` whose probe's peak plus `pending`
    bytes fits the oracle's budget."""
    result = SearchResult(0, budget=oracle.budget(), total=oracle.total(), pending=pending)
    start = time.perf_counter()

    def fits(micro: int) -> bool:
        try:
            result.peaks[micro] = oracle.measure(micro, lambda: probe(micro))
        except RuntimeError as error:  # torch.OutOfMemoryError is one
            if not is_out_of_memory(error):
                raise
            result.peaks[micro] = None
            model.zero_grad(set_to_none=True)
            oracle.release()
            return False
        return result.peaks[micro] + pending <= result.budget

    was_training = model.training
    model.train()
    with leaves_no_trace(model, device):
        result.micro = largest_fitting(per_process, fits)
    model.train(was_training)
    result.seconds = time.perf_counter() - start
    return result
