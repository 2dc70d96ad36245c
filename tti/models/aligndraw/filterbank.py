"""DRAW's Gaussian filterbank attention (Gregor et al. 2015, section 3.2): read and write.

An N x N grid of 2-D Gaussian filters is placed on the image by five numbers: centre
(gx, gy), stride delta, isotropic variance sigma^2 and intensity gamma. Filter i along x is
centred at mu_i = gx + (i - N/2 - 0.5) * delta, i = 1..N, in pixel coordinates a = 1..A.
Each colour channel is read/written with the same filters, as in alignDRAW.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def filterbank_matrices(gx: torch.Tensor, gy: torch.Tensor, sigma2: torch.Tensor,
                        delta: torch.Tensor, n: int, height: int, width: int,
                        eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """Horizontal and vertical filterbanks, each row normalised to sum to 1.

    gx, gy, sigma2, delta: float [B], in pixels (1-based coordinates; sigma2 > 0).
    Returns Fx float [B, n, width] and Fy float [B, n, height]; a row whose Gaussian lies
    wholly off the image is all zeros rather than NaN.
    """
    grid = torch.arange(1, n + 1, device=gx.device, dtype=gx.dtype) - n / 2 - 0.5  # [n]
    mu_x = gx[:, None] + grid * delta[:, None]                                      # [B, n]
    mu_y = gy[:, None] + grid * delta[:, None]
    a = torch.arange(1, width + 1, device=gx.device, dtype=gx.dtype)
    b = torch.arange(1, height + 1, device=gx.device, dtype=gx.dtype)
    var = 2 * sigma2[:, None, None]
    fx = torch.exp(-((a - mu_x[:, :, None]) ** 2) / var)                             # [B, n, W]
    fy = torch.exp(-((b - mu_y[:, :, None]) ** 2) / var)                             # [B, n, H]
    fx = fx / fx.sum(-1, keepdim=True).clamp_min(eps)
    fy = fy / fy.sum(-1, keepdim=True).clamp_min(eps)
    return fx, fy


def read_patches(images: torch.Tensor, fx: torch.Tensor, fy: torch.Tensor,
                 gamma: torch.Tensor) -> torch.Tensor:
    """gamma * Fy x Fx^T per channel: images float [B, C, H, W] -> patches float [B, C, n, n]."""
    return gamma[:, None, None, None] * (fy[:, None] @ images @ fx[:, None].transpose(-1, -2))


def write_patches(patches: torch.Tensor, fx: torch.Tensor, fy: torch.Tensor,
                  gamma: torch.Tensor) -> torch.Tensor:
    """Fy^T w Fx / gamma per channel: patches float [B, C, n, n] -> float [B, C, H, W]."""
    return (fy[:, None].transpose(-1, -2) @ patches @ fx[:, None]) / gamma[:, None, None, None]


class FilterbankAttention(nn.Module):
    """A linear map of a decoder state to one N x N filterbank placement (DRAW eq. 21-24).

    forward(h float [B, in_dim]) -> (Fx float [B, n, W], Fy float [B, n, H], gamma float [B]).
    Raw outputs (g~x, g~y, log sigma^2, log delta~, log gamma) become
    gx = (W + 1) / 2 * (g~x + 1), gy = (H + 1) / 2 * (g~y + 1),
    delta = (max(H, W) - 1) / (n - 1) * delta~, sigma^2 and gamma by exp.
    """

    def __init__(self, in_dim: int, n: int, height: int, width: int):
        super().__init__()
        if n < 2:
            raise ValueError(f"FilterbankAttention: grid size n must be >= 2, got {n}")
        self.n, self.height, self.width = n, height, width
        self.params = nn.Linear(in_dim, 5)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        gx_, gy_, log_sigma2, log_delta, log_gamma = self.params(h).unbind(-1)
        gx = (self.width + 1) / 2 * (gx_ + 1)
        gy = (self.height + 1) / 2 * (gy_ + 1)
        delta = (max(self.height, self.width) - 1) / (self.n - 1) * torch.exp(log_delta)
        fx, fy = filterbank_matrices(gx, gy, torch.exp(log_sigma2), delta,
                                     self.n, self.height, self.width)
        return fx, fy, torch.exp(log_gamma)
