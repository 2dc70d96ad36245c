"""The GPU check, ready for the day a GPU is lent: one command, about 10 minutes on one GPU.

    bash bench/gpu_check.sh [--out bench/results/gpu_check_<device>.md]   # every visible GPU
    bash bench/gpu_check.sh --dry-run      # CPU, tiny sizes: every part runs (a test does)

It prints:
1. Training throughput of the COCO configs (coco32/coco64, frozen and fine-tuned RoBERTa)
   at the micro-batch their `train.micro_batch: auto` chooses on this GPU (searched as
   training searches it; a second table gives it per config with its peak memory and
   tti.preflight's estimate, for docs/training_on_coco.md):
   img/s, peak memory, training FLOPs per image, achieved TFLOP/s and MFU against the
   device's dense bf16 peak (tti/training/utilisation.py's table; "unknown" for other devices), eager
   and with torch.compile, under DDP on every visible GPU (one torchrun launch). Each row is
   the real training step (tti.train.train_step) on synthetic batches: random images and
   COCO-like captions, which the frozen configs read from a text store built first, as
   training does. RoBERTa is roberta-base when its weights are here, else random weights of
   roberta-base's shape with a small tokenizer trained on the captions: its FLOPs, not its
   knowledge.
2. configs/shapes32_long.yaml trained for --judge-steps steps on one device (its dataset is
   generated and packed while part 1 runs), and the in-loop judge's accuracy on its val
   captions at the last step.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import heapq
import json
import os
import random
import subprocess
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (config, compiled): eager rows first; compiled rows run while the time budget lasts.
ROWS = [("coco32_frozen_roberta", False), ("coco32_ft_roberta", False),
        ("coco64_frozen_roberta", False), ("coco64_ft_roberta", False),
        ("coco32_frozen_roberta", True), ("coco64_frozen_roberta", True)]
JUDGE_CONFIG = "configs/shapes32_long.yaml"
# --dry-run: tiny models and data, so every part runs on a CPU in seconds.
DRY_MODEL = ["model.unet.channels=[16, 32]", "model.unet.num_res_blocks=1",
             "model.unet.attn_resolutions=[16]", "model.unet.self_attn_resolutions=[16]",
             "model.unet.head_dim=16", "model.unet.text_layers=0", "data.image_size=32"]
DRY_THROUGHPUT = DRY_MODEL + ["train.batch_size=4", "text.max_length=8"]  # one text length: one compile
DRY_JUDGE = DRY_MODEL + ["data.shapes_train=48", "data.shapes_val=8", "train.batch_size=8",
                         "train.eval_samples=8", "sample.steps=2", "model.gaussian.timesteps=100",
                         "sample.captions=['a large red circle']"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: check the script")
    p.add_argument("--work", default=None, help="scratch folder (default: a new temporary one)")
    p.add_argument("--out", default=None, help="also write the report (markdown) here")
    p.add_argument("--steps", type=int, default=None, help="timed steps per row (default 20)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5)")
    p.add_argument("--budget-s", type=float, default=330.0,
                   help="no compiled row starts after this many seconds of part 1")
    p.add_argument("--judge-steps", type=int, default=None,
                   help="training steps of the shapes long config (default 3000)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # torchrun's processes
    p.add_argument("--make-shapes", default=None, help=argparse.SUPPRESS)  # background data
    args = p.parse_args(argv)
    dry = args.dry_run
    args.steps = args.steps or (2 if dry else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if dry else 5)
    args.judge_steps = args.judge_steps or (4 if dry else 3000)
    return args


# ---------------------------------------------------------------- setup


def device_report(device: torch.device) -> tuple[str, float | None]:
    """(a line on the devices, the dense bf16 peak of one in TFLOP/s or None)."""
    from tti.training.utilisation import peak_tflops

    if device.type != "cuda":
        return f"CPU ({os.cpu_count()} cores), torch {torch.__version__}", None
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    peak = peak_tflops(device)
    return (f"{len(names)} x {names[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}; "
            f"dense bf16 peak {f'{peak:.0f} TFLOP/s per GPU' if peak else 'unknown'}"), peak


def roberta(work: str, captions: list[str], dry: bool) -> tuple[str, str]:
    """(text.name for the COCO configs, what it is): roberta-base if its weights load here,
    else a random RoBERTa (roberta-base's shape; tiny in a dry run) built on `captions`."""
    from tti.text.source import TextEncoderError, check_text_encoder
    from tti.text.tiny_roberta import build_tiny_roberta

    if not dry:
        try:
            return check_text_encoder("roberta-base"), "roberta-base (pretrained weights)"
        except TextEncoderError:
            pass
    folder = os.path.join(work, "roberta")
    if dry:
        return build_tiny_roberta(folder, captions), "a tiny random RoBERTa (dry run)"
    build_tiny_roberta(folder, captions, hidden_size=768, layers=12, heads=12)
    return folder, "random RoBERTa of roberta-base's shape (12 x 768), tokenizer trained on the captions"


def judge_config(args, work: str):
    import tti.models  # noqa: F401  (registers the plug-ins the config names)
    from tti.config.load import load_config

    sets = [f"data.root={os.path.join(work, 'shapes')}", f"run.results_dir={work}/results",
            f"train.steps={args.judge_steps}", f"train.sample_every={args.judge_steps}",
            f"train.ckpt_every={args.judge_steps}"] + (DRY_JUDGE if args.dry_run else [])
    return load_config(JUDGE_CONFIG, sets), sets


def make_shapes(args, work: str) -> None:
    """Generate and pack the judge run's dataset (the background process of part 2)."""
    from tti.data.coco import load_split
    from tti.data.shapes import write_coco

    d = judge_config(args, work)[0].data
    write_coco(d.root, n_train=d.shapes_train, n_val=d.shapes_val, image_size=d.image_size, seed=0)
    for split in (d.train_split, d.val_split):
        load_split(d.root, split, d.image_size, num_workers=min(8, os.cpu_count() or 1))


# ---------------------------------------------------------------- part 1, in each torchrun process


def synthetic_steps(cfg, info, pool: list[str], split):
    """A fixed micro-batch of random uint8 images, and a function giving one step's list of
    micro-batches (as the BatchPlan `split` says) with captions drawn from `pool`."""
    micro = split.micro
    size = cfg.data.image_size
    images = torch.randint(0, 256, (micro, 3, size, size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(info.rank))
    if info.device.type == "cuda":
        images = images.pin_memory()
    rng = random.Random(info.rank)
    return images, lambda: [(images, rng.sample(pool, micro)) for _ in range(split.accum)]


def measure_row(plan: dict, config: str, compiled: bool, info, pool: list[str], log) -> dict:
    """Build one config's model and optimizer as training does, time its training step."""
    from tti.infra import distributed
    from tti.config.load import load_config
    from tti.config.rules import validate
    from tti.models.text_to_image import build, to_model_range
    from tti.training.batch_plan import plan_batches
    from tti.training.loop import train_step
    from tti.training.memory_estimate import estimate
    from tti.training.setup import for_training, open_text_store
    from tti.training.state import make_train_state
    from tti.training.utilisation import model_flops_per_image, peak_memory_gib

    sets = [f"text.name={plan['text_name']}", f"data.cache_dir={plan['work']}/cache"] + plan["sets"]
    cfg = load_config(os.path.join(REPO, "configs", f"{config}.yaml"), sets)
    validate(cfg, world_size=info.world_size)
    torch.manual_seed(0)
    model = build(cfg).to(info.device)
    if model.text.use_cache:
        open_text_store(model.text, pool, info, log)
    state = make_train_state(cfg, model, info.device, log)
    # The COCO configs' train.micro_batch: auto, searched as training searches it.
    start = time.perf_counter()
    split = plan_batches(cfg, info, state, lambda n: heapq.nlargest(n, pool, key=len), log)
    search_s = time.perf_counter() - start
    images, step_batches = synthetic_steps(cfg, info, pool, split)
    flops = model_flops_per_image(model, to_model_range(images.to(info.device)),
                                  pool[:len(images)], state.amp)
    eager = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, compile=False))
    forward = for_training(model, eager, info)
    if compiled:
        forward = torch.compile(forward, backend=plan["backend"])
    start = time.perf_counter()
    for _ in range(plan["warmup"]):  # compiles here
        train_step(state, forward, step_batches(), cfg, info)
    sync(info.device)
    if info.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(info.device)  # the timed steps' peak, not compilation's
    warm_s, start = time.perf_counter() - start, time.perf_counter()
    for _ in range(plan["steps"]):
        train_step(state, forward, step_batches(), cfg, info)
    sync(info.device)
    images_per_s = plan["steps"] * cfg.train.batch_size / (time.perf_counter() - start)
    peak_mem = max(distributed.all_gather_object(peak_memory_gib(info.device)))
    need = estimate(cfg, info.world_size).at(split.micro) if not compiled else 0
    return {"config": config, "compiled": compiled, "batch": cfg.train.batch_size,
            "micro": split.micro, "accum": split.accum, "how": split.how, "search_s": search_s,
            "estimate_gib": need / 2 ** 30,
            "params_m": sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6,
            "img_per_s": images_per_s, "gflop_per_img": flops / 1e9, "warmup_s": warm_s,
            "tflops": images_per_s * flops / 1e12, "peak_mem_gib": peak_mem}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def worker(plan_path: str) -> None:
    """One torchrun process: every row of the plan; rank 0 writes the results."""
    from bench.text_store import coco_like_captions
    from tti.infra import distributed
    from tti.training.run_log import RunLog

    with open(plan_path) as f:
        plan = json.load(f)
    info = distributed.setup(plan["device"])
    if info.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    log = RunLog(os.path.join(plan["work"], "throughput"), info.is_main)
    pool = coco_like_captions(plan["captions"])
    results, start = [], time.perf_counter()
    for config, compiled in plan["rows"]:
        late = compiled and time.perf_counter() - start > plan["budget_s"]
        if distributed.broadcast_object(late):  # every rank takes rank 0's decision
            results.append({"config": config, "compiled": compiled, "skipped": "time budget"})
            continue
        results.append(measure_row(plan, config, compiled, info, pool, log))
        gc.collect()
        if info.device.type == "cuda":
            torch.cuda.empty_cache()
        torch._dynamo.reset()
    log.close()
    if info.is_main:
        with open(os.path.join(plan["work"], "throughput.json"), "w") as f:
            json.dump(results, f)
    distributed.cleanup()


# ---------------------------------------------------------------- the two parts, from one process


def run_throughput(args, work: str, text_name: str, device: torch.device) -> list[dict]:
    """Part 1: one torchrun launch, one process per visible GPU (one on CPU)."""
    # A dry run compiles one row: compiling is slow on a CPU, and one shows the path works.
    rows = [r for r in ROWS if not r[1]] + [next(r for r in ROWS if r[1])] if args.dry_run else ROWS
    plan = {"work": work, "text_name": text_name, "device": device.type, "rows": rows,
            "sets": DRY_THROUGHPUT if args.dry_run else [], "steps": args.steps,
            "warmup": args.warmup, "budget_s": args.budget_s,
            "backend": "eager" if args.dry_run else "inductor",
            "captions": 64 if args.dry_run else 2048}
    path = os.path.join(work, "plan.json")
    with open(path, "w") as f:
        json.dump(plan, f)
    procs = torch.cuda.device_count() if device.type == "cuda" else 1
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={procs}", "-m", "bench.gpu_check", "--worker", path]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    subprocess.run(cmd, cwd=REPO, env=env, check=True)
    with open(os.path.join(work, "throughput.json")) as f:
        return json.load(f)


def throughput_table(rows: list[dict], world: int, peak: float | None) -> str:
    lines = ["| config | torch.compile | global batch | trained params | img/s | GFLOP/img "
             "(train) | TFLOP/s (all GPUs) | MFU | peak memory | first steps |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        mode = "compiled" if r["compiled"] else "eager"
        if "skipped" in r:
            lines.append(f"| {r['config']} | {mode} | skipped: {r['skipped']} |||||||")
            continue
        mfu = f"{100 * r['tflops'] / (peak * world):.1f}%" if peak else "unknown"
        lines.append(f"| {r['config']} | {mode} | {r['batch']} | {r['params_m']:.1f}M | "
                     f"{r['img_per_s']:.1f} | {r['gflop_per_img']:.2f} | {r['tflops']:.3f} | "
                     f"{mfu} | {r['peak_mem_gib']:.2f} GiB | {r['warmup_s']:.1f} s |")
    return "\n".join(lines)


def micro_batch_table(rows: list[dict], device: str) -> str:
    """What train.micro_batch: auto chose per COCO config on this device, the timed steps'
    peak memory at it, and tti.preflight's estimate there (docs/training_on_coco.md's table)."""
    lines = ["| config | device | micro-batch (auto) | accumulation | search | peak memory "
             "(timed steps) | preflight's estimate |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r["compiled"] or "skipped" in r:
            continue
        search = f"{r['search_s']:.1f} s" if "no memory search" not in r["how"] else "none (CPU)"
        lines.append(f"| {r['config']} | {device} | {r['micro']} | {r['accum']} | {search} | "
                     f"{r['peak_mem_gib']:.2f} GiB | {r['estimate_gib']:.2f} GiB |")
    return "\n".join(lines)


def run_judge(args, work: str, device: torch.device, data: subprocess.Popen) -> dict:
    """Part 2: the shapes long config for --judge-steps steps; the last in-loop judge line."""
    from tti import train

    if data.wait() != 0:
        raise RuntimeError(f"making the shapes dataset failed: see {work}/shapes.log")
    _, sets = judge_config(args, work)
    argv = ["--config", os.path.join(REPO, JUDGE_CONFIG), "--device", device.type]
    for item in sets:
        argv += ["--set", item]
    start = time.perf_counter()
    run_dir = train.main(argv)
    with open(os.path.join(run_dir, "in_loop_accuracy.jsonl")) as f:
        last = json.loads(f.read().splitlines()[-1])
    return dict(last, seconds=time.perf_counter() - start)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker(args.worker)
    if args.make_shapes:
        return make_shapes(args, args.make_shapes)
    from bench.text_store import coco_like_captions

    started = time.perf_counter()
    work = os.path.abspath(args.work or tempfile.mkdtemp(prefix="gpu_check_"))
    os.makedirs(work, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    devices, peak = device_report(device)
    world = torch.cuda.device_count() if device.type == "cuda" else 1
    text_name, text_what = roberta(work, coco_like_captions(2048), args.dry_run)
    shapes_cmd = [sys.executable, "-m", "bench.gpu_check", "--make-shapes", work,
                  "--judge-steps", str(args.judge_steps)] + (["--dry-run"] if args.dry_run else [])
    with open(os.path.join(work, "shapes.log"), "w") as shapes_log:
        data = subprocess.Popen(shapes_cmd, cwd=REPO, stdout=shapes_log, stderr=subprocess.STDOUT)
    report = [f"# GPU check{' (dry run: tiny sizes on CPU)' if args.dry_run else ''}", "",
              f"Devices: {devices}.", f"RoBERTa: {text_what}.",
              f"Throughput: DDP over {world} process(es), {args.steps} timed steps after "
              f"{args.warmup} untimed ('first steps': their time, compilation included).", ""]
    rows = run_throughput(args, work, text_name, device)
    report += [throughput_table(rows, world, peak), "",
               "train.micro_batch: auto per config (per process; the global batch is the "
               "config's):", "", micro_batch_table(rows, devices.split(",")[0]), "",
               f"Part 1 took {time.perf_counter() - started:.0f} s from the start.", ""]
    print("\n".join(report), flush=True)
    judge = run_judge(args, work, device, data)
    line = (f"Judge: {JUDGE_CONFIG} trained {args.judge_steps} steps in {judge.pop('seconds'):.0f} s "
            f"(data prepared beside part 1); in-loop judge at step {judge.pop('step')}: "
            + ", ".join(f"{k}={v:.3f}" for k, v in judge.items() if isinstance(v, float)))
    total = f"Total: {time.perf_counter() - started:.0f} s."
    report += [line, "", total]
    print(f"\n{line}\n{total}")
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(report) + "\n")


if __name__ == "__main__":
    main()
