"""Mix the embedded shapes dataset's canonical phrasing into its training captions.

A shapes caption names two objects in either order and phrases their relation seven ways
("below B there is A", "B with A above it", ...), so which object goes left/top depends on
the words and the word order together. In the canonical phrasing ("a A to the left of a B" /
"a A above a B", A the left/top object) plain word order gives it. Replacing a share of the
training captions with it lets the model learn the order rule first and the relation words
on top, while it still sees every phrasing (docs/design_notes.md has the runs). Shapes only
(it parses each caption's scene); validation captions are never rewritten.

    train_set = CanonicalCaptionMix(load_split(root, "train2014", 32), fraction=0.5)
"""
from __future__ import annotations

import numpy as np
from torch.utils.data import Dataset

from tti.data.shapes import canonical_caption


class CanonicalCaptionMix(Dataset):
    """A CaptionDataset of shapes captions whose item i, in each epoch, carries its canonical
    caption with probability `fraction` in [0, 1] (drawn from (seed, epoch, i) alone, so a
    resumed run sees the same captions) and its own drawn caption otherwise.

    dataset: a CaptionDataset (anything with set_epoch, captions(i) and __getitem__ ->
        (image, caption)); every caption must be one the shapes templates write, checked here.
    Items are as in the dataset; so are the attributes the wrapper lacks.
    """

    def __init__(self, dataset, fraction: float, seed: int = 0):
        if not 0.0 <= float(fraction) <= 1.0:
            raise ValueError(f"CanonicalCaptionMix: fraction must be in [0, 1], got {fraction}")
        self.dataset = dataset
        self.fraction = float(fraction)
        self.seed = int(seed)
        self.epoch = 0
        # Rewritten now, so a caption no template wrote fails here, not mid-training.
        self._canonical: list[str] = []
        for i in range(len(dataset)):
            caption = dataset.captions(i)[0]
            try:
                self._canonical.append(canonical_caption(caption))
            except ValueError as e:
                raise ValueError(
                    f"data.canonical_caption_fraction needs the embedded shapes dataset's "
                    f"captions, but image {dataset.image_id(i)} ({dataset.file_name(i)}) has "
                    f"{caption!r}: {e}") from None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name):
        if name == "dataset":  # not yet set (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)
        self.epoch = int(epoch)

    def captions(self, i: int) -> list[str]:
        """Every caption item i can carry: the dataset's, then the canonical one if new."""
        own = self.dataset.captions(i)
        canonical = self._canonical[self._row(i)]
        return own + [canonical] if self.fraction > 0 and canonical not in own else own

    def uses_canonical(self, i: int, epoch: int | None = None) -> bool:
        """Whether item i carries its canonical caption in `epoch` (default: the current)."""
        epoch = self.epoch if epoch is None else int(epoch)
        # A stream of its own (the trailing 1), apart from the dataset's caption draw.
        state = np.random.SeedSequence([self.seed, epoch, self._row(i), 1]).generate_state(1)[0]
        return state / 2.0 ** 32 < self.fraction

    def _row(self, i) -> int:
        """Row of index i; negative indices count from the end, as in the dataset."""
        return int(i) % len(self)

    def __getitem__(self, i):
        image, caption = self.dataset[i]
        if self.uses_canonical(i):
            caption = self._canonical[self._row(i)]
        return image, caption
