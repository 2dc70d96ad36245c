"""Gaussian diffusion around a denoiser: noise schedules, training loss, the sampling loop.

`Diffusion(unet)` keeps the model interface every model in tti shares:
`loss(images, text) -> scalar` and `sample(text, generator, ...) -> images in [-1, 1]`.
The denoiser is called as `unet(x_t, t, text)` and predicts eps, v or x0 (`prediction`).
Classifier-free guidance runs the conditional and the null caption in one batched pass.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from tti.samplers import ddim_step, dpmpp2m_step
from tti.text import TextBatch

SCHEDULES = ("linear", "cosine")
PREDICTIONS = ("eps", "v", "x0")
SAMPLERS = ("ddpm", "ddim", "dpmpp2m")
SAMPLER_NAMES = {"ddpm": "DDPM", "ddim": "DDIM", "dpmpp2m": "DPM++(2M)"}  # in tables and labels


def make_betas(schedule: str, timesteps: int, shift: float = 1.0) -> torch.Tensor:
    """float64 [T] noise variances beta_t for t = 0..T-1.

    linear: DDPM's 1e-4..0.02 for T = 1000, both ends scaled by 1000 / T so that other T
            keep the same total noise. cosine: Nichol & Dhariwal 2021, betas clipped at 0.999.
    shift: s > 1 adds noise at every t by moving the log-SNR down by 2 log s (Hoogeboom et
           al. 2023, "simple diffusion"), as for an image of s times the resolution.
           Flat-coloured objects stay visible under much noise, so their layout is decided
           in the last few % of an unshifted schedule; a shift gives that phase more steps.
    """
    if not shift > 0:
        raise ValueError(f"Diffusion: schedule shift must be > 0, got {shift}")
    betas = _base_betas(schedule, timesteps)
    if shift == 1.0:
        return betas
    log_snr = torch.logit(torch.cumprod(1 - betas, dim=0)) - 2 * math.log(shift)
    alpha_bar = torch.cat([torch.ones(1, dtype=torch.float64), torch.sigmoid(log_snr)])
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)


def _base_betas(schedule: str, timesteps: int) -> torch.Tensor:
    if schedule == "linear":
        scale = 1000.0 / timesteps
        return torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64)
    if schedule == "cosine":
        s = 0.008
        steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
        alpha_bar = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    raise ValueError(f"Diffusion: unknown schedule {schedule!r}; choose one of {SCHEDULES}")


def draw_noise(shape, generator, device) -> torch.Tensor:
    """Standard normal float32 of `shape` on `device`.

    generator: None (global RNG), one torch.Generator for the whole batch, or a list of
    shape[0] generators, one per sample: row i then comes from generator i alone, so a
    sample's noise does not depend on its batch. Noise is drawn on each generator's own
    device and moved to `device` (a CPU generator gives the same noise for a GPU model).
    """
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"draw_noise: {len(generator)} generators for a batch of {shape[0]}")
        return torch.stack([torch.randn(tuple(shape[1:]), generator=g, device=g.device)
                            for g in generator]).to(device)
    if generator is None:
        return torch.randn(shape, device=device)
    return torch.randn(tuple(shape), generator=generator, device=generator.device).to(device)


def _at(values: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """values[t] shaped [B, 1, ..., 1] to broadcast over a [B, ...] tensor of ndim dims."""
    return values.to(t.device)[t].reshape(-1, *([1] * (ndim - 1)))


class Diffusion(nn.Module):
    """A denoiser plus the forward (noising) process and its reverse samplers.

    unet: module called as unet(x float [B, C, H, W], t int64 [B], text) -> float [B, C, H, W].
    schedule: "linear" or "cosine"; timesteps: T, the number of noise levels.
    prediction: what the unet outputs: "eps" (the noise), "v" (sqrt(ab) eps - sqrt(1-ab) x0)
                or "x0" (the clean image).
    shift: noise-schedule shift s >= 1 (see make_betas); 1 = the schedule as published.
    min_snr_gamma: if set, weight each sample's loss by min(SNR, gamma) (Hang et al. 2023),
                   normalised to the chosen target.
    """

    def __init__(self, unet: nn.Module, schedule: str = "cosine", timesteps: int = 1000,
                 prediction: str = "v", image_size: int = 32, image_channels: int = 3,
                 min_snr_gamma: float | None = None, shift: float = 1.0):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"Diffusion: unknown prediction {prediction!r}; choose one of {PREDICTIONS}")
        if int(timesteps) != timesteps or timesteps < 1:
            raise ValueError(f"Diffusion: timesteps must be a positive integer, got {timesteps}")
        if min_snr_gamma is not None and not min_snr_gamma > 0:
            raise ValueError(f"Diffusion: min_snr_gamma must be > 0 or None, got {min_snr_gamma}")
        for name, value in (("image_size", image_size), ("image_channels", image_channels)):
            unet_value = getattr(unet, name, value)
            if unet_value != value:
                raise ValueError(f"Diffusion: {name}={value} but the unet was built with {unet_value}")
        self.unet = unet
        self.schedule = schedule
        self.timesteps = int(timesteps)
        self.prediction = prediction
        self.image_size = image_size
        self.image_channels = image_channels
        self.min_snr_gamma = min_snr_gamma

        betas = make_betas(schedule, self.timesteps, shift)
        self.shift = shift
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        posterior_variance = betas * (1 - prev) / (1 - alphas_cumprod)
        tables = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": prev,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1 - alphas_cumprod).sqrt(),
            "posterior_variance": posterior_variance,
            "posterior_mean_coef_x0": betas * prev.sqrt() / (1 - alphas_cumprod),
            "posterior_mean_coef_xt": (1 - prev) * (1 - betas).sqrt() / (1 - alphas_cumprod),
        }
        # Computed in float64, stored in float32; not in the state dict (derived from the config).
        for name, value in tables.items():
            self.register_buffer(name, value.float(), persistent=False)

    # ---------------------------------------------------------------- forward process

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
        """What the unet should output for x_t = q_sample(x0, t, noise), per `prediction`."""
        if self.prediction == "eps":
            return noise
        if self.prediction == "x0":
            return x0
        return (_at(self.sqrt_alphas_cumprod, t, x0.dim()) * noise
                - _at(self.sqrt_one_minus_alphas_cumprod, t, x0.dim()) * x0)

    def x0_eps_from_output(self, x_t: torch.Tensor, t: torch.Tensor, output: torch.Tensor):
        """(x0, eps) implied by the unet's output at (x_t, t); both float like x_t, not clipped."""
        a = _at(self.sqrt_alphas_cumprod, t, x_t.dim())
        s = _at(self.sqrt_one_minus_alphas_cumprod, t, x_t.dim())
        if self.prediction == "eps":
            return (x_t - s * output) / a, output
        if self.prediction == "x0":
            return output, (x_t - a * output) / s
        return a * x_t - s * output, s * x_t + a * output

    def eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """The noise that takes x0 to x_t at step t."""
        return ((x_t - _at(self.sqrt_alphas_cumprod, t, x_t.dim()) * x0)
                / _at(self.sqrt_one_minus_alphas_cumprod, t, x_t.dim()))

    # ---------------------------------------------------------------- training

    def loss(self, images: torch.Tensor, text: TextBatch) -> torch.Tensor:
        """Mean squared error on the prediction target at uniformly random t.

        images: float in [-1, 1], [B, C, H, W]; text: TextBatch of batch B. Returns a scalar.
        """
        expected = (self.image_channels, self.image_size, self.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"Diffusion.loss: images must be float [B, {expected[0]}, {expected[1]}, "
                             f"{expected[2]}] in [-1, 1], got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"Diffusion.loss: images must be float in [-1, 1], got {images.dtype}")
        if len(text) != images.shape[0]:
            raise ValueError(f"Diffusion.loss: {images.shape[0]} images but {len(text)} captions")
        b = images.shape[0]
        t = torch.randint(0, self.timesteps, (b,), device=images.device)
        noise = torch.randn_like(images)
        x_t = self.q_sample(images, t, noise)
        output = self.unet(x_t, t, text).float()
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

    def forward(self, images: torch.Tensor, text: TextBatch) -> torch.Tensor:
        """Same as loss(), so DDP can wrap the whole Diffusion module."""
        return self.loss(images, text)

    # ---------------------------------------------------------------- sampling

    def _guided_output(self, x: torch.Tensor, t: torch.Tensor, text: TextBatch,
                       null_text: TextBatch | None, guidance: float) -> torch.Tensor:
        """Unet output at (x, t), with classifier-free guidance in output space."""
        if guidance == 1.0:
            return self.unet(x, t, text).float()
        both = self.unet(torch.cat([x, x]), torch.cat([t, t]), TextBatch.cat([text, null_text])).float()
        cond, uncond = both.chunk(2)
        return uncond + guidance * (cond - uncond)

    def _sampling_steps(self, sampler: str, steps: int) -> list[int]:
        """Descending timesteps the sampler visits, always starting at T - 1."""
        if sampler == "ddpm":
            return list(range(self.timesteps - 1, -1, -1))
        # Evenly spaced and ending at T-1, so even one step starts from pure noise.
        return [round((i + 1) * self.timesteps / steps) - 1 for i in range(steps)][::-1]

    @torch.no_grad()
    def sample(self, text: TextBatch, generator: torch.Generator | list | None = None,
               null_text: TextBatch | None = None, guidance: float = 1.0, sampler: str = "ddim",
               steps: int = 50, eta: float = 0.0, return_trajectory: bool = False,
               noise: torch.Tensor | None = None):
        """Generate one image per caption.

        text: TextBatch of batch B (moved to the model's device).
        generator: torch.Generator on the model's device; all noise comes from it. Or a list
                   of B generators (any device), one per caption: image i then depends on
                   generator i alone, not on the batch it is sampled in.
        null_text: the empty caption (batch 1 or B), needed when guidance != 1.
        guidance: classifier-free guidance scale g >= 0: uncond + g * (cond - uncond);
                  1 runs the conditional model alone.
        sampler: "ddpm" (ancestral, all T steps; `steps` and `eta` unused), "ddim" or
                 "dpmpp2m" (DPM-Solver++(2M)): `steps` evenly spaced steps, one unet pass
                 each; `eta` = 0 deterministic (the probability-flow ODE), 1 ~ DDPM's noise.
        noise: optional x_T float [B, C, H, W]; drawn from `generator` when None.
        Returns images float in [-1, 1] [B, C, H, W], and with return_trajectory also a list
        (one per step) of the predicted x0, float in [-1, 1] [B, C, H, W], on the CPU.
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"Diffusion.sample: unknown sampler {sampler!r}; choose one of {SAMPLERS}")
        if sampler != "ddpm" and not 1 <= steps <= self.timesteps:
            raise ValueError(f"Diffusion.sample: steps must be in [1, T={self.timesteps}], got {steps}")
        if eta < 0:
            raise ValueError(f"Diffusion.sample: eta must be >= 0, got {eta}")
        if guidance < 0:
            raise ValueError(f"Diffusion.sample: guidance must be >= 0, got {guidance}")
        device = self.betas.device
        b = len(text)
        text = text.to(device)
        if guidance != 1.0:
            if null_text is None:
                raise ValueError("Diffusion.sample: guidance != 1 needs null_text (the empty caption)")
            if len(null_text) not in (1, b):
                raise ValueError(f"Diffusion.sample: null_text must have batch 1 or {b}, got {len(null_text)}")
            null_text = null_text.to(device)
            null_text = null_text.repeat(b) if len(null_text) == 1 and b > 1 else null_text
        shape = (b, self.image_channels, self.image_size, self.image_size)
        if noise is None:
            x = draw_noise(shape, generator, device)
        elif tuple(noise.shape) != shape:
            raise ValueError(f"Diffusion.sample: noise must be {list(shape)}, got {list(noise.shape)}")
        else:
            x = noise.to(device=device, dtype=torch.float32)

        was_training = self.training
        self.eval()  # no dropout while sampling; the caller's mode is restored below
        try:
            return self._sample_loop(x, text, null_text, guidance, sampler, steps, eta,
                                     return_trajectory, generator)
        finally:
            self.train(was_training)

    def _sample_loop(self, x, text, null_text, guidance, sampler, steps, eta, return_trajectory,
                     generator):
        b, device, shape = x.shape[0], x.device, x.shape
        table = self.alphas_cumprod.double().cpu().tolist()
        ab = lambda step: table[step] if step >= 0 else 1.0  # step -1: the clean image
        noise = lambda: draw_noise(shape, generator, device)
        trajectory, previous = [], None  # previous: the multistep solver's last (lambda, x0)
        timesteps = self._sampling_steps(sampler, steps)
        for i, step in enumerate(timesteps):
            t = torch.full((b,), step, device=device, dtype=torch.long)
            output = self._guided_output(x, t, text, null_text, guidance)
            x0 = self.x0_eps_from_output(x, t, output)[0].clamp(-1, 1)
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
        images = x.clamp(-1, 1)
        return (images, trajectory) if return_trajectory else images
