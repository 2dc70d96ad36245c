"""The text store (tti/text/store.py): what it costs to build, what it saves per step, its size
per caption, and the memory it takes per rank.

Three parts, on COCO-like captions (synthetic sentences of COCO's length, since COCO itself
is not here) and a real frozen encoder (the packaged MiniLM by default):
1. build: a store of --captions captions: time, captions/s, bytes per caption (token states
   and index), and the same projected to roberta-base's width (768) and COCO's 414k captions;
2. step: training steps of --config (configs/coco32_frozen_roberta.yaml) shrunk to CPU size
   by --set, text from the store against the live encoder, step by step in turn; the
   encoder's time is measured inside each step, so its share does not depend on how busy a
   shared machine is;
3. memory: 1 and 2 processes ("ranks", --ranks) each open the store through TextEncoder and
   read every caption; the RSS, PSS (shared pages split between the processes that map them),
   heap and mapped-file pages each rank adds. Beside it the same with the states held the old
   way, a per-process dict of fp32 tensors (filled from the store, which holds the same values);
4. with --checkpoint (a shapes run whose store is here): the same model samples val captions
   with the same noise from fp16 (store) and fp32 (live) states, judged caption by caption,
   beside the same with other noise.

    OMP_NUM_THREADS=1 python -m bench.text_store                # CPU, a few minutes
    OMP_NUM_THREADS=1 python -m bench.text_store --captions 2000 --steps 3 --ranks 1,2
    OMP_NUM_THREADS=1 python -m bench.text_store --skip build,step,memory \
        --checkpoint results/shapes32_diffusion/0
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import statistics
import tempfile
import time

import numpy as np
import torch

from tti.config.load import load_config
from tti.infra.precision import amp_dtype, precision_name
from tti.config.registry import MODEL_KINDS
from tti.text.encoder import TextEncoder
from tti.text.source import PACKAGED_MINILM
from tti.text.store import TextStore, build_store, encoder_identity, store_folder
from tti.infra.cli import run_cli

COCO_CAPTIONS = 414_113  # captions in COCO 2014 train (414,113) ...
COCO_VAL_CAPTIONS = 202_654  # ... and val (202,654)
ROBERTA_BASE_DIM = 768
CPU_SIZE = ["model.unet.channels=[32, 64, 64]", "model.unet.num_res_blocks=1",
            "model.unet.head_dim=32", "model.unet.dropout=0.0", f"text.name={PACKAGED_MINILM}"]

SUBJECTS = ["man", "woman", "young boy", "little girl", "group of people", "dog", "black cat",
            "large giraffe", "brown horse", "red double decker bus", "train", "small airplane",
            "plate of food", "bowl of fruit", "kitchen", "living room", "baseball player",
            "tennis player", "surfer", "skier", "elephant", "zebra", "teddy bear", "pizza"]
VERBS = ["sitting on", "standing next to", "riding", "walking down", "parked near",
         "flying over", "holding", "eating", "looking at", "lying on", "covered with",
         "playing with", "crossing", "waiting at", "filled with", "driving down"]
OBJECTS = ["a wooden table", "a busy street", "a sandy beach", "a grassy field", "the snow",
           "a white plate", "a red frisbee", "a wave", "a city sidewalk", "a laptop keyboard",
           "a large window", "a green tree", "the train tracks", "a tall building",
           "a blue umbrella", "a cutting board", "the water", "a dirt road"]
EXTRAS = ["", "", " on a sunny day", " at night", " in the background", " with a smile",
          " next to a fence", " near some trees", " in front of a crowd", " while it rains"]


def coco_like_captions(n: int, seed: int = 0) -> list[str]:
    """n distinct sentences of COCO's shape and length (about 10 words)."""
    rng, out = random.Random(seed), {}
    while len(out) < n:
        a = rng.choice(["A", "The", "Two", "An old", "A small"])
        caption = (f"{a} {rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}"
                   f"{rng.choice(EXTRAS)}.")
        out[caption] = None
    return list(out)


def make_encoder(name: str, hidden_layer: int, max_length: int, captions: list[str], work: str):
    """The frozen encoder: the packaged MiniLM, or a tiny RoBERTa built on the captions."""
    if name == "tiny-roberta":
        from tti.text.tiny_roberta import build_tiny_roberta

        name = build_tiny_roberta(os.path.join(work, "tiny_roberta"), captions)
    return TextEncoder(name, hidden_layer=hidden_layer, max_length=max_length)


# ---------------------------------------------------------------- 1. build


def bench_build(encoder, captions: list[str], folder: str) -> TextStore:
    start = time.perf_counter()
    build_store(encoder, captions, folder, progress=True)
    seconds = time.perf_counter() - start
    store = TextStore(folder)
    sizes = {f: os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)}
    n, tokens = len(store), store.num_tokens
    index = sum(v for f, v in sizes.items() if f != "tokens.npy")
    print(f"\n== build: {n} captions ({len(captions)} + \"\"), encoder {encoder.name} "
          f"(hidden state {encoder.hidden_layer}, width {encoder.dim}) ==")
    print(f"{seconds:.1f} s = {n / seconds:.0f} captions/s; {tokens / n:.2f} tokens per caption")
    per_caption = sum(sizes.values()) / n
    print(f"bytes per caption: {per_caption:.0f} (token states {sizes['tokens.npy'] / n:.0f}, "
          f"index and caption text {index / n:.0f}); files: "
          + ", ".join(f"{f} {v / 2 ** 20:.2f} MiB" for f, v in sorted(sizes.items())))
    projected = tokens / n * ROBERTA_BASE_DIM * 2 + index / n
    total = COCO_CAPTIONS + COCO_VAL_CAPTIONS
    print(f"projected to roberta-base (width {ROBERTA_BASE_DIM}, same tokens per caption): "
          f"{projected:.0f} bytes per caption; COCO 2014 train + val ({total} captions): "
          f"{projected * total / 2 ** 30:.1f} GiB, in fp32 per process as the old dict held it: "
          f"{(projected - index / n) * 2 * total / 2 ** 30:.1f} GiB per rank")
    return store


# ---------------------------------------------------------------- 2. the encoder's share of a step


def encoder_share(generator, encoders: dict, pool: list[str], batch: int, size: int,
                  device: torch.device, amp, steps: int, warmup: int) -> dict:
    """{name: (median step s, median encoder s)} of training steps of `generator` (a model
    with .loss(images, text)) whose text comes from each of `encoders` in turn, step by step."""
    from bench.train_throughput import alternate, autocast, sync

    opt = torch.optim.AdamW(generator.parameters(), lr=1e-4, fused=device.type in ("cpu", "cuda"))
    images = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    rng = random.Random(0)
    times = {name: ([], []) for name in encoders}

    def run(name, encoder):
        def step(record):
            captions = rng.sample(pool, batch)
            start = time.perf_counter()
            text = encoder(captions)
            sync(device)
            encoded = time.perf_counter()
            with autocast(device, amp):
                loss = generator.loss(images, text)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sync(device)
            if record:
                times[name][0].append(time.perf_counter() - start)
                times[name][1].append(encoded - start)
        return step

    alternate([run(name, enc) for name, enc in encoders.items()], steps, warmup)
    return {name: (statistics.median(t), statistics.median(e)) for name, (t, e) in times.items()}


def print_share(results: dict, batch: int) -> None:
    for name, (step, enc) in results.items():
        print(f"{name:16s} {step * 1e3:8.1f} ms/step {batch / step:7.1f} img/s   encoder "
              f"{enc * 1e3:7.2f} ms = {100 * enc / step:5.2f}% of the step")
    (a, (step_a, enc_a)), (b, (step_b, enc_b)) = list(results.items())[:2]
    print(f"{a} saves {(enc_b - enc_a) * 1e3:.1f} ms/step = {100 * (enc_b - enc_a) / step_b:.1f}% "
          f"of the step with the {b}; measured step-time ratio {step_b / step_a:.2f}x")


def bench_step(args, encoder, store: TextStore, pool: list[str], device) -> None:
    cfg = load_config(args.config, CPU_SIZE + args.set)
    amp = amp_dtype(cfg.train.precision, device)
    live = TextEncoder(encoder.name, cache=False, tokenizer=encoder.tokenizer,
                       model=encoder.model, hidden_layer=encoder.hidden_layer,
                       max_length=encoder.max_length)
    encoder.use_store(store)
    torch.manual_seed(0)
    generator = MODEL_KINDS.get(cfg.model.kind).build(cfg, encoder).to(device)
    n_params = sum(p.numel() for p in generator.parameters())
    print(f"\n== step: {args.config} with {' '.join(CPU_SIZE + args.set)}: UNet "
          f"{n_params / 1e6:.2f}M parameters, batch {args.batch}, "
          f"{cfg.data.image_size}x{cfg.data.image_size}, {precision_name(amp)} ==")
    results = encoder_share(generator, {"text store": encoder, "live encoder": live}, pool,
                            args.batch, cfg.data.image_size, device, amp, args.steps, args.warmup)
    print_share(results, args.batch)


# ---------------------------------------------------------------- 3. memory per rank


def memory_kib() -> dict:
    """This process's resident memory in KiB (/proc/self/smaps_rollup, Linux): rss, pss (each
    page divided by the processes that map it), anon (its own heap: never shared here) and
    file (pages of mapped files, shared through the page cache)."""
    fields = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                fields[parts[0].rstrip(":")] = int(parts[1])
    return {"rss": fields["Rss"], "pss": fields["Pss"], "anon": fields["Anonymous"],
            "file": fields["Rss"] - fields["Anonymous"]}


def reader(folder: str, encoder_name: str, mode: str, barrier, results) -> None:
    """One "rank": open the store, read every caption (mode "store": through TextEncoder, in
    batches of 256; "dict": into a dict of fp32 tensors as the old cache held them)."""
    torch.set_num_threads(1)
    store = TextStore(folder)
    encoder = TextEncoder(encoder_name, hidden_layer=store.meta["hidden_layer"],
                          max_length=store.meta["max_length"])
    captions = [store.caption(r) for r in range(len(store))]
    barrier.wait()
    before = memory_kib()
    if mode == "store":
        encoder.use_store(store)
        for start in range(0, len(captions), 256):
            encoder(captions[start:start + 256])
    held = {}
    if mode == "dict":  # read from the file, not the map: the old cache held no map
        tokens = np.load(os.path.join(folder, "tokens.npy"))
        for row, caption in enumerate(captions):
            start, length = store._rows[row]
            held[caption] = torch.from_numpy(tokens[start:start + length].astype(np.float32))
        del tokens
    barrier.wait()  # every rank has read everything: shared pages are counted as shared
    after = memory_kib()
    results.put({k: after[k] - before[k] for k in after})
    barrier.wait()
    held.clear()


def bench_memory(folder: str, encoder_name: str, ranks: list[int]) -> None:
    context = multiprocessing.get_context("spawn")
    size_mib = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)) / 2 ** 20
    print(f"\n== memory each rank adds by reading every caption (store files {size_mib:.1f} MiB) ==")
    print(f"{'ranks':>5} {'how':>18} {'RSS/rank':>9} {'PSS/rank':>9} {'heap/rank':>10} "
          f"{'file pages/rank':>16} {'PSS all ranks':>14}  (MiB)")
    for mode in ("store", "dict"):
        for n in ranks:
            barrier, results = context.Barrier(n), context.Queue()
            procs = [context.Process(target=reader, args=(folder, encoder_name, mode, barrier, results))
                     for _ in range(n)]
            for p in procs:
                p.start()
            rows = [results.get(timeout=600) for _ in procs]
            for p in procs:
                p.join()
            mib = {k: statistics.mean(r[k] for r in rows) / 1024 for k in rows[0]}
            how = "text store (mmap)" if mode == "store" else "fp32 dict (old)"
            print(f"{n:>5} {how:>18} {mib['rss']:9.1f} {mib['pss']:9.1f} {mib['anon']:10.1f} "
                  f"{mib['file']:16.1f} {mib['pss'] * n:14.1f}")


# ---------------------------------------------------------------- 4. fp16 against fp32 states


def bench_precision(checkpoint: str, n: int, steps: int) -> None:
    """One trained model (a shapes run whose store is on this machine) samples n val captions
    with the same noise twice: states from the store (fp16) and from the live encoder (fp32);
    then once more from the store with other noise, to compare with. Judge verdicts and pixels."""
    from tti.data.coco import load_split
    from tti.training.sample_monitor import shapes_val_captions
    from tti.eval.metrics.judge import judge_image
    from tti.models.text_to_image import load_for_inference
    from tti.eval.grid import generate

    model, cfg = load_for_inference(checkpoint, "cpu")
    stored = model.text
    if stored.store is None:
        raise SystemExit(f"--checkpoint {checkpoint}: its text store ({stored.store_dir}) is not here")
    live = TextEncoder(stored.name, cache=False, tokenizer=stored.tokenizer, model=stored.model,
                       hidden_layer=stored.hidden_layer, max_length=stored.max_length)
    val = load_split(cfg.data.root, cfg.data.val_split, cfg.data.image_size, cache_dir=cfg.data.cache_dir)
    captions = shapes_val_captions(val, n)
    error = 0.0
    for start in range(0, n, 64):
        a, b = stored(captions[start:start + 64]), live(captions[start:start + 64])
        error = max(error, float((a.tokens - b.tokens)[b.mask].abs().max()))
    opts = dict(model.sampler_options(cfg), steps=steps)
    runs = {}
    for name, encoder, seed in (("store fp16", stored, 1), ("live fp32", live, 1),
                                ("store fp16, other noise", stored, 2)):
        model.text = encoder
        images = generate(model, captions, n=1, seed=seed, **opts)
        runs[name] = (images, np.array([judge_image(im, c)["all"] for im, c in zip(images, captions)]))
    model.text = stored
    print(f"\n== fp16 store against fp32 states: {checkpoint}, {n} val captions, DDIM {steps}, "
          f"guidance {opts['guidance']} (largest state difference {error:.4f}) ==")
    (base, base_ok), others = runs["store fp16"], list(runs.items())[1:]
    print(f"store fp16: all correct {base_ok.mean():.3f}")
    for name, (images, ok) in others:
        pixels = (images.int() - base.int()).abs()
        print(f"{name}: all correct {ok.mean():.3f}; verdicts that differ from store fp16: "
              f"{int((ok != base_ok).sum())} of {n}; pixels differing by > 8 levels: "
              f"{(pixels > 8).float().mean():.2%}, mean difference {pixels.float().mean():.2f} "
              f"levels (of 255)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--captions", type=int, default=5000, help="distinct captions stored")
    parser.add_argument("--encoder", default=PACKAGED_MINILM,
                        help=f"{PACKAGED_MINILM} (default), tiny-roberta, or a model folder")
    parser.add_argument("--config", default="configs/coco32_frozen_roberta.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="more overrides of the config (after the CPU-size ones)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per encoder")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--ranks", default="1,2", help="process counts for the memory part")
    parser.add_argument("--checkpoint", default=None,
                        help="also compare fp16 and fp32 states through this shapes run's model")
    parser.add_argument("--probe-captions", type=int, default=200)
    parser.add_argument("--skip", default="", help="parts to skip, comma-separated: build, step, "
                                                   "memory (step and memory need the build)")
    args = parser.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    if "build" in skip and not {"step", "memory"} <= skip:
        parser.error("--skip build needs --skip step,memory too: they read the store it builds")
    device = torch.device("cpu")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"{os.cpu_count()} CPUs; text from --config {args.config}")
    cfg = load_config(args.config, CPU_SIZE + args.set)
    pool = coco_like_captions(args.captions)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        if "build" not in skip:
            name = cfg.text.name if args.encoder == PACKAGED_MINILM else args.encoder
            encoder = make_encoder(name, cfg.text.hidden_layer, cfg.text.max_length, pool, work)
            folder = store_folder(work, encoder_identity(encoder))
            store = bench_build(encoder, pool, folder)
        if "step" not in skip:
            bench_step(args, encoder, store, pool, device)
        if "memory" not in skip:
            bench_memory(folder, encoder.name, [int(r) for r in args.ranks.split(",")])
    if args.checkpoint:
        bench_precision(args.checkpoint, args.probe_captions, steps=25)
    print(f"\ntotal bench time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    run_cli(main)  # a damaged or unsafe checkpoint: one line, no traceback
