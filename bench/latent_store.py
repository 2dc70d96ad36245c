"""The latent store (tti/data/latent_store.py): what it costs to build, its size per image and
for COCO 2014 train, and the share of a training step spent getting the step's latents,
from the store against the VAE encoding the batch live.

1. build: --images synthetic 640x480 COCO-like JPEGs (bench/data.py), packed at 256 px, then
   encoded by --vae: "sd" (default), the SD VAE's architecture with random weights
   (tti.models.tiny_vae.SD_VAE: the real encoder's FLOPs; no weights can be downloaded here),
   or "tiny"; seconds, images/s, the store's bytes per image from its files, and the same
   for COCO 2014 train (82,783 images) and val (40,504);
2. step: training steps of --config (configs/coco256_latent_frozen_roberta.yaml) with its
   UNet shrunk to CPU size by --set, the two ways in turn, step by step: "latent store"
   (the batch's rows from the store's memory map, collated, a fresh z drawn) and "live
   encoder" (the batch's packed pixels through the VAE, then z). The time to get z is
   measured inside each step, so its share does not depend on how busy a shared machine is;
   the text is one fixed batch of token states (the text store's job, bench/text_store.py).
3. FLOPs: the VAE encoder's per image at 256 px against the training FLOPs per image of the
   full-size latent configs (bench/config_costs.py): the share live encoding would take on a
   GPU that runs both at the same rate.

    OMP_NUM_THREADS=1 python -m bench.latent_store                 # CPU, ~15 minutes (SD VAE)
    OMP_NUM_THREADS=1 python -m bench.latent_store --vae tiny --images 32 --steps 2
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.data import write_synthetic_coco
from bench.train_throughput import alternate
from tti.config.load import load_config
from tti.data.coco import collate, load_split
from tti.data.latent_store import LatentCaptions, build_latent_store, store_folder
from tti.models.text_to_image import build, model_input
from tti.models.tiny_vae import SD_VAE, TINY_VAE, build_tiny_vae

COCO_TRAIN_IMAGES, COCO_VAL_IMAGES = 82_783, 40_504
CPU_SIZE = ["model.unet.channels=[32, 64, 96]", "model.unet.head_dim=16",
            "model.unet.num_res_blocks=1", "model.unet.dropout=0.0",
            "text.name=packaged-minilm", "text.cache=false"]
LATENT_CONFIGS = ["configs/coco256_latent_frozen_roberta.yaml",
                  "configs/coco256_latent_ft_roberta.yaml",
                  "configs/coco256_latent_transformer_frozen_roberta.yaml"]


def bench_build(model, packed, work: Path):
    """Build the store of `packed` with the model's VAE; print time, size and projections."""
    vae = model.autoencoder
    folder = store_folder(str(work / "cache"), packed.split, packed.image_size, vae.identity())
    start = time.perf_counter()
    build_latent_store(vae, packed, folder, chunk=8, progress=True)
    seconds = time.perf_counter() - start
    sizes = {f: os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)}
    per_image = sum(sizes.values()) / len(packed)
    print(f"\n== build: {len(packed)} images at {packed.image_size}px, VAE {vae.name} "
          f"({sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M parameters) ==")
    print(f"{seconds:.1f} s = {len(packed) / seconds:.2f} images/s")
    print(f"bytes per image: {per_image:.0f}; files: "
          + ", ".join(f"{f} {v} B" for f, v in sorted(sizes.items())))
    for name, n in (("COCO 2014 train", COCO_TRAIN_IMAGES),
                    ("+ val", COCO_TRAIN_IMAGES + COCO_VAL_IMAGES)):
        print(f"{name} ({n} images): {per_image * n / 2 ** 30:.2f} GiB")
    return folder


def bench_step(args, model, packed, folder: str) -> None:
    """The latent store against the live encoder, step by step in turn (see the docstring)."""
    latents = LatentCaptions(packed)
    latents.use_store(folder, model.autoencoder.identity())
    captions = [packed.captions(i)[0] for i in range(args.batch)]
    with torch.no_grad():
        text = model.text(captions)  # one fixed batch: the image side is what is measured
    opt = torch.optim.AdamW(model.image_model.parameters(), lr=1e-4, fused=True)
    rng = random.Random(0)
    times = {"latent store": ([], []), "live encoder": ([], [])}

    def run(name, source):
        def step(record):
            rows = rng.sample(range(len(packed)), args.batch)
            start = time.perf_counter()
            batch, _ = collate([source[i] for i in rows])
            z = model.autoencoder.training_latents(model_input(batch))
            ready = time.perf_counter()
            loss = model.image_model.loss(z, text)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if record:
                times[name][0].append(time.perf_counter() - start)
                times[name][1].append(ready - start)
        return step

    n_params = sum(p.numel() for p in model.image_model.parameters())
    print(f"\n== step: {args.config} with {' '.join(CPU_SIZE)}: {n_params / 1e6:.2f}M "
          f"parameters, batch {args.batch}, latents 4x32x32 of 256 px images, fp32 ==")
    alternate([run("latent store", latents), run("live encoder", packed)], args.steps, args.warmup)
    for name, (steps, encode) in times.items():
        step, enc = statistics.median(steps), statistics.median(encode)
        print(f"{name:14s} {step * 1e3:9.1f} ms/step  getting z {enc * 1e3:9.2f} ms = "
              f"{100 * enc / step:6.2f}% of the step")


def bench_flops(vae_shape: dict) -> None:
    """The VAE encoder's FLOPs per 256 px image against the full-size configs' training."""
    from bench.config_costs import costs
    from tti.models.tiny_vae import make_vae

    vae = make_vae(vae_shape)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        vae.encode(torch.zeros(1, 3, 256, 256))
    encoder = counter.get_total_flops() / 1e9
    print(f"\n== FLOPs: VAE encoder {encoder:.1f} GFLOP per 256 px image ==")
    for path in LATENT_CONFIGS:
        train = costs(path)["gflops"]
        print(f"{os.path.basename(path)}: training {train:.1f} GFLOP/image; encoding live would "
              f"be {100 * encoder / (encoder + train):.0f}% of a step at equal FLOP rates")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=32, help="synthetic training images")
    parser.add_argument("--vae", choices=("sd", "tiny"), default="sd")
    parser.add_argument("--config", default="configs/coco256_latent_frozen_roberta.yaml")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per way")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--skip-flops", action="store_true")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"{os.cpu_count()} CPUs")
    started = time.perf_counter()
    shape = SD_VAE if args.vae == "sd" else TINY_VAE
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_synthetic_coco(work / "coco", args.images, "train2014")
        packed = load_split(work / "coco", "train2014", 256, cache_dir=work / "cache",
                            num_workers=0)
        vae = build_tiny_vae(work / "vae", shape=shape)
        torch.manual_seed(0)
        model = build(load_config(args.config, CPU_SIZE + [f"model.autoencoder={vae}"]))
        folder = bench_build(model, packed, work)
        bench_step(args, model, packed, folder)
    if not args.skip_flops:
        bench_flops(shape)
    print(f"\ntotal bench time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
