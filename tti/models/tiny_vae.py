"""A real AutoencoderKL, tiny and random, built in code: the stand-in for the SD VAE in tests
and CPU smoke runs with no network (no VAE weights can be downloaded on the build machines).

    python -m tti.models.tiny_vae OUT_DIR            # a few hundred kB
    python -m tti.train ... --set model.autoencoder=OUT_DIR

writes what `AutoencoderKL.from_pretrained` reads, with the SD VAE's geometry (4 latent
channels, 8x smaller) at a sliver of its width; `--sd-shape` writes the SD VAE's own
architecture (84M parameters): its FLOPs and memory. Random weights: it reconstructs nothing.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

# sd-vae-ft-ema's config.json (the architecture of the Stable Diffusion v1 VAE).
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
              norm_num_groups=32, sample_size=256, scaling_factor=0.18215)
TINY_VAE = dict(block_out_channels=(8, 8, 16, 16), layers_per_block=1, latent_channels=4,
                norm_num_groups=4, sample_size=256, scaling_factor=0.18215)


def make_vae(shape: dict, seed: int = 0):
    """A random AutoencoderKL of `shape` (SD_VAE, TINY_VAE or the like); the caller's random
    stream is left as it was."""
    import torch
    from diffusers import AutoencoderKL

    levels = len(shape["block_out_channels"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(in_channels=3, out_channels=3,
                             down_block_types=("DownEncoderBlock2D",) * levels,
                             up_block_types=("UpDecoderBlock2D",) * levels, **shape)


def build_tiny_vae(out_dir, seed: int = 0, shape: dict = TINY_VAE) -> str:
    """Save a random AutoencoderKL of `shape` into `out_dir` (created; must be empty or new).
    Returns out_dir as a string."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: exists and is not an empty folder; give a new one")
    out.mkdir(parents=True, exist_ok=True)
    make_vae(shape, seed).save_pretrained(str(out))
    return str(out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="new or empty folder to write the VAE into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sd-shape", action="store_true",
                        help="the SD VAE's full architecture (84M parameters), random weights")
    args = parser.parse_args(argv)
    try:
        path = build_tiny_vae(args.out_dir, args.seed, SD_VAE if args.sd_shape else TINY_VAE)
    except OSError as e:  # the user's path: no traceback
        sys.exit(f"tti.models.tiny_vae: {e}")
    print(f"{path}: random AutoencoderKL; use --set model.autoencoder={Path(path).resolve()}")


if __name__ == "__main__":
    main()
