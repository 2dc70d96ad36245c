"""One step of each few-step sampler: DDIM and DPM-Solver++(2M), between two noise levels.

A step maps x_s, at a noise level with alphas_cumprod ab_s, to a less noisy level ab_t > ab_s
(ab_t = 1 is the clean image), given the data prediction x0 at s (guided and clipped by the
caller). With alpha = sqrt(ab) and sigma = sqrt(1 - ab), x_s = alpha_s x0 + sigma_s eps, and
lambda = log(alpha / sigma) is half the log-SNR. The ab are Python floats, so each step's
coefficients are computed in float64 whatever dtype x has.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

NoiseFn = Callable[[], torch.Tensor]


def ddim_step(x: torch.Tensor, x0: torch.Tensor, ab_s: float, ab_t: float, eta: float,
              noise: NoiseFn) -> torch.Tensor:
    """DDIM, Song et al. 2021 eq. 12: x_s float [B, ...] -> x_t, same shape.

    eta: 0 is deterministic; 1 adds DDPM's posterior variance (noise() draws it).
    """
    eps = (x - math.sqrt(ab_s) * x0) / math.sqrt(1 - ab_s)  # consistent with the clipped x0
    sigma = eta * math.sqrt((1 - ab_t) / (1 - ab_s) * (1 - ab_s / ab_t))
    x_t = math.sqrt(ab_t) * x0 + math.sqrt(max(1 - ab_t - sigma ** 2, 0.0)) * eps
    if eta > 0 and ab_t < 1:
        x_t = x_t + sigma * noise()
    return x_t


def half_log_snr(ab: float) -> float:
    """lambda = log(alpha / sigma) for alphas_cumprod ab in (0, 1)."""
    return 0.5 * (math.log(ab) - math.log1p(-ab))


def dpmpp2m_step(x: torch.Tensor, x0: torch.Tensor, ab_s: float, ab_t: float,
                 previous: tuple[float, torch.Tensor] | None, eta: float,
                 noise: NoiseFn) -> tuple[torch.Tensor, tuple[float, torch.Tensor]]:
    """DPM-Solver++(2M), Lu et al. 2022 (arXiv:2211.01095) Algorithm 2: x_s -> x_t.

    Multistep and second order in lambda: the data prediction is extrapolated linearly from
    this step's x0 and the previous step's (the "midpoint" form diffusers also uses). The
    first step (previous None) and the step onto the clean image are first order (= DDIM).
    eta: 0 solves the probability-flow ODE; 1 the reverse SDE (SDE-DPM-Solver++(2M), Lu et
    al. section 5); in between, the reverse SDE with its noise scaled down (k-diffusion's
    sample_dpmpp_2m_sde). noise() draws the step's standard normal noise when eta > 0.
    x, x0: float [B, ...]. Returns x_t and (lambda_s, x0), this step's `previous` for the next.
    """
    lam_s = half_log_snr(ab_s)
    if ab_t >= 1:  # lambda_t = inf: every order lands exactly on the data prediction
        return x0, (lam_s, x0)
    lam_t = half_log_snr(ab_t)
    h = lam_t - lam_s
    data = x0
    if previous is not None:
        lam_prev, x0_prev = previous
        ratio = (lam_s - lam_prev) / h
        data = x0 + (x0 - x0_prev) / (2 * ratio)
    sigma_s, sigma_t = math.sqrt(1 - ab_s), math.sqrt(1 - ab_t)
    x_t = (sigma_t / sigma_s * math.exp(-eta * h)) * x - math.sqrt(ab_t) * math.expm1(-(1 + eta) * h) * data
    if eta > 0:
        x_t = x_t + sigma_t * math.sqrt(-math.expm1(-2 * eta * h)) * noise()
    return x_t, (lam_s, x0)
