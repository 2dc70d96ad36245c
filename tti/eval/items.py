"""Which val images and captions an export (or the in-training FID) uses, and how each image
is sampled: item i's image depends on (seed, i) alone, not on its batch or process."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tti.models.text_to_image import to_uint8


@dataclass(frozen=True)
class ExportItem:
    """One exported pair: file stem `id`, its val row, COCO image id and chosen caption."""
    index: int
    id: str
    row: int
    image_id: object
    file_name: str
    caption_index: int
    caption: str


def item_id(index: int) -> str:
    """File stem of the index-th exported image (fixed width, so a larger --n keeps the names)."""
    return f"{index:06d}"


def choose_items(val_set, n: int, seed: int) -> list[ExportItem]:
    """The first n (at most len(val_set)) of a seeded permutation of the val rows, each with a
    caption drawn by the CaptionDataset's own seed (caption_choice at epoch 0). The result for
    n is a prefix of the result for any larger n with the same seed."""
    n = min(int(n), len(val_set))
    rows = np.random.default_rng(seed).permutation(len(val_set))[:n]
    items = []
    for index, row in enumerate(int(r) for r in rows):
        k = val_set.caption_choice(row, epoch=0)
        items.append(ExportItem(index, item_id(index), row, val_set.image_id(row),
                                val_set.file_name(row), k, val_set.captions(row)[k]))
    return items


def sample_generator(seed: int, index: int) -> torch.Generator:
    """A CPU generator for image `index` alone (noise is moved to the model's device)."""
    state = np.random.SeedSequence([int(seed), int(index)]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


@torch.no_grad()
def generate_items(model, items: list[ExportItem], seed: int, **sampler_opts) -> torch.Tensor:
    """uint8 [len(items), 3, S, S]: image i from caption i and sample_generator(seed, index i)."""
    captions = [it.caption for it in items]
    gens = [sample_generator(seed, it.index) for it in items]
    return to_uint8(model.sample(captions, gens, **sampler_opts)).cpu()
