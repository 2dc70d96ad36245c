"""Quality per unit of training compute: a recipe trained for the shipped quickstart's training
FLOPs, exported (300 val captions) and scored (judge + FID), one line per run.

The budget is configs/shapes32.yaml's: train.steps x train.batch_size images at its training
FLOPs per image, both counted by tti.training.utilisation on one micro-batch of the first
training items (the image model's forward and backward; the frozen encoder's states come
from the text store, as in training). A recipe that costs more per image trains fewer
steps: steps = budget / (batch x its FLOPs per image), rounded.

    python -m bench.quality_per_compute --recipe flow_unet --seed 1      # one run
    python -m bench.quality_per_compute --table                          # every run so far
    python -m bench.quality_per_compute --time vp_unet flow_transformer  # fp32 img/s, alternating

Each run lives in results/shapes32_diffusion/<run_idx> (a killed run resumes), exports to
eval_data_run_<run_idx> and appends its record to bench/results/quality_per_compute.jsonl.
Extra `--set key=value` items go to every command (e.g. train.precision=fp32).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/shapes32.yaml"
RECORDS = os.path.join(REPO, "bench", "results", "quality_per_compute.jsonl")
TRANSFORMER = ["model.backbone=transformer", "model.transformer.width=96",
               "model.transformer.depth=6", "model.transformer.text_layers=2"]
CANONICAL = ["data.canonical_caption_fraction=0.5", "model.unet.coord_channels=true",
             "model.unet.position_init=sinusoidal"]
# The objectives as the study ran them. configs/shapes32.yaml was the Gaussian one (cosine, 1,000
# steps, v, shift 2) and is now FLOW2; each recipe names its objective in full, so that every
# recipe stays the run it was whatever the shipped config becomes.
GAUSSIAN = ["model.objective=gaussian", "model.gaussian.schedule=cosine",
            "model.gaussian.timesteps=1000", "model.gaussian.prediction=v", "model.gaussian.shift=2.0"]
FLOW = ["model.objective=flow", "model.flow.time_sampling=logit_normal", "model.flow.logit_mean=0.0",
        "model.flow.logit_scale=1.0", "model.flow.shift=1.0"]
# The Gaussian recipe's shift 2 (log-SNR - 2 log 2) is SD3's time shift s = 2 here.
FLOW2 = FLOW + ["model.flow.shift=2.0"]
# name -> the --set items that make the recipe from configs/shapes32.yaml. The run index is
# 100 + 10 x the recipe's position + the seed, so every (recipe, seed) has its own folder.
RECIPES = {
    "vp_unet": GAUSSIAN,
    "vp_minsnr_unet": GAUSSIAN + ["model.gaussian.min_snr_gamma=5.0"],
    "flow_unet": FLOW,
    "dit_cross": TRANSFORMER + GAUSSIAN,
    "dit_joint": TRANSFORMER + GAUSSIAN + ["model.transformer.text=joint"],
    "dit_skips": TRANSFORMER + GAUSSIAN + ["model.transformer.skips=true"],
    "vp_minsnr_transformer": TRANSFORMER + GAUSSIAN + ["model.gaussian.min_snr_gamma=5.0"],
    "flow_transformer": TRANSFORMER + FLOW,
    "flow_shift2_unet": FLOW2,
    # configs/shapes32_long.yaml's relation curriculum (half the training captions in canonical
    # word order) and pixel positions (coordinate channels, sinusoidal codes), at this budget.
    "flow_shift2_canonical_unet": FLOW2 + CANONICAL,
    "vp_canonical_unet": GAUSSIAN + CANONICAL,
}
FACTS = ("all", "colour", "shape", "size", "relation")


def flops_per_image(sets: list[str]) -> tuple[float, int, int]:
    """(training FLOPs per image, train.steps, train.batch_size) of the config with `sets`."""
    import torch

    import tti.models  # noqa: F401
    from tti.config.load import load_config
    from tti.data.coco import collate, load_split
    from tti.data.shapes import write_coco
    from tti.models.text_to_image import build, to_model_range
    from tti.training.utilisation import train_flops_per_image

    cfg = load_config(CONFIG, sets)
    d = cfg.data
    write_coco(d.root, n_train=d.shapes_train, n_val=d.shapes_val, image_size=d.image_size, seed=0)
    train_set = load_split(d.root, d.train_split, d.image_size, seed=cfg.train.seed)
    images, captions = collate([train_set[i] for i in range(cfg.micro_batch(1))])
    model = build(cfg, train_captions=[])
    with torch.no_grad():
        text = model.encode(captions)  # training reads the frozen encoder's states from its store
    with torch.random.fork_rng():
        flops = train_flops_per_image(lambda: model.image_model.loss(to_model_range(images), text),
                                      len(captions))
    return flops, cfg.train.steps, cfg.train.batch_size


def run(name: str, seed: int, extra: list[str]) -> dict:
    """Train, export and score one (recipe, seed) at the budget; its record."""
    seeded = [f"train.seed={seed}"]  # the seed picks the captions the count runs on
    sets = RECIPES[name] + extra + seeded
    budget_flops, budget_steps, batch = flops_per_image(extra + seeded)
    flops = flops_per_image(sets)[0]
    steps = round(budget_steps * budget_flops / flops)
    idx = 100 + 10 * list(RECIPES).index(name) + seed
    run_dir, out = f"results/shapes32_diffusion/{idx}", f"eval_data_run_{idx}"
    train_sets = sets + [f"run.run_idx={idx}", f"train.steps={steps}",
                         f"train.sample_every={steps}", "train.sample_at_end=false"]
    argv = ["--config", CONFIG] + [a for s in train_sets for a in ("--set", s)]
    start = time.time()
    subprocess.run([sys.executable, "-m", "tti.train", *argv], cwd=REPO, check=True)
    trained = time.time() - start
    subprocess.run([sys.executable, "-m", "tti.export", "--checkpoint", run_dir, "--n", "300",
                    "--out-dir", out, "--precision", "auto"], cwd=REPO, check=True)
    subprocess.run([sys.executable, "-m", "tti.evaluate", out, "--metrics", "judge,fid"],
                   cwd=REPO, check=True)
    with open(os.path.join(REPO, out, "metrics.json"), encoding="utf-8") as f:
        metrics = json.load(f)
    acc = metrics["caption_accuracy_tti"]
    record = {"recipe": name, "seed": seed, "sets": sets, "run_idx": idx, "steps": steps,
              "batch": batch, "gflop_per_image": round(flops / 1e9, 4),
              "budget_gflop_per_image": round(budget_flops / 1e9, 4),
              "train_pflop": round(steps * batch * flops / 1e15, 3),
              "train_seconds_incl_startup": round(trained), "fid": metrics.get("fid"),
              **{f: acc[f] for f in FACTS}, "seen": acc["seen"]["all"],
              "held_out": acc["held_out"]["all"], "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    with open(RECORDS, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    return record


def time_recipes(names: list[str], steps: int = 20, warmup: int = 3) -> str:
    """fp32 training img/s of each recipe (forward, backward, AdamW at batch 32 on the shapes
    captions, this process's threads), their steps interleaved so a slow phase of a shared
    machine hits all of them; medians and the ratio to the first recipe."""
    import torch

    import tti.models  # noqa: F401
    from tti.config.load import load_config
    from tti.data.coco import collate, load_split
    from tti.models.text_to_image import build, to_model_range

    models, times = {}, {name: [] for name in names}
    for name in names:
        cfg = load_config(CONFIG, RECIPES[name] + ["train.precision=fp32"])
        data = load_split(cfg.data.root, cfg.data.train_split, cfg.data.image_size)
        images, captions = collate([data[i] for i in range(cfg.train.batch_size)])
        model = build(cfg, train_captions=[])
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
        models[name] = (model, optimizer, to_model_range(images), captions)
    for i in range(warmup + steps):
        for name, (model, optimizer, images, captions) in models.items():
            start = time.perf_counter()
            model(images, captions).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    batch = len(next(iter(models.values()))[3])
    rates = {name: batch / statistics.median(ts) for name, ts in times.items()}
    lines = [f"fp32, batch {batch}, {torch.get_num_threads()} threads, median of {steps} steps "
             f"each, interleaved", "| recipe | img/s | vs " + names[0] + " |", "|---|---|---|"]
    lines += [f"| {n} | {r:.1f} | {r / rates[names[0]]:.2f}x |" for n, r in rates.items()]
    return "\n".join(lines)


def table(view: str = "all", path: str = RECORDS) -> str:
    """Markdown: one row per recipe, means over its seeds with the range (min-max). `view`:
    all runs; "screen", seed 1 only; "seeds", the recipes run on three seeds or more."""
    with open(path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    by_recipe: dict[str, list] = {}
    for r in records:
        if view != "screen" or r["seed"] == 1:
            by_recipe.setdefault(r["recipe"], []).append(r)
    if view == "seeds":
        by_recipe = {name: rs for name, rs in by_recipe.items() if len(rs) >= 3}
    cols = ["all", "seen", "held_out", "colour", "shape", "size", "relation", "fid"]
    lines = ["| recipe | seeds | GFLOP/img | steps x 32 | " + " | ".join(cols) + " |",
             "|" + "---|" * (4 + len(cols))]
    for name, rs in by_recipe.items():
        cells = []
        for c in cols:
            values = [r[c] for r in rs if r.get(c) is not None]
            mean = statistics.mean(values) if values else float("nan")
            digits = 1 if c == "fid" else 3
            spread = f" ({min(values):.{digits}f}-{max(values):.{digits}f})" if len(values) > 1 else ""
            cells.append(f"{mean:.{digits}f}{spread}")
        seeds = ",".join(str(r["seed"]) for r in rs)
        lines.append(f"| {name} | {seeds} | {rs[0]['gflop_per_image']:.3f} | {rs[0]['steps']} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", choices=RECIPES)
    p.add_argument("--seed", type=int, nargs="+", default=[1])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--table", nargs="?", const="all", choices=("all", "screen", "seeds"),
                   help="print the table of the runs so far: all, seed 1 only, or the recipes "
                        "with three seeds or more")
    p.add_argument("--time", nargs="+", choices=RECIPES, metavar="RECIPE",
                   help="time these recipes' fp32 training steps against each other")
    args = p.parse_args(argv)
    if args.time:
        print(time_recipes(args.time))
    if args.recipe:
        for seed in args.seed:
            print(json.dumps(run(args.recipe, seed, args.set)))
    if args.table:
        print(table(args.table))


if __name__ == "__main__":
    main()
