"""The diffusion model kind: a backbone, trained and sampled by an objective.

As k-diffusion keeps its Denoiser apart from the network, the backbone is any module
(x, t, text) -> output with t a float in [0, 1000], and the objective (objectives/) owns
noise, time, targets, loss weighting and sampling. `Diffusion` has the interface every model
in tti shares: `loss(images, text) -> scalar`, `sample(text, generator, ...)`.
"""
from __future__ import annotations

import itertools

import torch
import torch.nn as nn

from tti.config.registry import BACKBONES, OBJECTIVES, Entry
from tti.models.noise import draw_noise
from tti.text.batch import TextBatch


def build(cfg, text_encoder) -> "Diffusion":
    """model.backbone for the config's grid (RGB pixels or latents) and the encoder's token
    width, under model.objective."""
    backbone = BACKBONES.get(cfg.model.backbone).build(cfg, cfg.grid().channels, text_encoder.dim)
    return Diffusion(backbone, OBJECTIVES.get(cfg.model.objective).build(cfg))


# Its table label is its parts': "Gaussian v-prediction, UNet 32/64/96".
ENTRY = Entry("diffusion", build, parts=("objective", "backbone"), label=lambda cfg: "")


class Diffusion(nn.Module):
    """backbone: module (x float [B, C, S, S], t float [B], text) -> float [B, C, S, S], with
    `image_size` and `image_channels` attributes; objective: an Objective."""

    def __init__(self, backbone: nn.Module, objective: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.objective = objective
        self.image_size, self.image_channels = backbone.image_size, backbone.image_channels

    def loss(self, images: torch.Tensor, text: TextBatch) -> torch.Tensor:
        """images: float [B, C, S, S] in [-1, 1]; text: TextBatch of batch B -> scalar."""
        expected = (self.image_channels, self.image_size, self.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"Diffusion.loss: images must be float [B, {expected[0]}, {expected[1]}, "
                             f"{expected[2]}] in [-1, 1], got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"Diffusion.loss: images must be float in [-1, 1], got {images.dtype}")
        if len(text) != images.shape[0]:
            raise ValueError(f"Diffusion.loss: {images.shape[0]} images but {len(text)} captions")
        return self.objective.loss(self.backbone, images, text)

    def forward(self, images: torch.Tensor, text: TextBatch) -> torch.Tensor:
        """Same as loss(), so DDP can wrap the whole module."""
        return self.loss(images, text)

    def check_sampling(self, sampler: str, steps: int, eta: float) -> None:
        self.objective.check_sampling(sampler, steps, eta)

    @torch.no_grad()
    def sample(self, text: TextBatch, generator: torch.Generator | list | None = None,
               null_text: TextBatch | None = None, guidance: float = 1.0,
               sampler: str | None = None, steps: int = 20, eta: float = 0.0,
               return_trajectory: bool = False, noise: torch.Tensor | None = None):
        """Generate one image per caption.

        text: TextBatch of batch B (moved to the model's device).
        generator: torch.Generator; all noise comes from it. Or a list of B generators (any
                   device), one per caption: image i then depends on generator i alone.
        null_text: the empty caption (batch 1 or B), needed when guidance != 1.
        guidance: classifier-free guidance scale g >= 0 (see Guided); 1 = conditional alone.
        sampler, steps, eta: one of the objective's samplers (`objective.samplers`; None =
                  its first), its steps and, where it takes one, its noise scale eta.
        noise: optional starting noise float [B, C, S, S]; drawn from `generator` when None.
        Returns images float in [-1, 1] [B, C, S, S], and with return_trajectory also a list
        (one per step) of the predicted clean images, float [B, C, S, S], on the CPU.
        """
        sampler = sampler or next(iter(self.objective.samplers))
        self.check_sampling(sampler, steps, eta)
        if guidance < 0:
            raise ValueError(f"Diffusion.sample: guidance must be >= 0, got {guidance}")
        device = next(itertools.chain(self.parameters(), self.buffers())).device
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
            denoise = Guided(self.backbone, text, null_text, guidance)
            images, trajectory = self.objective.sample(denoise, x, sampler, steps, eta,
                                                       lambda: draw_noise(shape, generator, device),
                                                       return_trajectory)
        finally:
            self.train(was_training)
        return (images, trajectory) if return_trajectory else images


class Guided:
    """The backbone with classifier-free guidance: called as (x, t float [B]) -> output,
    uncond + g * (cond - uncond), the conditional and null captions in one batched pass."""

    def __init__(self, backbone: nn.Module, text: TextBatch, null_text: TextBatch | None,
                 guidance: float):
        self.backbone, self.guidance = backbone, guidance
        self.text = text if guidance == 1.0 else TextBatch.cat([text, null_text])

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.guidance == 1.0:
            return self.backbone(x, t, self.text).float()
        both = self.backbone(torch.cat([x, x]), torch.cat([t, t]), self.text).float()
        cond, uncond = both.chunk(2)
        return uncond + self.guidance * (cond - uncond)
