"""Why is "relation" wrong? Two diagnostics for a model trained on the embedded shapes dataset.

1. Layout outcomes: n two-object val captions are sampled (the config's sampler) and each
   image's relation is classified by the judge (tti.eval.metrics.judge.relation_outcome):
   correct / swapped (right axis, objects in the opposite order) / other axis / too close /
   missing, split by whether the caption names the left/top object first. A model that knows
   the axis but not which object goes where scores ~50% correct and ~50% swapped.
2. Stated-order separation at high noise: for "a large A square to the left of a large B
   square" and its mirror ("... to the right of ..."), the x0 prediction from pure noise,
   averaged over draws, and the distance (pixels) from A's colour centroid to B's along x,
   signed so that + means A is on the stated side; the same measure on the mean of real
   renders of such scenes is what a model that knows the order gives, ~0 one that does not.

    python -m bench.relation --checkpoint results/shapes32_long_diffusion/0 --n 200

For the "oracle" training run of the relation study (docs/studies/relation.md), `--write-canonical SRC OUT`
copies a shapes dataset's annotations with one caption per image in canonical order ("A to
the left of B" / "A above B": the first-named object is the left/top one) and links its
image folders, so that the order is plain word order:

    python -m bench.relation --write-canonical data/shapes data/shapes_canonical
    python -m tti.train --config configs/shapes32.yaml --set data.root=data/shapes_canonical \
        --set data.generate_shapes=false --set text.hidden_layer=-1 --set run.dataset=canonical \
        --set model.unet.coord_channels=true --set model.unet.position_init=sinusoidal \
        --set train.sample_every=625
    python -m bench.relation --checkpoint results/canonical_diffusion/0 --n 200
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import sys
import time

import numpy as np
import torch

from tti.data.shapes import (COLOURS, Scene, ShapeObject, canonical_caption, generate_examples,
                             parse_caption, render, sample_centres)
from tti.eval.metrics.judge import RELATION_OUTCOMES, judge_image, relation_outcome
from tti.infra.precision import PRECISIONS
from tti.models.text_to_image import load_for_inference
from tti.eval.grid import generate
from tti.infra.cli import run_cli

PAIRS = (("red", "blue"), ("green", "purple"), ("yellow", "cyan"))


def two_object_captions(n: int, seed: int = 0) -> list[str]:
    """n captions of two-object val images (cycling through each image's phrasings)."""
    examples = [e for e in generate_examples(max(4 * n, 100), "val", seed=seed)
                if len(e.scene.objects) == 2][:n]
    if len(examples) < n:
        raise ValueError(f"only {len(examples)} two-object val images for n={n}")
    return [e.captions[i % len(e.captions)] for i, e in enumerate(examples)]


def names_left_first(caption: str) -> bool:
    """True when the caption's first colour word is the left/top object's."""
    scene = parse_caption(caption)
    first, second = (caption.find(o.colour) for o in scene.objects)
    return first < second


def layout_outcomes(images, captions: list[str]) -> dict:
    """{"all" | "left/top named first" | "left/top named second": {outcome: count}}."""
    table = {k: collections.Counter() for k in ("all", "left/top named first", "left/top named second")}
    for image, caption in zip(images, captions):
        outcome = relation_outcome(judge_image(image, caption), caption)
        table["all"][outcome] += 1
        table["left/top named first" if names_left_first(caption) else "left/top named second"][outcome] += 1
    return table


def colour_separation(mean: torch.Tensor, first: str, second: str) -> float:
    """x distance in pixels from `first`'s colour centroid to `second`'s in a mean image.

    mean: float [3, H, W] in [0, 1]. Each pixel weighs by its projection on the colour's RGB
    direction, so the other object leaks in a little and shrinks the distance; the same
    measure is applied to the model and to the data (data_separation)."""
    xs = torch.arange(mean.shape[-1], dtype=torch.float32, device=mean.device).view(1, -1)

    def centroid_x(colour: str) -> float:
        rgb = torch.tensor(COLOURS[colour], dtype=torch.float32, device=mean.device).view(3, 1, 1) / 255
        weight = ((mean * rgb).sum(0) / rgb.square().sum()).clamp(min=0)  # [H, W]
        return float((weight * xs).sum() / weight.sum().clamp(min=1e-6))

    return centroid_x(second) - centroid_x(first)


def caption_for(a: str, b: str, relation: str) -> str:
    return f"a large {a} square {relation} a large {b} square"


@torch.no_grad()
def stated_order_separation(model, t: int, draws: int = 64, seed: int = 0) -> list[float]:
    """Per caption (PAIRS x {left of, right of}): colour_separation of the mean x0 prediction
    from noise at t, signed so that + = the first-named object on the stated side."""
    diffusion = model.image_model
    size = diffusion.image_size
    device = next(diffusion.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for a, b in PAIRS:
        for relation, sign in (("to the left of", 1.0), ("to the right of", -1.0)):
            x = torch.randn(draws, 3, size, size, generator=gen).to(device)
            tt = torch.full((draws,), t, device=device)
            text = model.encode([caption_for(a, b, relation)]).repeat(draws)  # encoded once
            output = diffusion.unet(x, tt, text)
            x0, _ = diffusion.x0_eps_from_output(x, tt, output)
            mean = ((x0.float().mean(0) + 1) / 2).clamp(0, 1)  # [3, H, W] in [0, 1]
            out.append(sign * colour_separation(mean, a, b))
    return out


def data_separation(image_size: int, draws: int = 256, seed: int = 0) -> float:
    """The same measure on the data's mean image: for each pair, "large A square to the left
    of large B square" rendered at `draws` random valid layouts and averaged. What a model
    that had learnt the order would give (mean over PAIRS, pixels)."""
    rng = np.random.default_rng(seed)
    seps = []
    for a, b in PAIRS:
        scene = Scene.of(ShapeObject(a, "square", "large"), "left of", ShapeObject(b, "square", "large"))
        renders = [render(scene.objects, sample_centres(rng, scene), image_size) for _ in range(draws)]
        mean = torch.from_numpy(np.stack(renders).astype(np.float32).mean(0) / 255).permute(2, 0, 1)
        seps.append(colour_separation(mean, a, b))
    return sum(seps) / len(seps)


def write_canonical(src: str, out: str) -> None:
    """Copy a shapes dataset at `src` to `out` with one canonical caption per image; the image
    folders are symlinked, the metadata files copied."""
    os.makedirs(os.path.join(out, "annotations"), exist_ok=True)
    for name in os.listdir(src):
        path = os.path.join(src, name)
        if name.endswith("2014") and os.path.isdir(path) and not os.path.exists(os.path.join(out, name)):
            os.symlink(os.path.abspath(path), os.path.join(out, name))
        elif name.endswith(".json"):
            shutil.copy(path, out)
    for split in ("train2014", "val2014"):
        with open(os.path.join(src, "annotations", f"captions_{split}.json"), encoding="utf-8") as f:
            data = json.load(f)
        first = {}
        for ann in data["annotations"]:
            first.setdefault(ann["image_id"], dict(ann, caption=canonical_caption(ann["caption"])))
        data["annotations"] = list(first.values())
        with open(os.path.join(out, "annotations", f"captions_{split}.json"), "w", encoding="utf-8") as f:
            json.dump(data, f)
        print(f"{split}: {len(first)} images, one canonical caption each -> {out}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="checkpoint file or run directory")
    p.add_argument("--write-canonical", nargs=2, metavar=("SRC", "OUT"),
                   help="only write the canonical-caption copy of a shapes dataset (see above)")
    p.add_argument("--n", type=int, default=200, help="two-object val captions to sample")
    p.add_argument("--timesteps", type=int, nargs="+", default=None,
                   help="noise levels for the separation probe (default: 99.9%%, 90%%, 70%% of T)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=PRECISIONS, default="auto")
    args = p.parse_args(argv)
    if args.write_canonical:
        write_canonical(*args.write_canonical)
        return
    if not args.checkpoint:
        p.error("--checkpoint is required (or --write-canonical SRC OUT)")

    model, cfg = load_for_inference(args.checkpoint, args.device, precision=args.precision)
    start = time.time()
    captions = two_object_captions(args.n)
    images = generate(model, captions, 1, seed=0, **model.sampler_options(cfg))
    table = layout_outcomes(images, captions)
    print(f"## Layout outcomes: {args.n} two-object val captions, {model.sampler_options(cfg)}\n")
    print("| captions | n | " + " | ".join(RELATION_OUTCOMES) + " |")
    print("|---|---|" + "---|" * len(RELATION_OUTCOMES))
    for name, counts in table.items():
        total = sum(counts.values())
        cells = [f"{counts[o] / total:.3f}" if total else "n/a" for o in RELATION_OUTCOMES]
        print(f"| {name} | {total} | " + " | ".join(cells) + " |")

    if cfg.model.objective != "gaussian":
        sys.exit(f"the x0 probe reads a Gaussian checkpoint's timesteps; {args.checkpoint} trains "
                 f"{cfg.model.objective} (the layout table above is its result)")
    big_t = cfg.model.gaussian.timesteps
    steps = args.timesteps or [int(big_t * f) - 1 for f in (1.0, 0.9, 0.7)]
    print(f"\n## Stated-order separation of the mean x0 prediction from noise (pixels, + = stated "
          f"order; the same measure on the mean of real renders: {data_separation(model.image_model.image_size):+.2f})\n")
    print("| t | " + " | ".join(f"{a}/{b} {r}" for a, b in PAIRS for r in ("left", "right")) + " | mean |")
    print("|---|" + "---|" * (2 * len(PAIRS) + 1))
    for t in steps:
        seps = stated_order_separation(model, t)
        print(f"| {t} | " + " | ".join(f"{s:+.2f}" for s in seps) + f" | {sum(seps) / len(seps):+.2f} |")
    print(f"\ntotal {time.time() - start:.0f} s")


if __name__ == "__main__":
    run_cli(main)  # a damaged or unsafe checkpoint: one line, no traceback
