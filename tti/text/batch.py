"""What every model receives as `text`: token states (or ids) and their padding mask."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class TextBatch:
    """What every model receives as `text`.

    tokens: float [B, L, D] token embeddings (or int64 [B, L] token ids for models that
            embed words themselves, e.g. alignDRAW).
    mask:   bool [B, L], True where a real token is; padding is False and must never
            change a model's output.
    """

    tokens: torch.Tensor
    mask: torch.Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def to(self, device) -> "TextBatch":
        return TextBatch(self.tokens.to(device), self.mask.to(device))

    def repeat(self, n: int) -> "TextBatch":
        """The batch tiled n times along B (e.g. one null caption for a whole batch)."""
        reps = (n,) + (1,) * (self.tokens.dim() - 1)
        return TextBatch(self.tokens.repeat(*reps), self.mask.repeat(n, 1))

    def index(self, idx) -> "TextBatch":
        return TextBatch(self.tokens[idx], self.mask[idx])

    @staticmethod
    def cat(batches: list["TextBatch"]) -> "TextBatch":
        """Concatenate along B, right-padding every batch to the longest L."""
        length = max(b.tokens.shape[1] for b in batches)
        tokens, masks = [], []
        for b in batches:
            pad = length - b.tokens.shape[1]
            extra = (0, 0, 0, pad) if b.tokens.dim() == 3 else (0, pad)
            tokens.append(F.pad(b.tokens, extra))
            masks.append(F.pad(b.mask, (0, pad), value=False))
        return TextBatch(torch.cat(tokens), torch.cat(masks))
