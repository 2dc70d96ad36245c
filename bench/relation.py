"""Why is "relation" wrong? Two diagnostics for a model trained on the embedded shapes dataset.

1. Layout outcomes: n two-object val captions are sampled (the config's sampler) and each
   image's relation is classified by the judge (tti.metrics.judge.relation_outcome):
   correct / swapped (right axis, objects in the opposite order) / other axis / too close /
   missing, split by whether the caption names the left/top object first. A model that knows
   the axis but not which object goes where scores ~50% correct and ~50% swapped.
2. Stated-order separation at high noise: for "a large A square to the left of a large B
   square" and its mirror ("... to the right of ..."), the x0 prediction from pure noise,
   averaged over draws, and the distance (pixels) from A's colour centroid to B's along x,
   signed so that + means A is on the stated side. The training data's mean separation is
   about a third of the image side; a model that ignores the order gives ~0.

    python -m bench.relation --checkpoint results/shapes32_long_diffusion/0 --n 200

For the "oracle" training run of the README's relation study, `--write-canonical SRC OUT`
copies a shapes dataset's annotations with one caption per image in canonical order ("A to
the left of B" / "A above B": the first-named object is the left/top one) and links its
image folders, so that the order is plain word order:

    python -m bench.relation --write-canonical data/shapes data/shapes_canonical
    python -m tti.train --config configs/shapes32.yaml --set data.root=data/shapes_canonical \
        --set data.generate_shapes=false --set text.hidden_layer=-1 --set run.dataset=canonical
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import time

import torch

from tti.data.shapes import COLOURS, RELATION_PHRASES, generate_examples, parse_caption
from tti.metrics.judge import RELATION_OUTCOMES, judge_image, relation_outcome
from tti.model import PRECISIONS, load_for_inference
from tti.sample import generate

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


@torch.no_grad()
def stated_order_separation(model, t: int, draws: int = 64, seed: int = 0) -> list[float]:
    """Per caption (PAIRS x {left of, right of}): signed x distance in pixels from the first-
    named object's colour centroid to the second's in the mean x0 prediction from noise at t
    (+ = the stated order)."""
    diffusion = model.generator
    size = diffusion.image_size
    device = next(diffusion.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    xs = torch.arange(size, dtype=torch.float32, device=device).view(1, size)
    out = []
    for a, b in PAIRS:
        for relation, sign in (("to the left of", 1.0), ("to the right of", -1.0)):
            caption = f"a large {a} square {relation} a large {b} square"
            x = torch.randn(draws, 3, size, size, generator=gen).to(device)
            tt = torch.full((draws,), t, device=device)
            x0, _ = diffusion.x0_eps_from_output(x, tt, diffusion.unet(x, tt, model.encode([caption] * draws)))
            mean = ((x0.float().mean(0) + 1) / 2).clamp(0, 1)  # [3, H, W] in [0, 1]

            def centroid_x(colour: str) -> float:
                rgb = torch.tensor(COLOURS[colour], dtype=torch.float32, device=device).view(3, 1, 1) / 255
                weight = ((mean * rgb).sum(0) / rgb.square().sum()).clamp(min=0)  # [H, W]
                return float((weight * xs).sum() / weight.sum().clamp(min=1e-6))

            out.append(sign * (centroid_x(b) - centroid_x(a)))
    return out


def data_separation(image_size: int, n: int = 2000) -> float:
    """Mean x distance (pixels) between the left and right object of the horizontal
    two-object train images: what a model that knows the order predicts."""
    gaps = [(e.centres[1][0] - e.centres[0][0]) * image_size for e in generate_examples(n, "train", seed=0)
            if e.scene.relation == "left of"]
    return sum(gaps) / len(gaps)


def canonical_caption(caption: str) -> str:
    """The caption's facts as "a A" or "a A <left of | above> a B" (A = the left/top object)."""
    scene = parse_caption(caption)
    if scene.relation is None:
        return f"a {scene.objects[0].phrase()}"
    a, b = scene.objects
    return f"a {a.phrase()} {RELATION_PHRASES[scene.relation]} a {b.phrase()}"


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

    big_t = cfg.model.diffusion.timesteps
    steps = args.timesteps or [int(big_t * f) - 1 for f in (1.0, 0.9, 0.7)]
    print(f"\n## Stated-order separation of the mean x0 prediction from noise (pixels, + = stated "
          f"order; the data's mean is {data_separation(model.generator.image_size):+.1f})\n")
    print("| t | " + " | ".join(f"{a}/{b} {r}" for a, b in PAIRS for r in ("left", "right")) + " | mean |")
    print("|---|" + "---|" * (2 * len(PAIRS) + 1))
    for t in steps:
        seps = stated_order_separation(model, t)
        print(f"| {t} | " + " | ".join(f"{s:+.2f}" for s in seps) + f" | {sum(seps) / len(seps):+.2f} |")
    print(f"\ntotal {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
