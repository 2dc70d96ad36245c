"""Sampler study: caption accuracy, FID and speed of DDPM and DDIM across steps and guidance.

For a model trained on the embedded shapes dataset: n val captions (the same seeded choice
and per-image noise as `python -m tti.export`), sampled with each setting of the grid, then
judged by the exact caption judge (all-correct, per fact, seen vs held-out compositions),
optionally scored by FID against the same n ground-truth val images, and timed.

Run from the repository root:
    python -m bench.sampling --checkpoint results/shapes32_diffusion/0 --n 200         # subset
    python -m bench.sampling --checkpoint results/shapes32_diffusion/0 --n 200 --full  # all
    python -m bench.sampling --checkpoint RUN --n 200 --fid --device cuda --out sampling.md

Default grid, 28k UNet evaluations at n=200 (0.72 GFLOP each for the shapes32 UNet, so about
10 minutes at ~35 GFLOP/s; a short probe prints the expected time before anything runs):
DDIM 10 steps at guidance 1/2/3/5, DDIM 25 at guidance 2, and DDPM (all T steps) at guidance 2
on only --ddpm-n images (default 2: its speed, not its accuracy). --full: DDPM and DDIM
10/25/50/100, each at guidance 1/2/3/5, DDPM on all n images (hours on a CPU; use a GPU).
--settings picks rows instead, e.g. `--settings ddim:50:2 ddpm:all:2` (sampler:steps:guidance,
and for DDIM an optional :eta, 0 = deterministic);
every later row is then also compared with the first on the same captions and noise: the
all-correct difference with a 95% paired-bootstrap interval (this is how "DDIM 50 is within
2 points of DDPM" is checked).
FID is off unless --fid: on CPU the Inception runs at ~3-6 img/s (about a minute per row at
n=200, plus ~40 s of sqrtm per row). With n far below 2048 FID is strongly biased upwards:
compare rows with each other, never with published numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from tti.export import choose_items, generate_items
from tti.in_loop import is_shapes_dataset
from tti.model import PRECISIONS, load_for_inference

GUIDANCES = (1.0, 2.0, 3.0, 5.0)
FULL_STEPS = (10, 25, 50, 100)


def grid(full: bool, n: int, ddpm_n: int | None) -> list[dict]:
    """Rows to run: dicts with sampler, steps (None for DDPM = all T), guidance, n."""
    if full:
        rows = [dict(sampler="ddpm", steps=None, guidance=g, n=ddpm_n or n) for g in GUIDANCES]
        rows += [dict(sampler="ddim", steps=s, guidance=g, n=n) for s in FULL_STEPS for g in GUIDANCES]
        return rows
    rows = [dict(sampler="ddim", steps=10, guidance=g, n=n) for g in GUIDANCES]
    rows.append(dict(sampler="ddim", steps=25, guidance=2.0, n=n))
    rows.append(dict(sampler="ddpm", steps=None, guidance=2.0, n=min(n, ddpm_n or 2)))
    return rows


def parse_setting(text: str, n: int) -> dict:
    """"ddim:50:2" / "ddim:50:2:0.5" / "ddpm:all:2" -> a grid row (DDPM always runs all T
    steps; the optional fourth field is DDIM's eta, 0 by default)."""
    try:
        sampler, steps, guidance, *rest = text.split(":")
        if sampler not in ("ddim", "ddpm") or len(rest) > 1 or (rest and sampler == "ddpm"):
            raise ValueError
        eta = float(rest[0]) if rest else 0.0
        if eta < 0:
            raise ValueError
        row = dict(sampler=sampler, steps=None if sampler == "ddpm" else int(steps),
                   guidance=float(guidance), n=n, eta=eta)
    except ValueError:
        raise SystemExit(f"--settings: {text!r} is not sampler:steps:guidance[:eta], e.g. "
                         "ddim:50:2, ddim:50:2:0.5 or ddpm:all:2") from None
    return row


def paired_difference(a: list[bool], b: list[bool], seed: int = 0, draws: int = 10000):
    """Mean of b - a over the same items, and its 95% bootstrap interval (resampling items)."""
    diff = torch.tensor(b, dtype=torch.float64) - torch.tensor(a, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(diff), (draws, len(diff)), generator=g)
    means = diff[idx].mean(1)
    return diff.mean().item(), means.quantile(0.025).item(), means.quantile(0.975).item()


def unet_evaluations(row: dict, timesteps: int) -> int:
    steps = timesteps if row["sampler"] == "ddpm" else row["steps"]
    return row["n"] * steps * (1 if row["guidance"] == 1.0 else 2)


def sample_row(model, items, row: dict, seed: int, batch_size: int) -> tuple[torch.Tensor, float]:
    """uint8 [n, 3, S, S] for the row's first n items, and the sampling wall time in seconds."""
    opts = dict(sampler=row["sampler"], guidance=row["guidance"], eta=row.get("eta", 0.0))
    if row["steps"] is not None:
        opts["steps"] = row["steps"]
    chosen = items[:row["n"]]
    out, start = [], time.perf_counter()
    for b in range(0, len(chosen), batch_size):
        out.append(generate_items(model, chosen[b:b + batch_size], seed, **opts))
    return torch.cat(out), time.perf_counter() - start


def fid_against(reference_stats, images: torch.Tensor, device: str) -> float:
    from tti.metrics.fid import frechet_distance, inception_features, stats

    mu, sigma = stats(inception_features(images, device=device, progress=False))
    return frechet_distance(*reference_stats, mu, sigma)


def row_name(r: dict) -> str:
    eta = f" eta={r['eta']:g}" if r.get("eta") else ""
    return f"{r['sampler'].upper()} {r['steps']} g={r['guidance']:g}{eta}"


def comparisons(rows: list[dict], against: list[dict] | None = None, source: str = "") -> str:
    """Each later row against the first, on the items both sampled: all-correct difference
    and speed ratio. With `against` (the rows of an earlier study's .json that have per-caption
    verdicts, same checkpoint, seed and captions), every row is also compared with each of
    those rows; the speed ratio is left out there, since the two runs' machines and loads
    may differ."""
    lines = []
    pairs = [(row_name(rows[0]), rows[0], r, True) for r in rows[1:]]
    pairs += [(f"{row_name(old)} of {source}", old, r, False) for old in against or [] for r in rows]
    for base_name, base, r, same_run in pairs:
        m = min(len(base["correct"]), len(r["correct"]))
        mean, lo, hi = paired_difference(base["correct"][:m], r["correct"][:m])
        speed = (f", {r['images_per_s'] / base['images_per_s']:.2f}x the speed" if same_run else "")
        lines.append(f"{row_name(r)} vs {base_name} on the same {m} "
                     f"captions: all-correct {100 * mean:+.1f} points (95% paired bootstrap "
                     f"[{100 * lo:+.1f}, {100 * hi:+.1f}]){speed}")
    return "\n".join(lines)


def fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def table(rows: list[dict], with_fid: bool) -> str:
    header = ["Sampler", "Steps", "Guidance", "n", "All correct", "Colour", "Shape", "Size",
              "Relation", "Seen", "Held-out", "FID", "img/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for r in rows:
        acc = r.get("accuracy") or {}
        eta = f" (eta {r['eta']:g})" if r.get("eta") else ""
        cells = [r["sampler"].upper() + eta if r["sampler"] != "gt" else "ground truth",
                 str(r["steps"]) if r["steps"] is not None else "-",
                 "-" if r["guidance"] is None else f"{r['guidance']:g}", str(r["n"]),
                 fmt(acc.get("all")), fmt(acc.get("colour")), fmt(acc.get("shape")),
                 fmt(acc.get("size")), fmt(acc.get("relation")),
                 fmt((acc.get("seen") or {}).get("all")), fmt((acc.get("held_out") or {}).get("all")),
                 fmt(r.get("fid"), 2) if with_fid else "off",
                 fmt(r.get("images_per_s"), 2) if "images_per_s" in r else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint file or run directory")
    p.add_argument("--n", type=int, default=200, help="val captions per setting")
    p.add_argument("--full", action="store_true", help="the whole grid (hours on a CPU)")
    p.add_argument("--ddpm-n", type=int, default=None,
                   help="images for the DDPM rows (default 2, or n with --full)")
    p.add_argument("--settings", nargs="+", default=None, metavar="SAMPLER:STEPS:GUIDANCE",
                   help="run these rows instead of the grid, compared pairwise with the first")
    p.add_argument("--fid", action="store_true", help="also FID against the n gt images (slow on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--data-root", default=None, help="default: data.root of the checkpoint's config")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="autocast dtype for the network (auto: bf16 on CUDA and bf16-capable CPUs)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (1 is fastest on a busy shared machine)")
    p.add_argument("--out", default=None, help="also write the table here (and a .json next to it)")
    p.add_argument("--against", default=None, metavar="STUDY.json",
                   help="also compare every row, caption by caption, with the rows of an earlier "
                        "study's .json (same checkpoint, --n and --seed), e.g. a slow DDPM row "
                        "run once")
    args = p.parse_args(argv)
    against = None
    if args.against:
        with open(args.against) as f:
            against = [r for r in json.load(f) if r.get("correct")]
        if not against:
            raise SystemExit(f"--against {args.against}: no rows with per-caption verdicts")
    from tti.data.coco import load_split
    from tti.metrics.judge import judge_batch, judge_image, summarize_verdicts

    if args.threads:
        torch.set_num_threads(args.threads)
    model, cfg = load_for_inference(args.checkpoint, args.device, precision=args.precision)
    if cfg.model.kind != "diffusion":
        raise SystemExit("bench.sampling compares diffusion samplers; this checkpoint is "
                         f"{cfg.model.kind}")
    root = args.data_root or cfg.data.root
    val = load_split(root, cfg.data.val_split, cfg.data.image_size, cache_dir=cfg.data.cache_dir,
                     seed=args.seed)
    items = choose_items(val, args.n, args.seed)
    n = len(items)
    if against and any(len(r["correct"]) != n for r in against):
        raise SystemExit(f"--against {args.against}: its rows are over "
                         f"{len(against[0]['correct'])} captions, this study over {n}")
    shapes = is_shapes_dataset(root)
    if not shapes:
        print(f"{root} is not the embedded shapes dataset: no caption accuracy, only speed/FID")
    timesteps = cfg.model.diffusion.timesteps
    rows = ([parse_setting(t, n) for t in args.settings] if args.settings
            else grid(args.full, n, args.ddpm_n))

    # A short probe (2 DDIM steps, guided) turns UNet evaluations into an expected duration.
    probe = items[:min(n, args.batch_size)]
    start = time.perf_counter()
    generate_items(model, probe, args.seed, sampler="ddim", steps=2, guidance=2.0)
    per_eval = (time.perf_counter() - start) / (len(probe) * 4)
    total = sum(unet_evaluations(r, timesteps) for r in rows)
    print(f"{len(rows)} settings, {total} UNet evaluations, about {total * per_eval / 60:.1f} min "
          f"of sampling on {args.device}" + ("" if args.fid else "; FID off (--fid to add it)"))

    # Sample and time every row first: the judge and FID (scipy's BLAS threads) run after,
    # so they never compete with the timed sampling.
    sampled = []
    for row in rows:
        images, seconds = sample_row(model, items, row, args.seed, args.batch_size)
        result = dict(row, steps=timesteps if row["sampler"] == "ddpm" else row["steps"],
                      seconds=round(seconds, 2), images_per_s=len(images) / seconds)
        sampled.append((result, images))
        print(f"  {row['sampler']} steps={result['steps']} g={row['guidance']:g} n={len(images)}: "
              f"{result['images_per_s']:.2f} img/s", flush=True)

    gt_images = torch.stack([val[it.row][0] for it in items])
    captions = [it.caption for it in items]
    results = [{"sampler": "gt", "steps": None, "guidance": None, "n": n,
                "accuracy": judge_batch(gt_images, captions) if shapes else None}]
    reference = None
    if args.fid:
        from tti.metrics.fid import inception_features, stats
        reference = stats(inception_features(gt_images, device=args.device, progress=False))
    for result, images in sampled:
        result["accuracy"] = None
        if shapes:  # judged once: the summary and the per-image verdicts for the comparisons
            verdicts = [judge_image(img, c) for img, c in zip(images, captions)]
            result["accuracy"] = summarize_verdicts(verdicts, captions[:len(images)])
            result["correct"] = [v["all"] for v in verdicts]
        if args.fid and len(images) == n:  # FID only against the same number of gt images
            result["fid"] = fid_against(reference, images, args.device)
        results.append(result)

    cpu = platform.processor() or platform.machine()
    device_name = (torch.cuda.get_device_name() if args.device.startswith("cuda")
                   else f"CPU, {torch.get_num_threads()} threads ({cpu})")
    text = (f"Sampler study: {args.checkpoint} ({cfg.run.dataset}, T={timesteps}, "
            f"{sum(p.numel() for p in model.generator.parameters()) / 1e6:.1f}M parameters), "
            f"{device_name}, batch {args.batch_size}, seed {args.seed}. "
            f"All correct = the judge finds colour, shape, size, relation right and no extra "
            f"object; img/s = sampling only.\n\n" + table(results, args.fid))
    if shapes and ((args.settings and len(sampled) > 1) or against):
        text += "\n\n" + comparisons(results[1:], against, os.path.basename(args.against or ""))
    print("\n" + text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")
        with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
            json.dump(results, f, indent=1, default=float)
    return results


if __name__ == "__main__":
    main()
