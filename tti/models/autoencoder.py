"""A frozen autoencoder whose latent space a model learns in (latent diffusion).

`model.autoencoder` names a diffusers `AutoencoderKL` by hub id (the Stable Diffusion VAE,
`stabilityai/sd-vae-ft-ema` or `-mse`) or a folder that `save_pretrained` wrote. Training gets
RGB images (encoded here) or a latent store's moments (tti/data/latent_store.py: the encoder
never runs); sampling decodes to RGB in [-1, 1]. The VAE is never trained nor saved in
checkpoints: it is reloaded by name, as a frozen text encoder is.
"""
from __future__ import annotations

import hashlib

import torch
import torch.nn as nn

from tti.config.schema import LATENT_CHANNELS, LATENT_FACTOR
from tti.infra.cli import UserError
from tti.infra.hub import locate_pretrained

# Images per decoder call: the SD decoder's activations at 256 px are ~100 MB per image.
DECODE_CHUNK = 16


class AutoencoderError(UserError, ValueError):
    """model.autoencoder names a VAE that cannot be loaded here, or one of another shape."""


def check_autoencoder(name: str) -> str:
    """What `from_pretrained` should load for model.autoencoder: a local folder, the hub id
    when the hub answers, or its snapshot in the HF cache (tti/infra/hub.py). Cheap (no
    weights are read); raises AutoencoderError in one line naming the way out."""
    return locate_pretrained(name, "model.autoencoder", AutoencoderError)


def load_autoencoder(name: str) -> "FrozenAutoencoder":
    """The frozen VAE model.autoencoder names (see check_autoencoder)."""
    from diffusers import AutoencoderKL

    path = check_autoencoder(name)
    try:
        vae = AutoencoderKL.from_pretrained(path, low_cpu_mem_usage=False)  # no accelerate needed
    except (OSError, ValueError) as e:  # e.g. a folder with a config but no weights
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise AutoencoderError(f"model.autoencoder {name!r}: cannot load it from {path} "
                               f"({first_line})") from None
    return FrozenAutoencoder(name, vae)


class FrozenAutoencoder(nn.Module):
    """A VAE of the SD family, frozen, in eval mode whatever its parent's mode.

    channels, factor: its latent channels (4) and how much smaller its latents are (8);
    scale: its scaling factor (0.18215 for the SD VAEs), bringing latents near unit variance:
    the model learns scale * z, as latent diffusion does.
    """

    def __init__(self, name: str, vae: nn.Module):
        super().__init__()
        config = vae.config
        factor = 2 ** (len(config.block_out_channels) - 1)
        if (config.latent_channels, factor) != (LATENT_CHANNELS, LATENT_FACTOR):
            raise AutoencoderError(
                f"model.autoencoder {name!r} has {config.latent_channels} latent channels and "
                f"is {factor}x smaller; tti's latent space is the SD VAE's "
                f"({LATENT_CHANNELS} channels, {LATENT_FACTOR}x)")
        self.name, self.vae = name, vae.eval().requires_grad_(False)
        self.channels, self.factor = LATENT_CHANNELS, LATENT_FACTOR
        self.scale = float(config.scaling_factor)

    def train(self, mode: bool = True):
        return super().train(False)  # no dropout or norm statistics to update, ever

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @torch.no_grad()
    def moments(self, images: torch.Tensor) -> torch.Tensor:
        """images float [B, 3, S, S] in [-1, 1] -> float32 [B, 2C, S/f, S/f]: the posterior's
        mean, then its standard deviation (unscaled). In fp32 whatever the caller's autocast,
        so live encoding gives what a latent store holds (up to its fp16 rounding)."""
        with torch.autocast(self.device.type, enabled=False):
            posterior = self.vae.encode(images.to(self.device, torch.float32)).latent_dist
        return torch.cat([posterior.mean, posterior.std], dim=1).float()

    def training_latents(self, x: torch.Tensor) -> torch.Tensor:
        """What the model learns, one fresh draw per call: scale * (mean + std * eps).

        x: RGB images float [B, 3, S, S] in [-1, 1] (encoded now), or a latent store's
        moments float [B, 2C, S/f, S/f] (mean, then std; the encoder does not run).
        eps comes from torch's global generator, which a checkpoint saves, so a resumed run
        draws what the uninterrupted one drew. Returns float32 [B, C, S/f, S/f]."""
        if x.dim() == 4 and x.shape[1] == 3:
            x = self.moments(x)
        elif x.dim() != 4 or x.shape[1] != 2 * self.channels:
            raise ValueError(f"FrozenAutoencoder: expected RGB images [B, 3, S, S] or moments "
                             f"[B, {2 * self.channels}, s, s], got {tuple(x.shape)}")
        mean, std = x.float().chunk(2, dim=1)
        return (mean + std * torch.randn_like(std)) * self.scale

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents float [B, C, s, s] -> images float32 [B, 3, s*f, s*f], nominally
        in [-1, 1] (not clipped: to_uint8 clips), on the latents' device."""
        out = [self.vae.decode(chunk.to(self.device) / self.scale).sample.float()
               for chunk in latents.split(DECODE_CHUNK)]
        return torch.cat(out).to(latents.device)

    def identity(self) -> dict:
        """What a latent store's contents depend on: the name, a fingerprint of the weights
        (each tensor's name, shape and first and last 64 values: milliseconds), the scale."""
        digest = hashlib.blake2b(digest_size=8)
        for name, tensor in self.vae.state_dict().items():
            flat = tensor.detach().reshape(-1)
            ends = torch.cat([flat[:64], flat[-64:]]).float().cpu().numpy()
            digest.update(f"{name}{tuple(tensor.shape)}".encode() + ends.tobytes())
        return {"autoencoder": self.name, "weights": digest.hexdigest(),
                "latent_channels": self.channels, "factor": self.factor,
                "scaling_factor": self.scale}
