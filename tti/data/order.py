"""Data order that survives a restart: a DistributedSampler that can start mid-epoch, and
the step-indexed stream of micro-batches the training loop reads from it."""
from __future__ import annotations

from torch.utils.data import DistributedSampler


class ResumableSampler(DistributedSampler):
    """Per-epoch reshuffled shard of the dataset for one rank, skippable to a position.

    As in torch's DistributedSampler, epoch e's permutation depends only on (seed, e) and
    rank r takes its positions r, r + W, r + 2W, ... (W = num_replicas).
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
        return iter(list(super().__iter__())[self.start:])

    def __len__(self) -> int:
        return self.num_samples - self.start


def steps_per_epoch(loader, accum: int) -> int:
    """Optimizer steps of `accum` micro-batches in one epoch of `loader` (a DataLoader drawing
    from a ResumableSampler); a partial last step is dropped."""
    return loader.sampler.num_samples // loader.batch_size // accum


def resumable_batches(loader, accum: int, start_step: int = 0):
    """Yield, for each optimizer step from `start_step` on, the list of its `accum`
    micro-batches: step s always gets the same items whether or not the run restarted.

    loader: a DataLoader (drop_last=True) drawing from a ResumableSampler, over a dataset
    with `set_epoch` (the epoch's caption draw); each epoch gives `steps_per_epoch` steps.
    """
    sampler, per_epoch = loader.sampler, steps_per_epoch(loader, accum)
    epoch, offset = divmod(start_step, per_epoch)
    while True:
        sampler.set_epoch(epoch, start=offset * accum * loader.batch_size)
        loader.dataset.set_epoch(epoch)
        it = iter(loader)
        for _ in range(per_epoch - offset):
            yield [next(it) for _ in range(accum)]
        epoch, offset = epoch + 1, 0
