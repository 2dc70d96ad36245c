"""Export images for the metrics: ground-truth val images and one generated image per caption.

    python -m tti.export --checkpoint results/shapes32_diffusion/0 --out-dir eval_data_run_0
    torchrun --standalone --nproc_per_node=8 -m tti.export --checkpoint CKPT --num-samples 30000
    bash gen_images_for_metrics.sh $gpu_ids $run_idx $pretrained_model_path   # the same, launched

writes, with ids 000000, 000001, ... equal to the file stems:

    <out-dir>/gt/images/<id>.png    gt/gt_captions.json    {"<id>": "<caption>"}
    <out-dir>/tti/images/<id>.png   tti/tti_captions.json  (the same captions)
    <out-dir>/selection.json        {"<id>": {"row", "image_id", "file_name", "caption_index"}}
    <out-dir>/export_info.json      checkpoint, config summary, sampler options, n, seed,
                                    data root, timings, hardware (read by `python -m tti.evaluate`)

Ground truth comes from the packed val cache, so it is resized exactly as training saw it.
The n val images are a seeded random subset (a larger n extends a smaller one), each with one
of its captions drawn from the seed. Image <id> is sampled with its own generator seeded from
(seed, id): its pixels do not depend on the batch size or the number of processes (exact on
CPU; on GPU, kernels picked per batch size can differ in the last bits). Under torchrun rank
r does ids r::world. A rerun with the same settings resumes: complete PNGs are kept, missing
or unreadable ones are redone, and each PNG is written under a temporary name and renamed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from tti import distributed
from tti.cli import UserError, run_cli
from tti.run_lock import RunLock
from tti.threads import use_free_cpus

SETTINGS_KEYS = ("checkpoint", "checkpoint_step", "use_ema", "sampler_options", "seed",
                 "data_root", "val_split", "image_size", "precision")


class ExportError(UserError, ValueError):
    """An export folder that cannot be written, resumed or read as one; the message says why."""


@dataclass(frozen=True)
class ExportItem:
    """One exported pair: file stem `id`, its val row, COCO image id and chosen caption."""
    index: int
    id: str
    row: int
    image_id: object
    file_name: str
    caption_index: int
    caption: str


def item_id(index: int) -> str:
    """File stem of the index-th exported image (fixed width, so a larger --n keeps the names)."""
    return f"{index:06d}"


def choose_items(val_set, n: int, seed: int) -> list[ExportItem]:
    """The first n of a seeded permutation of the val rows, each with a seeded caption.

    val_set: a CaptionDataset (its own seed drives the caption draw, via caption_choice at
    epoch 0). n is capped at len(val_set). The result for n is a prefix of the result for
    any larger n with the same seed.
    """
    n = min(int(n), len(val_set))
    rows = np.random.default_rng(seed).permutation(len(val_set))[:n]
    items = []
    for index, row in enumerate(int(r) for r in rows):
        k = val_set.caption_choice(row, epoch=0)
        items.append(ExportItem(index, item_id(index), row, val_set.image_id(row),
                                val_set.file_name(row), k, val_set.captions(row)[k]))
    return items


def sample_generator(seed: int, index: int) -> torch.Generator:
    """A CPU generator for image `index` alone (noise is moved to the model's device)."""
    state = np.random.SeedSequence([int(seed), int(index)]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


@torch.no_grad()
def generate_items(model, items: list[ExportItem], seed: int, **sampler_opts) -> torch.Tensor:
    """uint8 [len(items), 3, S, S]: image i from caption i and sample_generator(seed, index i)."""
    from tti.model import to_uint8

    captions = [it.caption for it in items]
    gens = [sample_generator(seed, it.index) for it in items]
    return to_uint8(model.sample(captions, gens, **sampler_opts)).cpu()


def png_is_complete(path: str, size: int) -> bool:
    """True if `path` is a PNG that decodes fully to an RGB size x size image."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.format == "PNG" and image.mode == "RGB" and image.size == (size, size)
    except (OSError, SyntaxError, ValueError):
        return False


def temp_path(path: str) -> str:
    """Hidden temporary name next to `path` (not *.png, so no metric ever reads it)."""
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.tmp")


def save_png_atomic(image: torch.Tensor | np.ndarray, path: str) -> None:
    """image: uint8 [3, S, S] -> PNG at `path`, written to a temporary name then renamed."""
    array = image.cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[0] != 3:
        raise ValueError(f"save_png_atomic: expected uint8 [3, H, W], got {array.dtype} {array.shape}")
    tmp = temp_path(path)
    Image.fromarray(np.ascontiguousarray(array.transpose(1, 2, 0))).save(tmp, format="PNG")
    os.replace(tmp, path)


def write_json_atomic(path: str, obj) -> None:
    tmp = temp_path(path)
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
    os.replace(tmp, path)


def export_paths(out_dir: str) -> dict:
    return {"gt": os.path.join(out_dir, "gt", "images"), "tti": os.path.join(out_dir, "tti", "images"),
            "gt_json": os.path.join(out_dir, "gt", "gt_captions.json"),
            "tti_json": os.path.join(out_dir, "tti", "tti_captions.json"),
            "selection": os.path.join(out_dir, "selection.json"),
            "info": os.path.join(out_dir, "export_info.json")}


def export_shard(model, val_set, items: list[ExportItem], out_dir: str, seed: int,
                 sampler_opts: dict, batch_size: int = 64, rank: int = 0, world_size: int = 1,
                 progress: bool = True) -> dict:
    """Write the gt and tti PNGs of items[rank::world_size] that are missing or incomplete.

    Returns {"assigned", "generated", "reused", "seconds"} for this shard (seconds of sampling).
    """
    paths = export_paths(out_dir)
    size = val_set.image_size
    mine = items[rank::world_size]
    for it in mine:
        gt_path = os.path.join(paths["gt"], it.id + ".png")
        if not png_is_complete(gt_path, size):
            save_png_atomic(val_set[it.row][0], gt_path)
    todo = [it for it in mine if not png_is_complete(os.path.join(paths["tti"], it.id + ".png"), size)]
    start = time.perf_counter()
    desc = "export" if world_size == 1 else f"export (rank 0 of {world_size})"
    with tqdm(total=len(mine), initial=len(mine) - len(todo), unit="img", desc=desc,
              disable=not progress) as bar:
        for b in range(0, len(todo), batch_size):
            batch = todo[b:b + batch_size]
            images = generate_items(model, batch, seed, **sampler_opts)
            for it, image in zip(batch, images):
                save_png_atomic(image, os.path.join(paths["tti"], it.id + ".png"))
            bar.update(len(batch))
    return {"assigned": len(mine), "generated": len(todo), "reused": len(mine) - len(todo),
            "seconds": time.perf_counter() - start}


def finalize(items: list[ExportItem], out_dir: str, image_size: int) -> None:
    """After every shard: check each id has both PNGs, drop PNGs of ids beyond n and stray
    temporary files, then write the captions JSONs and selection.json atomically."""
    paths = export_paths(out_dir)
    ids = {it.id for it in items}
    for kind in ("gt", "tti"):
        for name in os.listdir(paths[kind]):
            stem, ext = os.path.splitext(name)
            if (name.startswith(".") and name.endswith(".tmp")) or (ext == ".png" and stem not in ids):
                os.remove(os.path.join(paths[kind], name))  # an earlier, larger --n or a killed write
        bad = [i for i in sorted(ids)
               if not png_is_complete(os.path.join(paths[kind], i + ".png"), image_size)]
        if bad:
            raise RuntimeError(f"export: {len(bad)} {kind} images missing or unreadable after all "
                               f"ranks finished (e.g. {bad[:5]}); rerun to redo them")
    captions = {it.id: it.caption for it in items}
    write_json_atomic(paths["gt_json"], captions)
    write_json_atomic(paths["tti_json"], captions)
    write_json_atomic(paths["selection"], {it.id: {"row": it.row, "image_id": it.image_id,
                                                   "file_name": it.file_name,
                                                   "caption_index": it.caption_index}
                                           for it in items})


def config_summary(cfg, model) -> dict:
    m, t = cfg.model, cfg.text
    summary = {"dataset": cfg.run.dataset, "image_size": cfg.data.image_size, "model": m.kind,
               "text_encoder": t.name, "text_finetuned": t.finetune,
               "generator_parameters": sum(p.numel() for p in model.generator.parameters())}
    if m.kind == "diffusion":
        summary.update(unet_channels=list(m.unet.channels), timesteps=m.diffusion.timesteps,
                       schedule=m.diffusion.schedule, prediction=m.diffusion.prediction)
    return summary


def hardware(device: torch.device, world_size: int) -> str:
    if device.type == "cuda":
        return f"{world_size} x {torch.cuda.get_device_name(device)}"
    return (f"{world_size} CPU process(es), {torch.get_num_threads()} threads each "
            f"({os.cpu_count()} cores, {platform.processor() or platform.machine()})")


def check_settings(info_path: str, settings: dict, overwrite: bool) -> None:
    """Refuse to mix images made with other settings into a resumed export."""
    if overwrite or not os.path.isfile(info_path):
        return
    with open(info_path, encoding="utf-8") as f:
        old = json.load(f).get("settings", {})
    diff = {k: (old.get(k), settings[k]) for k in SETTINGS_KEYS if old.get(k) != settings[k]}
    if diff:
        raise ExportError(f"{os.path.dirname(info_path)} holds images made with other "
                          f"settings (old, new): {diff}. Use another --out-dir, or --overwrite "
                          f"to delete them and start again.")


def parse_args(argv=None):
    from tti.model import PRECISIONS
    from tti.sample import add_sampler_arguments, check_inference_arguments

    p = argparse.ArgumentParser(prog="python -m tti.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint file or run directory")
    p.add_argument("--out-dir", default=None, help="default eval_data_run_<run_idx of the checkpoint>")
    p.add_argument("--n", "--num-samples", dest="n", type=int, default=5000,
                   help="images to export (COCO papers use 30000; capped at the val size). "
                        "Under torchrun write --num-samples (torchrun takes --n for its own)")
    add_sampler_arguments(p)
    p.add_argument("--seed", type=int, default=0, help="picks the val images, captions and noise")
    p.add_argument("--batch-size", type=int, default=64, help="per process")
    p.add_argument("--data-root", default=None, help="default: data.root of the checkpoint's config")
    p.add_argument("--no-ema", action="store_true")
    p.add_argument("--overwrite", action="store_true", help="delete an export made with other settings")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    # fp32 by default: reduced-precision kernels pick their blocking by batch size, so an
    # image would then depend on the batch it was made in, not on its id alone.
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="autocast dtype for the network; anything but fp32 is ~1.5x faster on "
                        "bf16-capable hardware but only deterministic per id up to a few pixel levels")
    args = p.parse_args(argv)
    check_inference_arguments(p, args, {"n": 1, "batch_size": 1})
    if args.data_root is not None and not os.path.isdir(args.data_root):
        p.error(f"--data-root {args.data_root}: no such folder")
    return args


def main(argv=None) -> str:
    args = parse_args(argv)
    from tti.checkpoint import load_checkpoint
    from tti.data.coco import load_split
    from tti.model import load_for_inference
    from tti.sample import sampler_options

    started = time.time()
    info = distributed.setup(args.device)
    model, cfg = load_for_inference(args.checkpoint, info.device, use_ema=not args.no_ema,
                                    precision=args.precision)
    step = int(load_checkpoint(args.checkpoint)["step"])
    out_dir = args.out_dir or f"eval_data_run_{cfg.run.run_idx}"
    d = cfg.data
    root = args.data_root or d.root
    if not os.path.isdir(root):
        raise ExportError(f"data root {root!r} (data.root in the checkpoint's config) not "
                          f"found from {os.getcwd()}; pass --data-root")
    opts = sampler_options(model, cfg, args)
    settings = {"checkpoint": os.path.abspath(args.checkpoint), "checkpoint_step": step,
                "use_ema": not args.no_ema, "sampler_options": opts, "seed": args.seed,
                "data_root": os.path.abspath(root), "val_split": d.val_split,
                "image_size": d.image_size,
                # the resolved autocast dtype: bf16 and fp32 images differ slightly
                "precision": str(model.sample_dtype or torch.float32).replace("torch.", "")}
    paths = export_paths(out_dir)
    # One export per --out-dir: a second would mix its images in, or delete the first's files.
    out_lock = RunLock(out_dir, advice="Or pass another --out-dir.").acquire() if info.is_main else None
    check_settings(paths["info"], settings, args.overwrite)

    # Rank 0 packs the val cache if needed and prepares the folders; the others wait.
    open_val = lambda: load_split(root, d.val_split, d.image_size, cache_dir=d.cache_dir,
                                  seed=args.seed, num_workers=max(1, d.num_workers),
                                  max_bad_fraction=d.max_bad_fraction)
    if info.is_main:
        val_set = open_val()
        if args.overwrite:
            for key in ("gt", "tti"):
                if os.path.isdir(paths[key]):
                    for name in os.listdir(paths[key]):
                        os.remove(os.path.join(paths[key], name))
            for key in ("gt_json", "tti_json", "selection"):
                if os.path.exists(paths[key]):
                    os.remove(paths[key])
        for key in ("gt", "tti"):
            os.makedirs(paths[key], exist_ok=True)
        if args.n > len(val_set):
            print(f"export: --n {args.n} is more than the {len(val_set)} val images; exporting "
                  f"{len(val_set)}")
        write_json_atomic(paths["info"], {"status": "running", "settings": settings})
    distributed.barrier()
    if not info.is_main:
        val_set = open_val()
    items = choose_items(val_set, args.n, args.seed)

    shard = export_shard(model, val_set, items, out_dir, args.seed, opts, args.batch_size,
                         info.rank, info.world_size, progress=info.is_main)
    shards = distributed.all_gather_object(shard)  # also the barrier before finalize
    if info.is_main:
        finalize(items, out_dir, d.image_size)
        generated = sum(s["generated"] for s in shards)
        seconds = max(s["seconds"] for s in shards)
        write_json_atomic(paths["info"], {
            "status": "complete", "settings": settings, "n": len(items), "seed": args.seed,
            "checkpoint": settings["checkpoint"], "checkpoint_step": step,
            "config": config_summary(cfg, model), "sampler_options": opts,
            "data_root": settings["data_root"], "val_split": d.val_split,
            "timings": {"generated": generated, "reused": sum(s["reused"] for s in shards),
                        "sampling_seconds": round(seconds, 3),
                        "images_per_s": round(generated / seconds, 3) if generated else None,
                        "total_seconds": round(time.time() - started, 3),
                        "batch_size_per_process": args.batch_size},
            "hardware": hardware(info.device, info.world_size), "world_size": info.world_size,
            "torch": torch.__version__})
        print(f"export: {len(items)} gt/tti pairs in {out_dir} ({generated} generated, "
              f"{len(items) - generated} kept; {opts})")
    distributed.barrier()
    if out_lock is not None:
        out_lock.release()
    distributed.cleanup()
    return out_dir


if __name__ == "__main__":
    use_free_cpus()  # not in main(): in-process callers (tests) keep their own thread count
    run_cli(main)
