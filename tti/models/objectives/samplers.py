"""One step of each few-step sampler, between two noise levels, as plain functions.

Both objectives write x_s = alpha_s x0 + sigma_s eps; lambda = log(alpha / sigma) is half the
log-SNR. Gaussian (VP): alpha = sqrt(ab), sigma = sqrt(1 - ab) for alphas_cumprod ab, and a
step goes from ab_s to a less noisy ab_t > ab_s (ab_t = 1: the clean image). Rectified flow:
alpha = 1 - t, sigma = t, from t_s to t_t < t_s (t_t = 0: the clean image). x0 is the data
prediction at s (guided, and for VP clipped, by the caller). Levels are Python floats, so each
step's coefficients are computed in float64 whatever dtype x has.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

NoiseFn = Callable[[], torch.Tensor]


def ddim_step(x: torch.Tensor, x0: torch.Tensor, ab_s: float, ab_t: float, eta: float,
              noise: NoiseFn) -> torch.Tensor:
    """DDIM, Song et al. 2021 eq. 12: x_s float [B, ...] -> x_t, same shape. eta: 0 is
    deterministic; 1 adds DDPM's posterior variance (noise() draws it)."""
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
    """DPM-Solver++(2M), Lu et al. 2022 (arXiv:2211.01095) Algorithm 2, on the VP path:
    x_s -> x_t. The first step (previous None) and the step onto the clean image are first
    order (= DDIM). See dpmpp2m_update. Returns x_t and this step's `previous` for the next."""
    lam_s = half_log_snr(ab_s)
    if ab_t >= 1:  # lambda_t = inf: every order lands exactly on the data prediction
        return x0, (lam_s, x0)
    return dpmpp2m_update(x, x0, lam_s, half_log_snr(ab_t), math.sqrt(ab_t),
                          math.sqrt(1 - ab_s), math.sqrt(1 - ab_t), previous, eta, noise)


def dpmpp2m_update(x: torch.Tensor, x0: torch.Tensor, lam_s: float, lam_t: float, alpha_t: float,
                   sigma_s: float, sigma_t: float, previous: tuple[float, torch.Tensor] | None,
                   eta: float, noise: NoiseFn) -> tuple[torch.Tensor, tuple[float, torch.Tensor]]:
    """DPM-Solver++(2M) from level s to t on any path x = alpha x0 + sigma eps.

    Multistep, second order in lambda: the data prediction is extrapolated linearly from this
    step's x0 and the previous step's (diffusers' "midpoint" form); first order when previous
    is None. eta: 0 solves the probability-flow ODE, 1 the reverse SDE (Lu et al. section 5),
    in between the SDE with its noise scaled down (k-diffusion's sample_dpmpp_2m_sde); noise()
    draws the step's noise when eta > 0. x, x0: float [B, ...]. Returns x_t, (lambda_s, x0).
    """
    h = lam_t - lam_s
    data = x0
    if previous is not None:
        lam_prev, x0_prev = previous
        ratio = (lam_s - lam_prev) / h
        data = x0 + (x0 - x0_prev) / (2 * ratio)
    x_t = (sigma_t / sigma_s * math.exp(-eta * h)) * x - alpha_t * math.expm1(-(1 + eta) * h) * data
    if eta > 0:
        x_t = x_t + sigma_t * math.sqrt(-math.expm1(-2 * eta * h)) * noise()
    return x_t, (lam_s, x0)


def flow_dpmpp2m_step(x: torch.Tensor, x0: torch.Tensor, t_s: float, t_t: float,
                      previous: tuple[float, torch.Tensor] | None, eta: float,
                      noise: NoiseFn) -> tuple[torch.Tensor, tuple[float, torch.Tensor] | None]:
    """DPM-Solver++(2M) on the rectified-flow path (alpha = 1 - t, sigma = t): x_s -> x_t.

    From pure noise (t_s = 1, lambda = -inf) the step is first order and passes nothing on,
    x_t = (1 - t_t) x0 + t_t (x, or fresh noise when eta > 0, the SDE's limit); onto the clean
    image (t_t = 0) it lands on the data prediction. Returns x_t and `previous` for the next.
    """
    if t_t <= 0:
        return x0, None
    if t_s >= 1:
        return (1 - t_t) * x0 + t_t * (noise() if eta > 0 else x), None
    lam = lambda t: math.log1p(-t) - math.log(t)
    return dpmpp2m_update(x, x0, lam(t_s), lam(t_t), 1 - t_t, t_s, t_t, previous, eta, noise)


def heun_step(x: torch.Tensor, v: torch.Tensor, t_s: float, t_t: float,
              velocity: Callable[[torch.Tensor, float], torch.Tensor]) -> torch.Tensor:
    """Heun's method (Karras et al. 2022, Algorithm 1 without churn) on dx/dt = velocity(x, t):
    an Euler step, then the trapezoid of the two slopes. The step onto t_t = 0 stays Euler,
    as there the velocity would be evaluated on the clean image. v: velocity(x, t_s)."""
    x_euler = x + (t_t - t_s) * v
    if t_t <= 0:
        return x_euler
    return x + (t_t - t_s) * 0.5 * (v + velocity(x_euler, t_t))
