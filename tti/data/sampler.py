"""Data order that survives a restart: a DistributedSampler that can start mid-epoch, and
the step-indexed stream of micro-batches the training loop reads from it."""
from __future__ import annotations

from torch.utils.data import DistributedSampler


class ResumableSampler(DistributedSampler):
    """Per-epoch reshuffled shard of the dataset for one rank, skippable to a position.

    Epoch e's permutation depends only on (seed, e), as in torch's DistributedSampler;
    rank r takes positions r, r + W, r + 2W, ... of it (W = num_replicas), so the first
    k items of all ranks together are the permutation's first k * W items.
    `set_epoch(epoch, start=k)` makes the next iteration begin at this rank's k-th index
    of that epoch. Works without an initialised process group.
    """

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 drop_last: bool = True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True,
                         seed=seed, drop_last=drop_last)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if not 0 <= start <= self.num_samples:
            raise ValueError(f"start {start} outside this rank's {self.num_samples} samples")
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self):
        indices = list(super().__iter__())
        return iter(indices[self.start:])

    def __len__(self) -> int:
        return self.num_samples - self.start


def resumable_batches(loader, sampler: ResumableSampler, dataset, steps_per_epoch: int,
                      accum: int, micro: int, start_step: int = 0):
    """Yield, for each optimizer step from `start_step` on, the list of its `accum`
    micro-batches: step s always gets the same items whether or not the run restarted.

    A partial last epoch is dropped (each epoch gives exactly `steps_per_epoch` steps).
    `dataset.set_epoch` picks the epoch's caption draw.
    """
    epoch, offset = divmod(start_step, steps_per_epoch)
    while True:
        sampler.set_epoch(epoch, start=offset * accum * micro)
        dataset.set_epoch(epoch)
        it = iter(loader)
        for _ in range(steps_per_epoch - offset):
            yield [next(it) for _ in range(accum)]
        epoch, offset = epoch + 1, 0
