"""A DistributedSampler that can start mid-epoch, so a resumed run sees the exact same data."""
from __future__ import annotations

from torch.utils.data import DistributedSampler


class ResumableSampler(DistributedSampler):
    """Per-epoch reshuffled shard of the dataset for one rank, skippable to a position.

    `set_epoch(epoch, start=k)` makes the next iteration begin at this rank's k-th index of
    that epoch's permutation (the permutation depends only on seed and epoch, as in
    torch's DistributedSampler). Works without an initialised process group.
    """

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 drop_last: bool = True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True,
                         seed=seed, drop_last=drop_last)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self):
        indices = list(super().__iter__())
        return iter(indices[self.start:])

    def __len__(self) -> int:
        return self.num_samples - self.start
