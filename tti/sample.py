"""Captions -> a labelled PNG grid (one row per caption) and a denoising GIF.

    python -m tti.sample --checkpoint results/shapes_diffusion/0 \
        --caption "a small red circle to the left of a large blue square" \
        --caption "a large green triangle" --n 8 --sampler ddim --steps 50 --guidance 3 \
        --out grid.png --gif denoise.gif

--checkpoint takes a checkpoint file or a run directory (its latest.pt). EMA weights are
used unless --no-ema. The same seed gives the same images.
"""
from __future__ import annotations

import argparse
import os
import textwrap

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from tti.cli import UserError, check_at_least, run_cli
from tti.diffusion import SAMPLERS
from tti.model import PRECISIONS, load_for_inference, to_uint8
from tti.threads import use_free_cpus

LABEL_WIDTH = 240


def _font(size: int = 11):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def make_grid(images: torch.Tensor, nrow: int, captions: list | None = None,
              scale: int | None = None, pad: int = 2) -> Image.Image:
    """images: uint8 [B, 3, H, W], laid out `nrow` per row; captions label each row.

    Tiles are upscaled (nearest) to at least 64 px so 32 px samples are easy to look at.
    """
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
    device = next(model.generator.parameters()).device
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


# ---------------------------------------------------------------- arguments shared with tti.export

SAMPLER_ARGUMENTS = ("sampler", "steps", "eta", "guidance")


def add_sampler_arguments(p: argparse.ArgumentParser) -> None:
    """--sampler, --steps, --eta, --guidance: each overrides the checkpoint config's sample.*."""
    p.add_argument("--sampler", choices=SAMPLERS, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--eta", type=float, default=None)
    p.add_argument("--guidance", type=float, default=None)


def check_inference_arguments(p: argparse.ArgumentParser, args, bounds: dict) -> None:
    """Before any model loads: p.error for a missing --checkpoint, --steps < 1, --eta < 0,
    --guidance < 0, or another argument under its bound in `bounds` ({dest: lowest})."""
    if not os.path.exists(args.checkpoint):
        p.error(f"--checkpoint {args.checkpoint}: no such checkpoint file or run directory")
    check_at_least(p, args, {"steps": 1, "eta": 0, "guidance": 0, **bounds})


def sampler_options(model, cfg, args) -> dict:
    """The checkpoint config's sampler options with the command line's overrides.

    UserError if --steps is more than a diffusion model's T (only DDPM ignores --steps).
    """
    opts = model.sampler_options(cfg)
    opts.update({k: getattr(args, k) for k in SAMPLER_ARGUMENTS if getattr(args, k) is not None})
    if cfg.model.kind == "diffusion" and opts["sampler"] != "ddpm":
        timesteps = cfg.model.diffusion.timesteps
        if opts["steps"] > timesteps:
            raise UserError(f"--steps {opts['steps']}: this model was trained with "
                            f"{timesteps} diffusion steps; choose 1 to {timesteps}")
    return opts


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m tti.sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint file or run directory")
    p.add_argument("--caption", action="append", default=[], help="repeatable")
    p.add_argument("--captions-file", help="one caption per line")
    p.add_argument("--n", type=int, default=8, help="samples per caption")
    add_sampler_arguments(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="grid.png")
    p.add_argument("--gif", default=None, help="also write the denoising GIF here")
    p.add_argument("--no-ema", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="autocast dtype for the network (auto: bf16 on CUDA and bf16-capable CPUs)")
    args = p.parse_args(argv)
    check_inference_arguments(p, args, {"n": 1})
    if args.captions_file and not os.path.isfile(args.captions_file):
        p.error(f"--captions-file {args.captions_file}: no such file")

    captions = list(args.caption)
    if args.captions_file:
        with open(args.captions_file, encoding="utf-8") as f:
            captions += [line.strip() for line in f if line.strip()]
    model, cfg = load_for_inference(args.checkpoint, args.device, use_ema=not args.no_ema,
                                    precision=args.precision)
    if not captions:
        captions = cfg.sample.captions or ["a photo"]
    opts = sampler_options(model, cfg, args)
    result = generate(model, captions, args.n, seed=args.seed,
                      return_trajectory=bool(args.gif), **opts)
    images, frames = result if args.gif else (result, None)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    make_grid(images, args.n, captions).save(args.out)
    print(f"wrote {args.out} ({len(captions)} captions x {args.n} samples, {opts})")
    if frames:
        save_gif(frames, args.gif, nrow=args.n)
        print(f"wrote {args.gif} ({len(frames)} frames)")


if __name__ == "__main__":
    use_free_cpus()  # not in main(): in-process callers (tests) keep their own thread count
    run_cli(main)
