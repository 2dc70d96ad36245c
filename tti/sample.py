"""Captions -> a labelled PNG grid (one row per caption) and a denoising GIF.

    python -m tti.sample --checkpoint results/shapes_diffusion/0 \
        --caption "a small red circle to the left of a large blue square" \
        --caption "a large green triangle" --n 8 --sampler ddim --steps 50 --guidance 3 \
        --out grid.png --gif denoise.gif

--checkpoint takes a checkpoint file, a run directory (its latest.pt) or a release folder
(`python -m tti.release`; it draws the same images as the checkpoint it came from). EMA
weights are used unless --no-ema. The same seed gives the same images.
"""
from __future__ import annotations

import argparse
import os

import torch

from tti.config.registry import all_samplers, samplers
from tti.eval.grid import generate, make_grid, save_gif
from tti.infra.cli import UserError, check_at_least, run_cli
from tti.infra.gpus import check_device
from tti.infra.precision import PRECISIONS
from tti.infra.threads import use_free_cpus
from tti.models.text_to_image import load_for_inference

SAMPLER_ARGUMENTS = ("sampler", "steps", "eta", "guidance")


def add_sampler_arguments(p: argparse.ArgumentParser) -> None:
    """--sampler, --steps, --eta, --guidance (shared with tti.export): each overrides the
    checkpoint config's sample.*."""
    p.add_argument("--sampler", choices=tuple(all_samplers()), default=None,
                   help="one of the model's objective's samplers (default: the config's)")
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
    """The checkpoint config's sampler options with the command line's overrides; a UserError
    names any the model rejects (a sampler its objective lacks, more steps than its T)."""
    opts = model.sampler_options(cfg)
    given = {k: getattr(args, k) for k in SAMPLER_ARGUMENTS if getattr(args, k) is not None}
    known = samplers(cfg)
    if "sampler" in given and known and given["sampler"] not in known:
        raise UserError(f"--sampler {given['sampler']}: this model ({cfg.model.kind}, objective "
                        f"{cfg.model.objective}) samples with {', '.join(known)}")
    opts.update(given)
    if known:  # a kind without samplers (alignDRAW) ignores these options
        try:
            model.image_model.check_sampling(opts["sampler"], opts["steps"], opts["eta"])
        except ValueError as e:
            raise UserError(f"sampler {opts['sampler']}, --steps {opts['steps']}, --eta "
                            f"{opts['eta']}: {e}") from None
    return opts


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m tti.sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint file, run directory or release folder (python -m tti.release)")
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
    check_device(args.device)
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
