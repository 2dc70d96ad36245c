"""What an objective is: the part of a diffusion model that owns noise, time, targets, loss
weighting and sampling, around any backbone (x, t, text) -> output. A new one subclasses
`Objective` and registers an Entry (tti/models/registry.py)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from tti.text.batch import TextBatch

# denoise(x, t) -> output: the backbone at time t (float [B], the backbone's [0, 1000] scale)
# with the captions and classifier-free guidance already applied (tti.models.diffusion.Guided).
Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Objective(nn.Module):
    """samplers: {sampler id: display name}, the first the default."""
    samplers: dict = {}

    def loss(self, backbone: nn.Module, images: torch.Tensor, text: TextBatch) -> torch.Tensor:
        """images: float [B, C, H, W] in [-1, 1]; text: TextBatch of batch B -> scalar loss."""
        raise NotImplementedError

    def check_sampling(self, sampler: str, steps: int, eta: float) -> None:
        """ValueError naming the first sampling option this objective cannot run."""
        if sampler not in self.samplers:
            raise ValueError(f"{type(self).__name__}: unknown sampler {sampler!r}; choose one "
                             f"of {tuple(self.samplers)}")
        if eta < 0:
            raise ValueError(f"{type(self).__name__}: eta must be >= 0, got {eta}")

    def sample(self, denoise: Denoise, x: torch.Tensor, sampler: str, steps: int, eta: float,
               noise: Callable[[], torch.Tensor], return_trajectory: bool):
        """From noise x float [B, C, H, W] to images: returns (images float [B, C, H, W] in
        [-1, 1], the predicted clean image of every step on the CPU, or [] unless asked).
        noise() draws fresh standard normal noise shaped like x, for stochastic samplers."""
        raise NotImplementedError
