"""Pictures a person looks at: a labelled grid of samples (one row per caption) and a GIF of
the denoising steps, and `generate`, which samples each caption n times for them."""
from __future__ import annotations

import os
import textwrap

import torch
from PIL import Image, ImageDraw, ImageFont

from tti.models.text_to_image import to_uint8

LABEL_WIDTH = 240


def _font(size: int = 11):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def make_grid(images: torch.Tensor, nrow: int, captions: list | None = None,
              scale: int | None = None, pad: int = 2) -> Image.Image:
    """images: uint8 [B, 3, H, W], laid out `nrow` per row; captions label each row. Tiles are
    upscaled (nearest) to at least 64 px so 32 px samples are easy to look at."""
    b, _, h, w = images.shape
    scale = scale or max(1, 64 // h)
    th, tw = h * scale, w * scale
    rows = (b + nrow - 1) // nrow
    left = LABEL_WIDTH if captions else 0
    grid = Image.new("RGB", (left + nrow * (tw + pad) + pad, rows * (th + pad) + pad), "white")
    arr = images.permute(0, 2, 3, 1).cpu().numpy()
    for i in range(b):
        r, c = divmod(i, nrow)
        tile = Image.fromarray(arr[i]).resize((tw, th), Image.NEAREST)
        grid.paste(tile, (left + pad + c * (tw + pad), pad + r * (th + pad)))
    if captions:
        draw, font = ImageDraw.Draw(grid), _font()
        for r, caption in enumerate(captions[:rows]):
            lines = textwrap.wrap(caption, width=38)[: max(1, th // 13)]
            draw.multiline_text((4, pad + r * (th + pad) + 2), "\n".join(lines), fill="black",
                                font=font, spacing=2)
    return grid


def save_gif(frames: list, path: str, nrow: int, duration_ms: int = 80, hold_ms: int = 1500) -> None:
    """frames: list of uint8 [B, 3, H, W], one grid per denoising step; the last is held."""
    pictures = [make_grid(f, nrow) for f in frames]
    durations = [duration_ms] * (len(pictures) - 1) + [hold_ms]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=durations, loop=0)


@torch.no_grad()
def generate(model, captions: list, n: int, seed: int = 0, batch_size: int = 64,
             return_trajectory: bool = False, **sampler_opts):
    """Each caption n times -> uint8 [len(captions) * n, 3, H, W] (caption-major order),
    plus the per-step trajectory frames (uint8, same layout) when asked."""
    device = next(model.image_model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    flat = [c for c in captions for _ in range(n)]
    images, steps = [], None
    for start in range(0, len(flat), batch_size):
        out = model.sample(flat[start:start + batch_size], gen,
                           return_trajectory=return_trajectory, **sampler_opts)
        if return_trajectory:
            out, traj = out
            frames = [to_uint8(x).cpu() for x in traj]
            steps = frames if steps is None else [torch.cat([a, b]) for a, b in zip(steps, frames)]
        images.append(to_uint8(out).cpu())
    images = torch.cat(images)
    return (images, steps) if return_trajectory else images
