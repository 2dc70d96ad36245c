"""Where a training step's time goes: the phases of tti.train.train_step, then torch.profiler's
op table, on the real data loader, model and optimizer of a config.

The phases (data, text, UNet forward + loss, backward, grad clip, AdamW, EMA) are timed with
perf_counter around the same calls train_step makes, median over --steps; the sum is checked
against whole train_step calls timed in the same run. Then --profile-steps more steps under
torch.profiler list the ops with the most self CPU time.
Run from the repository root, on the dataset the config names (generated if missing):
    OMP_NUM_THREADS=1 python -m bench.step_profile --set train.precision=fp32
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from tti.infra import distributed
from tti.config.load import load_config
from tti.data.order import resumable_batches
from tti.models.text_to_image import to_model_range
from tti.training.run_log import RunLog
from tti.training.loop import train_step
from tti.training.batch_plan import stated_plan
from tti.training.setup import build_model, make_loader, open_datasets
from tti.training.state import make_train_state


def phase_times(state, batches, cfg, n: int) -> dict:
    """{phase: [seconds per step]} over n steps, each phase the call train_step makes."""
    model, tr = state.model, cfg.train
    times: dict = {}

    def timed(name, fn):
        start = time.perf_counter()
        out = fn()
        times.setdefault(name, []).append(time.perf_counter() - start)
        return out

    for _ in range(n):
        (images, captions), = timed("data (next batch, collate)", lambda: next(batches))
        state.optimizer.zero_grad(set_to_none=True)
        images = to_model_range(images)
        text = timed("text (stored tokens + trainable layers)", lambda: model.text(captions))
        with torch.autocast("cpu", dtype=state.amp or torch.float32, enabled=state.amp is not None):
            loss = timed("UNet forward + loss", lambda: model.image_model.loss(images, text))
        timed("backward", loss.backward)
        timed("grad clip", lambda: torch.nn.utils.clip_grad_norm_(state.trained_parameters(),
                                                                  tr.grad_clip or float("inf")))
        timed("AdamW step", state.optimizer.step)
        timed("EMA update", lambda: state.ema.update(model))
        state.scheduler.step()
    return times


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/shapes32.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--steps", type=int, default=20, help="timed steps (after 3 warm-up)")
    p.add_argument("--profile-steps", type=int, default=5)
    p.add_argument("--top", type=int, default=20, help="ops listed")
    args = p.parse_args()
    cfg = load_config(args.config, args.set)
    info = distributed.setup("cpu")
    log = RunLog("/tmp/tti_step_profile", False)  # not the main rank: writes nothing
    train_set, val_set = open_datasets(cfg, info, 0)
    plan = stated_plan(cfg, info.world_size, "")  # auto: the config's split, as on a CPU
    batches = resumable_batches(make_loader(cfg, info, train_set, 0, plan.micro), plan.accum, 0)
    model = build_model(cfg, info, train_set, val_set, None, log).train()
    state = make_train_state(cfg, model, info.device, log)
    print(f"{args.config} {' '.join(args.set)}: batch {cfg.train.batch_size}, "
          f"{torch.get_num_threads()} thread(s), autocast {state.amp}")
    phase_times(state, batches, cfg, 3)  # warm-up
    whole = []
    for _ in range(args.steps):  # whole steps, to check the phases add up to one
        micro = next(batches)
        start = time.perf_counter()
        train_step(state, model, micro, cfg, info)
        whole.append(time.perf_counter() - start)
    times = phase_times(state, batches, cfg, args.steps)
    medians = {k: statistics.median(v) for k, v in times.items()}
    total = sum(medians.values())
    print(f"\n| phase | ms/step | share |\n| --- | --- | --- |")
    for name, sec in medians.items():
        print(f"| {name} | {sec * 1e3:.1f} | {100 * sec / total:.1f}% |")
    print(f"| sum of phases | {total * 1e3:.1f} | |")
    print(f"whole train_step (+ data) median {statistics.median(whole) * 1e3 + medians['data (next batch, collate)'] * 1e3:.1f} ms; "
          f"{cfg.train.batch_size / total:.1f} img/s from the phases")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        phase_times(state, batches, cfg, args.profile_steps)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top,
                                    max_name_column_width=40))


if __name__ == "__main__":
    main()
