"""Mix the embedded shapes dataset's canonical phrasing into its training captions.

A shapes caption names two objects in either order and phrases their relation seven ways
("A to the right of B", "below B there is A", "B with A above it", ...), so which object
goes left/top depends on the words *and* the word order together. The canonical phrasing
("a A to the left of a B" / "a A above a B", A the left/top object) makes it plain word
order. Trained on the real captions alone, the UNet did not learn which object goes where;
with every caption canonical it learnt "the first-named object goes left/top" but then
misread the other phrasings. This wrapper replaces a share of the training captions with
their canonical phrasing, so that word order predicts the layout in most captions while the
model still sees every phrasing: it then learns the order rule first and the relation words
on top of it (docs/design_notes.md has the runs).

It uses what the shapes generator knows (each caption's scene) and so does not apply to
COCO; validation captions are never rewritten.

    train_set = CanonicalCaptionMix(load_split(root, "train2014", 32), fraction=0.5)
"""
from __future__ import annotations

import numpy as np
from torch.utils.data import Dataset

from tti.data.shapes import canonical_caption


class CanonicalCaptionMix(Dataset):
    """A CaptionDataset of shapes captions whose item i, in each epoch, carries its canonical
    caption with probability `fraction` (drawn from (seed, epoch, i) alone, so a resumed run
    sees the same captions) and its own drawn caption otherwise.

    dataset: a CaptionDataset (anything with set_epoch, captions(i) and __getitem__ ->
        (image, caption)); every caption must be one the shapes templates write, checked here.
    fraction: in [0, 1]. Items are (image uint8 [3, S, S], caption str) as in the dataset.
    Attributes the wrapper lacks (split, skipped, image_size, ...) are the dataset's.
    """

    def __init__(self, dataset, fraction: float, seed: int = 0):
        if not 0.0 <= float(fraction) <= 1.0:
            raise ValueError(f"CanonicalCaptionMix: fraction must be in [0, 1], got {fraction}")
        self.dataset = dataset
        self.fraction = float(fraction)
        self.seed = int(seed)
        self.epoch = 0
        # Every caption is rewritten now, so a caption no template wrote fails here, naming it
        # and its image, not in the middle of training.
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
