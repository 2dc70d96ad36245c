"""What the training loop shows while it runs (rank 0): sample grids from the EMA weights
and, on the embedded shapes dataset, the judge's caption accuracy on val captions."""
from __future__ import annotations

import json
import os

import numpy as np
import torch

from tti.config.registry import samplers
from tti.data.shapes_folder import is_shapes_dataset
from tti.eval.grid import generate, make_grid
from tti.eval.metrics.judge import judge_batch


def shapes_val_captions(val_set, n: int, seed: int = 0) -> list:
    """n val captions (one per image, a fixed random subset) for in-loop judging."""
    order = np.random.default_rng(seed).permutation(len(val_set))[:n]
    return [val_set.captions(int(i))[0] for i in order]


class SampleMonitor:
    def __init__(self, cfg, run_dir: str, val_set, info):
        self.cfg = cfg
        self.samples_dir = os.path.join(run_dir, "samples")
        os.makedirs(self.samples_dir, exist_ok=True)
        self.grid_captions = cfg.sample.captions or [val_set.captions(i)[0]
                                                     for i in range(min(8, len(val_set)))]
        n_eval = cfg.train.eval_samples if is_shapes_dataset(cfg.data.root) else 0
        self.eval_captions = shapes_val_captions(val_set, n_eval) if n_eval else []
        self.history_path = os.path.join(run_dir, "in_loop_accuracy.jsonl")

    @torch.no_grad()
    def run(self, model, ema, step: int, log) -> None:
        opts = model.sampler_options(self.cfg)
        with ema.swapped_into(model):
            model.eval()
            images = generate(model, self.grid_captions, n=8, seed=0, **opts)
            path = os.path.join(self.samples_dir, f"step_{step:07d}.png")
            make_grid(images, 8, self.grid_captions).save(path)
            log.print(f"step {step}: samples {path}")
            if self.eval_captions:
                fast = dict(opts, steps=min(opts.get("steps", 50), 25))
                samples = generate(model, self.eval_captions, n=1, seed=1, **fast)
                acc = judge_batch(samples, self.eval_captions)
                names = samplers(self.cfg)
                how = f"{names[fast['sampler']]} {fast['steps']}" if names else "prior samples"
                flat = log_judge(log, step, acc, "judge",
                                 f"on {len(self.eval_captions)} val captions ({how})")
                with open(self.history_path, "a") as f:
                    f.write(json.dumps({"step": step, **flat}) + "\n")
        model.train()


def log_judge(log, step: int, acc: dict, prefix: str, what: str) -> dict:
    """Log judge_batch's result `acc` as `<prefix>/<fact>` scalars and one line
    `step N: <prefix> <what>: all=..., ...`; returns the flat accuracies."""
    flat = flat_accuracy(acc)
    log.scalars(step, {f"{prefix}/{k}": v for k, v in flat.items()})
    log.print(f"step {step}: {prefix} {what}: " + ", ".join(f"{k}={v:.3f}" for k, v in flat.items()))
    return flat


def flat_accuracy(acc: dict) -> dict:
    """Pick the float accuracies out of judge_batch's result (nested dicts flattened)."""
    out = {}
    for k, v in acc.items():
        if isinstance(v, dict):
            out.update({f"{k}/{kk}": vv for kk, vv in flat_accuracy(v).items()})
        elif isinstance(v, float):
            out[k] = v
    return out
