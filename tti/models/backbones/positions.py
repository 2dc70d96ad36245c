"""Where a pixel is: the UNet's position inputs, for the embedded shapes configs.

Attention is blind to where a pixel sits and convolutions see it only near the borders, yet
"A to the left of B" depends on exactly that. `model.unet.position_embedding` gives every
attention block a learned per-pixel embedding; `model.unet.coord_channels` feeds each pixel's
(x, y) to the first convolution as two extra channels (CoordConv).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def position_embedding(size: int, channels: int, init: str) -> nn.Parameter:
    """A learned embedding per pixel of a size x size map: float [1, size*size, channels],
    initialised to `sinusoidal_positions` for init "sinusoidal" (amplitude 1, like the
    normalised features it is added to, where a small random start takes long to matter),
    else N(0, 0.02) (the UNet's "random", the transformer's "learned")."""
    if init == "sinusoidal":
        return nn.Parameter(sinusoidal_positions(size, channels))
    return nn.Parameter(0.02 * torch.randn(1, size * size, channels))


def sinusoidal_positions(size: int, channels: int) -> torch.Tensor:
    """2-D sinusoidal position code for a size x size map -> float [1, size*size, channels].

    Half the channels encode the column, half the row, each as sin/cos pairs at geometric
    frequencies from half a period across the map (cos is then monotonic: left differs from
    right) up to one period per two pixels; amplitude 1."""
    quarter = max(channels // 4, 1)
    freqs = math.pi * 2.0 ** torch.linspace(0, math.log2(size), quarter)  # rad per unit side
    coord = (torch.arange(size) + 0.5) / size  # pixel centres in (0, 1)
    angles = coord[:, None] * freqs[None]  # [size, quarter]
    per_axis = torch.cat([angles.sin(), angles.cos()], dim=1)  # [size, 2 * quarter]
    rows = per_axis[:, None, :].expand(size, size, -1)
    cols = per_axis[None, :, :].expand(size, size, -1)
    code = torch.cat([cols, rows], dim=-1).reshape(1, size * size, -1)
    return F.pad(code, (0, channels - code.shape[-1]))[..., :channels]


def coordinate_channels(size: int) -> torch.Tensor:
    """float [1, 2, size, size]: each pixel centre's x then y, in (-1, 1)."""
    coord = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    return torch.stack([coord[None, :].expand(size, size), coord[:, None].expand(size, size)])[None]


class CoordinateChannels(nn.Module):
    """Append each pixel's (x, y) to an image: float [B, C, S, S] -> [B, C + 2, S, S]."""

    def __init__(self, size: int):
        super().__init__()
        self.register_buffer("coords", coordinate_channels(size), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.coords.to(x.dtype).expand(x.shape[0], -1, -1, -1)], dim=1)
