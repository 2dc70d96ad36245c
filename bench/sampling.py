"""Sampler study: caption accuracy, FID and speed of the samplers across steps and guidance.

For a model trained on the embedded shapes dataset: n val captions (the same seeded choice
and per-image noise as `python -m tti.export`), sampled with each setting of the grid, then
judged by the exact caption judge (all-correct, per fact, seen vs held-out compositions),
optionally scored by FID against the same n ground-truth val images, and timed.
Steps = UNet evaluations per image (guidance runs its two captions in one batched pass):
T for DDPM, one per step for DDIM and DPM-Solver++(2M) (dpmpp2m).

Run from the repository root:
    python -m bench.sampling --checkpoint results/shapes32_diffusion/0 --n 200         # subset
    python -m bench.sampling --checkpoint results/shapes32_diffusion/0 --n 200 --full  # all
    python -m bench.sampling --checkpoint RUN --n 200 --fid --device cuda --out sampling.md

Default grid, 28k UNet evaluations at n=200 (0.72 GFLOP each for the shapes32 UNet, so about
10 minutes at ~35 GFLOP/s; a short probe prints the expected time before anything runs):
DDIM 10 steps at guidance 1/2/3/5, DDIM 25 at guidance 2, and DDPM (all T steps) at guidance 2
on only --ddpm-n images (default 2: its speed, not its accuracy). --full: DDPM and DDIM
10/25/50/100, each at guidance 1/2/3/5, DDPM on all n images (hours on a CPU; use a GPU).
--settings picks rows instead, e.g. `--settings ddpm:all:2 dpmpp2m:20:2 ddim:50:2:1`
(sampler:steps:guidance, and for DDIM and dpmpp2m an optional :eta, 0 = deterministic);
every later row is then also compared with the first on the same captions and noise: the
all-correct difference with a 95% paired-bootstrap interval, a column of the table (this is
how "DPM-Solver++(2M) 20 is within 2 points of DDPM" is checked; docs/sampling.md).
--guidance-sweep: one sampler (--sweep-sampler, default the checkpoint's sample: config) at
guidance 1/1.5/2/3/5/7, with FID, and a PNG of FID and caption accuracy against guidance
(--plot). With --out, each row's images are kept in <out>.rows/ as it finishes, and the same
command run again reuses the rows it already has (a long CPU study survives an interruption;
a reused row keeps the img/s it was measured at).
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

from tti.config.registry import all_samplers, samplers
from tti.eval.items import choose_items, generate_items
from tti.data.shapes_folder import is_shapes_dataset
from tti.infra.precision import PRECISIONS
from tti.models.text_to_image import load_for_inference
from tti.infra.cli import run_cli

GUIDANCES = (1.0, 2.0, 3.0, 5.0)
FULL_STEPS = (10, 25, 50, 100)
SWEEP_GUIDANCES = (1.0, 1.5, 2.0, 3.0, 5.0, 7.0)
DISPLAY_NAMES = {**all_samplers(), "gt": "ground truth"}


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
    """"ddim:50:2" / "dpmpp2m:20:2:0.5" / "ddpm:all:2" -> a grid row (DDPM always runs all T
    steps; the optional fourth field is eta, 0 by default, for DDIM and dpmpp2m)."""
    try:
        sampler, steps, guidance, *rest = text.split(":")
        if sampler not in all_samplers() or len(rest) > 1 or (rest and sampler == "ddpm"):
            raise ValueError
        eta = float(rest[0]) if rest else 0.0
        if eta < 0:
            raise ValueError
        row = dict(sampler=sampler, steps=None if sampler == "ddpm" else int(steps),
                   guidance=float(guidance), n=n, eta=eta)
    except ValueError:
        raise SystemExit(f"--settings: {text!r} is not sampler:steps:guidance[:eta] with a sampler "
                         f"of {tuple(all_samplers())}, e.g. ddim:50:2, dpmpp2m:20:2:0.5 or ddpm:all:2") from None
    return row


def sweep_rows(sampler: str | None, sample_cfg, n: int) -> list[dict]:
    """The guidance sweep: `sampler` ("dpmpp2m:20" or "ddim:50:1" = sampler:steps[:eta], None =
    the checkpoint's sample config) at each of SWEEP_GUIDANCES."""
    if sampler is None:
        steps = "all" if sample_cfg.sampler == "ddpm" else sample_cfg.steps
        eta = "" if sample_cfg.sampler == "ddpm" else f":{sample_cfg.eta:g}"
        sampler = f"{sample_cfg.sampler}:{steps}{eta}"
    name, steps, *eta = sampler.split(":")
    try:
        return [parse_setting(":".join([name, steps, str(g)] + eta), n) for g in SWEEP_GUIDANCES]
    except SystemExit:
        raise SystemExit(f"--sweep-sampler: {sampler!r} is not sampler:steps[:eta], e.g. "
                         "dpmpp2m:20 or ddim:50:1") from None


def paired_difference(a: list[bool], b: list[bool], seed: int = 0, draws: int = 10000):
    """Mean of b - a over the same items, and its 95% bootstrap interval (resampling items)."""
    diff = torch.tensor(b, dtype=torch.float64) - torch.tensor(a, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(diff), (draws, len(diff)), generator=g)
    means = diff[idx].mean(1)
    return diff.mean().item(), means.quantile(0.025).item(), means.quantile(0.975).item()


def unet_evaluations(row: dict, timesteps: int) -> int:
    steps = timesteps if row["sampler"] == "ddpm" else row["steps"]
    if row["sampler"] == "heun":  # two passes a step, one on the step onto the clean image
        steps = 2 * steps - 1
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


def sample_or_reuse(model, items, row: dict, args, rows_dir: str | None, identity: dict):
    """sample_row, or the images and seconds an earlier run of the same study kept in rows_dir
    (None: keep nothing). identity: what else must match (checkpoint, seed, device, ...)."""
    key = f"{row['sampler']}-{row['steps']}-g{row['guidance']:g}-eta{row.get('eta', 0.0):g}-n{row['n']}"
    path = os.path.join(rows_dir, key + ".pt") if rows_dir else None
    if path and os.path.exists(path):
        kept = torch.load(path, weights_only=True)  # data only: tensors, numbers, strings
        if kept["identity"] == identity:
            print(f"  {key}: reusing the images sampled earlier ({path})")
            return kept["images"], kept["seconds"]
    images, seconds = sample_row(model, items, row, args.seed, args.batch_size)
    if path:
        os.makedirs(rows_dir, exist_ok=True)
        torch.save({"identity": identity, "images": images, "seconds": seconds}, path + ".tmp")
        os.replace(path + ".tmp", path)
    return images, seconds


def fid_against(reference_stats, images: torch.Tensor, device: str) -> float:
    from tti.eval.metrics.fid import frechet_distance, inception_features, stats

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


def versus_first(first: dict, r: dict) -> str:
    """The table cell: r's all-correct minus the first sampled row's, in points, [95% CI]."""
    if r is first:
        return "reference"
    m = min(len(first["correct"]), len(r["correct"]))
    mean, lo, hi = paired_difference(first["correct"][:m], r["correct"][:m])
    return f"{100 * mean:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"


def table(rows: list[dict], with_fid: bool, paired: bool = False) -> str:
    """Markdown table of the result rows (the first may be the ground truth). paired: a column
    with each sampled row's all-correct difference from the first sampled row (95% CI)."""
    header = ["Sampler", "Steps", "Guidance", "n", "All correct", "Colour", "Shape", "Size",
              "Relation", "Seen", "Held-out", "FID", "img/s"]
    sampled = [r for r in rows if r.get("correct")]
    paired = paired and len(sampled) > 1
    if paired:
        header.insert(-2, "vs row 1, points [95% CI]")
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for r in rows:
        acc = r.get("accuracy") or {}
        eta = f" (eta {r['eta']:g})" if r.get("eta") else ""
        cells = [DISPLAY_NAMES[r["sampler"]] + eta,
                 str(r["steps"]) if r["steps"] is not None else "-",
                 "-" if r["guidance"] is None else f"{r['guidance']:g}", str(r["n"]),
                 fmt(acc.get("all")), fmt(acc.get("colour")), fmt(acc.get("shape")),
                 fmt(acc.get("size")), fmt(acc.get("relation")),
                 fmt((acc.get("seen") or {}).get("all")), fmt((acc.get("held_out") or {}).get("all")),
                 fmt(r.get("fid"), 2) if with_fid else "off",
                 fmt(r.get("images_per_s"), 2) if "images_per_s" in r else "-"]
        if paired:
            cells.insert(-2, versus_first(sampled[0], r) if r.get("correct") else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_guidance(rows: list[dict], path: str, title: str) -> None:
    """PNG: FID (left) and caption accuracy (right; all correct, seen, held-out) against guidance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = [r["guidance"] for r in rows]
    judged = rows[0]["accuracy"] is not None  # no judge outside the shapes dataset
    fig, axes = plt.subplots(1, 2 if judged else 1, figsize=(9 if judged else 4.5, 3.6), squeeze=False)
    left = axes[0, 0]
    left.plot(g, [r.get("fid") for r in rows], "o-", color="black")
    left.set(xlabel="guidance scale", ylabel="FID (lower is better)", title="FID")
    if judged:
        right = axes[0, 1]
        for label, pick in (("all correct", lambda a: a["all"]), ("seen", lambda a: a["seen"]["all"]),
                            ("held-out", lambda a: a["held_out"]["all"])):
            right.plot(g, [pick(r["accuracy"]) for r in rows], "o-", label=label)
        right.set(xlabel="guidance scale", ylabel="fraction of images", title="caption accuracy",
                  ylim=(0, 1))
        right.legend()
    for ax in axes[0]:
        ax.set_xticks(g)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint file or run directory")
    p.add_argument("--n", type=int, default=200, help="val captions per setting")
    p.add_argument("--full", action="store_true", help="the whole grid (hours on a CPU)")
    p.add_argument("--ddpm-n", type=int, default=None,
                   help="images for the DDPM rows (default 2, or n with --full)")
    p.add_argument("--settings", nargs="+", default=None, metavar="SAMPLER:STEPS:GUIDANCE",
                   help="run these rows instead of the grid, compared pairwise with the first")
    p.add_argument("--guidance-sweep", action="store_true",
                   help=f"one sampler at guidance {'/'.join(f'{g:g}' for g in SWEEP_GUIDANCES)}, "
                        "with FID, and a PNG of the curves (--plot)")
    p.add_argument("--sweep-sampler", default=None, metavar="SAMPLER:STEPS[:ETA]",
                   help="the sampler of --guidance-sweep (default: the checkpoint's sample config)")
    p.add_argument("--plot", default=None,
                   help="--guidance-sweep's PNG (default: next to --out, else guidance_curve.png)")
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
    if args.guidance_sweep and (args.settings or args.full):
        p.error("--guidance-sweep makes its own rows: leave out --settings and --full")
    args.fid = args.fid or args.guidance_sweep
    return args


def load_study(args):
    """The model, its config, the val split, the n chosen items and whether the data is shapes."""
    from tti.data.coco import load_split

    model, cfg = load_for_inference(args.checkpoint, args.device, precision=args.precision)
    if cfg.model.kind != "diffusion":
        raise SystemExit("bench.sampling compares diffusion samplers; this checkpoint is "
                         f"{cfg.model.kind}")
    root = args.data_root or cfg.data.root
    val = load_split(root, cfg.data.val_split, cfg.data.image_size, cache_dir=cfg.data.cache_dir,
                     seed=args.seed)
    items = choose_items(val, args.n, args.seed)
    shapes = is_shapes_dataset(root)
    if not shapes:
        print(f"{root} is not the embedded shapes dataset: no caption accuracy, only speed/FID")
    return model, cfg, val, items, shapes


def sample_all(model, items, rows: list[dict], args, timesteps: int) -> list[tuple[dict, torch.Tensor]]:
    """(result row with timing, uint8 images) per row, in the rows' order, after printing the
    expected duration."""
    # A short probe (2 guided steps of the first sampler that takes a step count; DDPM rows
    # mean a Gaussian model, so DDIM for them) turns UNet evaluations into an expected duration.
    probe = items[:min(len(items), args.batch_size)]
    sampler = next((r["sampler"] for r in rows if r["sampler"] != "ddpm"), "ddim")
    start = time.perf_counter()
    generate_items(model, probe, args.seed, sampler=sampler, steps=2, guidance=2.0)
    probe_row = dict(sampler=sampler, steps=2, guidance=2.0, n=len(probe))
    per_eval = (time.perf_counter() - start) / unet_evaluations(probe_row, timesteps)
    total = sum(unet_evaluations(r, timesteps) for r in rows)
    print(f"{len(rows)} settings, {total} UNet evaluations, about {total * per_eval / 60:.1f} min "
          f"of sampling on {args.device}" + ("" if args.fid else "; FID off (--fid to add it)"))
    rows_dir = os.path.splitext(args.out)[0] + ".rows" if args.out else None
    weights = sum(p.detach().double().sum().item() for p in model.image_model.parameters())
    identity = dict(weights=weights, items=[it.caption for it in items], seed=args.seed,
                    device=args.device, batch_size=args.batch_size, precision=str(model.sample_dtype))
    sampled = [None] * len(rows)
    # Cheapest first, so the short rows of a long study are done (and kept) early.
    for i in sorted(range(len(rows)), key=lambda i: unet_evaluations(rows[i], timesteps)):
        row = rows[i]
        images, seconds = sample_or_reuse(model, items, row, args, rows_dir, identity)
        result = dict(row, steps=timesteps if row["sampler"] == "ddpm" else row["steps"],
                      seconds=round(seconds, 2), images_per_s=len(images) / seconds)
        sampled[i] = (result, images)
        print(f"  {row['sampler']} steps={result['steps']} g={row['guidance']:g} n={len(images)}: "
              f"{result['images_per_s']:.2f} img/s", flush=True)
    return sampled


def score(sampled, val, items, shapes: bool, args) -> list[dict]:
    """The ground-truth row, then each sampled row judged (and with FID if asked)."""
    from tti.eval.metrics.judge import judge_batch, judge_image, summarize_verdicts

    gt_images = torch.stack([val[it.row][0] for it in items])
    captions = [it.caption for it in items]
    results = [{"sampler": "gt", "steps": None, "guidance": None, "n": len(items),
                "accuracy": judge_batch(gt_images, captions) if shapes else None}]
    reference = None
    if args.fid:
        from tti.eval.metrics.fid import inception_features, stats
        reference = stats(inception_features(gt_images, device=args.device, progress=False))
    for result, images in sampled:
        result["accuracy"] = None
        if shapes:  # judged once: the summary and the per-image verdicts for the comparisons
            verdicts = [judge_image(img, c) for img, c in zip(images, captions)]
            result["accuracy"] = summarize_verdicts(verdicts, captions[:len(images)])
            result["correct"] = [v["all"] for v in verdicts]
        if args.fid and len(images) == len(items):  # FID only against as many gt images
            result["fid"] = fid_against(reference, images, args.device)
        results.append(result)
    return results


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    against = None
    if args.against:
        with open(args.against) as f:
            against = [r for r in json.load(f) if r.get("correct")]
        if not against:
            raise SystemExit(f"--against {args.against}: no rows with per-caption verdicts")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, cfg, val, items, shapes = load_study(args)
    n = len(items)
    if against and any(len(r["correct"]) != n for r in against):
        raise SystemExit(f"--against {args.against}: its rows are over "
                         f"{len(against[0]['correct'])} captions, this study over {n}")
    if args.guidance_sweep:
        rows = sweep_rows(args.sweep_sampler, cfg.sample, n)
    elif args.settings:
        rows = [parse_setting(t, n) for t in args.settings]
    else:
        rows = grid(args.full, n, args.ddpm_n)
    other = sorted({r["sampler"] for r in rows} - set(samplers(cfg)))
    if other:
        raise SystemExit(f"{args.checkpoint}: its objective ({cfg.model.objective}) samples with "
                         f"{', '.join(samplers(cfg))}, not {', '.join(other)}")
    timesteps = cfg.model.gaussian.timesteps if cfg.model.objective == "gaussian" else None
    # Sample and time every row first: the judge and FID (scipy's BLAS threads) run after,
    # so they never compete with the timed sampling.
    results = score(sample_all(model, items, rows, args, timesteps), val, items, shapes, args)

    cpu = platform.processor() or platform.machine()
    device_name = (torch.cuda.get_device_name() if args.device.startswith("cuda")
                   else f"CPU, {torch.get_num_threads()} threads ({cpu})")
    paired = shapes and (args.settings or args.guidance_sweep)
    time_axis = f"T={timesteps}" if timesteps else "continuous t"
    text = (f"Sampler study: {args.checkpoint} ({cfg.run.dataset}, {time_axis}, "
            f"{sum(p.numel() for p in model.image_model.parameters()) / 1e6:.1f}M parameters), "
            f"{device_name}, batch {args.batch_size}, seed {args.seed}. "
            f"Steps = UNet evaluations per image (guidance batched). All correct = the judge "
            f"finds colour, shape, size, relation right and no extra object; img/s = sampling "
            f"only.\n\n" + table(results, args.fid, paired=bool(paired)))
    if (paired and len(rows) > 1) or (shapes and against):
        text += "\n\n" + comparisons(results[1:], against, os.path.basename(args.against or ""))
    print("\n" + text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")
        with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
            json.dump(results, f, indent=1, default=float)
    if args.guidance_sweep:
        plot = args.plot or (os.path.splitext(args.out)[0] + ".png" if args.out else "guidance_curve.png")
        r = results[1]
        plot_guidance(results[1:], plot, f"{DISPLAY_NAMES[r['sampler']]}, {r['steps']} steps, "
                                          f"n = {n}, {args.checkpoint}")
        print(f"wrote {plot}")
    return results


if __name__ == "__main__":
    run_cli(main)  # a damaged or unsafe checkpoint: one line, no traceback
