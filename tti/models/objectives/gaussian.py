"""The Gaussian (variance-preserving) diffusion objective: x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps.

Discrete time t = 0..T-1 with cosine or linear schedules (optionally shifted), a backbone
that predicts eps, v or x0, an MSE loss (optionally min-SNR weighted), and the DDPM, DDIM
and DPM-Solver++(2M) samplers (tti/models/objectives/samplers.py). The backbone sees t as
a float in [0, T), the scale its time embedding expects.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from tti.config.registry import Entry
from tti.config.rules import bounds, check, one_of
from tti.models.objectives.base import Objective
from tti.models.objectives.samplers import ddim_step, dpmpp2m_step
from tti.text.batch import TextBatch

SCHEDULES = ("linear", "cosine")
PREDICTIONS = ("eps", "v", "x0")
SAMPLERS = {"ddim": "DDIM", "dpmpp2m": "DPM++(2M)", "ddpm": "DDPM"}  # id -> table name; first = default


@dataclass
class GaussianConfig:
    schedule: str = "cosine"         # linear | cosine
    timesteps: int = 1000
    prediction: str = "v"            # eps | v | x0
    min_snr_gamma: Optional[float] = None
    shift: float = 1.0               # > 1: more noise at every t (log-SNR - 2 log shift)


def validate(cfg) -> None:
    d = cfg.model.gaussian
    one_of(d.schedule, SCHEDULES, "model.gaussian.schedule")
    one_of(d.prediction, PREDICTIONS, "model.gaussian.prediction")
    bounds(d, "model.gaussian", {"timesteps": ">= 2", "shift": "> 0"})
    check(d.min_snr_gamma is None or d.min_snr_gamma > 0, "model.gaussian.min_snr_gamma",
          f"must be > 0 or null, got {d.min_snr_gamma}")
    s = cfg.sample
    check(s.sampler == "ddpm" or 1 <= s.steps <= d.timesteps, "sample.steps",
          f"must be in [1, model.gaussian.timesteps={d.timesteps}], got {s.steps}",
          "model.gaussian.timesteps")


def build(cfg) -> "GaussianDiffusion":
    d = cfg.model.gaussian
    return GaussianDiffusion(schedule=d.schedule, timesteps=d.timesteps, prediction=d.prediction,
                             min_snr_gamma=d.min_snr_gamma, shift=d.shift)


def label(cfg) -> str:
    return f"Gaussian {cfg.model.gaussian.prediction}-prediction"


ENTRY = Entry("gaussian", build, GaussianConfig, validate, SAMPLERS, label=label)


def make_betas(schedule: str, timesteps: int, shift: float = 1.0) -> torch.Tensor:
    """float64 [T] noise variances beta_t for t = 0..T-1.

    linear: DDPM's 1e-4..0.02 for T = 1000, both ends scaled by 1000 / T so that other T
            keep the same total noise. cosine: Nichol & Dhariwal 2021, betas clipped at 0.999.
    shift: s > 1 moves the log-SNR down by 2 log s at every t (Hoogeboom et al. 2023), as for
           an image of s times the resolution. Flat-coloured objects stay visible under much
           noise, so their layout is decided late; a shift gives that phase more steps.
    """
    if not shift > 0:
        raise ValueError(f"Diffusion: schedule shift must be > 0, got {shift}")
    if schedule == "linear":
        scale = 1000.0 / timesteps
        betas = torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64)
    elif schedule == "cosine":
        s = 0.008
        steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
        alpha_bar = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        betas = (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    else:
        raise ValueError(f"Diffusion: unknown schedule {schedule!r}; choose one of {SCHEDULES}")
    if shift == 1.0:
        return betas
    log_snr = torch.logit(torch.cumprod(1 - betas, dim=0)) - 2 * math.log(shift)
    alpha_bar = torch.cat([torch.ones(1, dtype=torch.float64), torch.sigmoid(log_snr)])
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)


def _at(values: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """values[t] shaped [B, 1, ..., 1] to broadcast over a [B, ...] tensor of ndim dims."""
    return values.to(t.device)[t].reshape(-1, *([1] * (ndim - 1)))


class GaussianDiffusion(Objective):
    """The forward (noising) process, its loss and its reverse samplers.

    timesteps: T, the number of noise levels; shift: see make_betas (1 = as published).
    prediction: "eps" (the noise), "v" (sqrt(ab) eps - sqrt(1-ab) x0) or "x0" (the image).
    min_snr_gamma: if set, weight each sample's loss by min(SNR, gamma) (Hang et al. 2023),
                   normalised to the chosen target."""
    samplers = SAMPLERS

    def __init__(self, schedule: str = "cosine", timesteps: int = 1000, prediction: str = "v",
                 min_snr_gamma: float | None = None, shift: float = 1.0):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"GaussianDiffusion: unknown prediction {prediction!r}; choose one of {PREDICTIONS}")
        if int(timesteps) != timesteps or timesteps < 1:
            raise ValueError(f"GaussianDiffusion: timesteps must be a positive integer, got {timesteps}")
        if min_snr_gamma is not None and not min_snr_gamma > 0:
            raise ValueError(f"GaussianDiffusion: min_snr_gamma must be > 0 or None, got {min_snr_gamma}")
        self.schedule, self.timesteps, self.prediction = schedule, int(timesteps), prediction
        self.min_snr_gamma, self.shift = min_snr_gamma, shift
        betas = make_betas(schedule, self.timesteps, shift)
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        tables = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1 - alphas_cumprod).sqrt(),
            "posterior_variance": betas * (1 - prev) / (1 - alphas_cumprod),
            "posterior_mean_coef_x0": betas * prev.sqrt() / (1 - alphas_cumprod),
            "posterior_mean_coef_xt": (1 - prev) * (1 - betas).sqrt() / (1 - alphas_cumprod),
        }
        # Computed in float64, stored in float32; not in the state dict (derived from the config).
        for name, value in tables.items():
            self.register_buffer(name, value.float(), persistent=False)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise. x0, noise: float [B, ...]; t: int64 [B]."""
        return (_at(self.sqrt_alphas_cumprod, t, x0.dim()) * x0
                + _at(self.sqrt_one_minus_alphas_cumprod, t, x0.dim()) * noise)

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean float [B, ...] and variance float [B, 1, ...] of q(x_{t-1} | x_t, x0); t: int64 [B]."""
        mean = (_at(self.posterior_mean_coef_x0, t, x0.dim()) * x0
                + _at(self.posterior_mean_coef_xt, t, x0.dim()) * x_t)
        return mean, _at(self.posterior_variance, t, x0.dim())

    def target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What the backbone should output for x_t = q_sample(x0, t, noise), per `prediction`."""
        if self.prediction == "eps":
            return noise
        if self.prediction == "x0":
            return x0
        return (_at(self.sqrt_alphas_cumprod, t, x0.dim()) * noise
                - _at(self.sqrt_one_minus_alphas_cumprod, t, x0.dim()) * x0)

    def x0_eps_from_output(self, x_t: torch.Tensor, t: torch.Tensor, output: torch.Tensor):
        """(x0, eps) implied by the backbone's output at (x_t, t); both float like x_t, not clipped."""
        a = _at(self.sqrt_alphas_cumprod, t, x_t.dim())
        s = _at(self.sqrt_one_minus_alphas_cumprod, t, x_t.dim())
        if self.prediction == "eps":
            return (x_t - s * output) / a, output
        if self.prediction == "x0":
            return output, (x_t - a * output) / s
        return a * x_t - s * output, s * x_t + a * output

    def loss(self, backbone, images: torch.Tensor, text: TextBatch) -> torch.Tensor:
        """Mean squared error on the prediction target at uniformly random t."""
        t = torch.randint(0, self.timesteps, (images.shape[0],), device=images.device)
        noise = torch.randn_like(images)
        output = backbone(self.q_sample(images, t, noise), t.float(), text).float()
        per_sample = F.mse_loss(output, self.target(images, t, noise).float(),
                                reduction="none").flatten(1).mean(1)
        if self.min_snr_gamma is None:
            return per_sample.mean()
        return (per_sample * self.min_snr_weight(t)).mean()

    def min_snr_weight(self, t: torch.Tensor) -> torch.Tensor:
        """float [B]: min(SNR, gamma) expressed for the target (x0-MSE weighting, Hang et al.)."""
        ab = self.alphas_cumprod[t]
        snr = ab / (1 - ab)
        clipped = snr.clamp(max=self.min_snr_gamma)
        if self.prediction == "eps":
            return clipped / snr
        if self.prediction == "v":
            return clipped / (snr + 1)
        return clipped

    def check_sampling(self, sampler: str, steps: int, eta: float) -> None:
        super().check_sampling(sampler, steps, eta)
        if sampler != "ddpm" and not 1 <= steps <= self.timesteps:
            raise ValueError(f"this model was trained with {self.timesteps} diffusion steps; "
                             f"choose 1 to {self.timesteps}")

    def sampling_steps(self, sampler: str, steps: int) -> list[int]:
        """Descending timesteps the sampler visits: all T for DDPM, else `steps` evenly spaced
        ones starting at T - 1, so that even one step starts from pure noise."""
        if sampler == "ddpm":
            return list(range(self.timesteps - 1, -1, -1))
        return [round((i + 1) * self.timesteps / steps) - 1 for i in range(steps)][::-1]

    def sample(self, denoise, x, sampler, steps, eta, noise, return_trajectory):
        """DDPM (ancestral, all T steps; `steps` and `eta` unused), DDIM or DPM-Solver++(2M)
        (`steps` evenly spaced steps; eta 0 = the probability-flow ODE, 1 ~ DDPM's noise)."""
        b, device = x.shape[0], x.device
        table = self.alphas_cumprod.double().cpu().tolist()
        ab = lambda step: table[step] if step >= 0 else 1.0  # step -1: the clean image
        trajectory, previous = [], None  # previous: the multistep solver's last (lambda, x0)
        timesteps = self.sampling_steps(sampler, steps)
        for i, step in enumerate(timesteps):
            t = torch.full((b,), step, device=device, dtype=torch.long)
            x0 = self.x0_eps_from_output(x, t, denoise(x, t.float()))[0].clamp(-1, 1)
            if return_trajectory:
                trajectory.append(x0.cpu())
            prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
            if sampler == "ddpm":
                mean, var = self.q_posterior(x0, x, t)
                x = mean + var.sqrt() * noise() if step > 0 else mean
            elif sampler == "ddim":
                x = ddim_step(x, x0, ab(step), ab(prev), eta, noise)
            else:
                x, previous = dpmpp2m_step(x, x0, ab(step), ab(prev), previous, eta, noise)
        return x.clamp(-1, 1), trajectory
