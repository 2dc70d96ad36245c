"""Export images for the metrics: ground-truth val images and one generated image per caption.

    python -m tti.export --checkpoint results/shapes32_diffusion/0 --out-dir eval_data_run_0
    torchrun --standalone --nproc_per_node=8 -m tti.export --checkpoint CKPT --num-samples 30000
    bash gen_images_for_metrics.sh $gpu_ids $run_idx $pretrained_model_path   # the same, launched

--checkpoint takes a checkpoint file, a run directory (its latest.pt) or a release folder
(`python -m tti.release`), which exports the same images as the checkpoint it came from.

writes, with ids 000000, 000001, ... equal to the file stems:

    <out-dir>/gt/images/<id>.png    gt/gt_captions.json    {"<id>": "<caption>"}
    <out-dir>/tti/images/<id>.png   tti/tti_captions.json  (the same captions)
    <out-dir>/selection.json        {"<id>": {"row", "image_id", "file_name", "caption_index"}}
    <out-dir>/export_info.json      checkpoint, config summary, sampler options, n, seed,
                                    data root, timings, hardware (read by `python -m tti.evaluate`)

`--protocol coco-fid30k` makes the export the published COCO 256 table's (U-ViT, LDM): 30,000
items and a 256 px model required; `python -m tti.evaluate` then scores it against the whole
val split (tti/eval/protocols.py). The default, `pairs`, is today's.

Ground truth comes from the packed val cache, resized exactly as training saw it. The val
images are a seeded random subset (a larger n extends a smaller one), each with one caption
drawn from the seed. Image <id> is sampled with a generator seeded from (seed, id): its pixels
depend on neither the batch size nor the number of processes (exactly on CPU; on GPU up to
the last bits). Under torchrun rank r does ids r::world. A rerun with the same settings
resumes, redoing only missing or unreadable PNGs (written under a temporary name, renamed).
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from tti.config.registry import model_label, samplers
from tti.data.coco import load_split
from tti.eval.export_folder import ExportError, check_settings, export_paths, export_shard, finalize
from tti.eval.items import choose_items
from tti.eval.protocols import PROTOCOLS, check_image_size
from tti.infra import distributed
from tti.infra.atomic_file import write_json
from tti.infra.cli import run_cli
from tti.infra.precision import PRECISIONS
from tti.infra.release_folder import load_inference_state
from tti.infra.run_lock import RunLock
from tti.infra.threads import use_free_cpus
from tti.models.text_to_image import model_from_state
from tti.sample import add_sampler_arguments, check_inference_arguments, sampler_options


def config_summary(cfg, model) -> dict:
    """What export_info.json says of the model: read by tti.evaluate's Model column."""
    return {"dataset": cfg.run.dataset, "image_size": cfg.data.image_size,
            "model": cfg.model.kind, "label": model_label(cfg), "samplers": list(samplers(cfg)),
            "text_encoder": cfg.text.name,
            "text_finetuned": cfg.text.finetune, "model_config": cfg.model.to_dict(),
            "image_model_parameters": sum(p.numel() for p in model.image_model.parameters())}


def hardware(device: torch.device, world_size: int) -> str:
    if device.type == "cuda":
        return f"{world_size} x {torch.cuda.get_device_name(device)}"
    return (f"{world_size} CPU process(es), {torch.get_num_threads()} threads each "
            f"({os.cpu_count()} cores, {platform.processor() or platform.machine()})")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m tti.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint file, run directory or release folder (python -m tti.release)")
    p.add_argument("--out-dir", default=None, help="default eval_data_run_<run_idx of the checkpoint>")
    p.add_argument("--n", "--num-samples", dest="n", type=int, default=None,
                   help="images to export (default 5000, or the protocol's; capped at the val "
                        "size). Under torchrun write --num-samples (torchrun takes --n for its own)")
    p.add_argument("--protocol", choices=tuple(PROTOCOLS), default="pairs",
                   help="coco-fid30k: the published COCO 256 protocol (30,000 val captions, a "
                        "256 px model; see tti/eval/protocols.py). Default %(default)s")
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
                   help="autocast dtype for the network; anything but fp32 is faster on "
                        "bf16-capable hardware but only deterministic per id up to a few pixel levels")
    args = p.parse_args(argv)
    protocol_n = PROTOCOLS[args.protocol].n
    if args.n is not None and protocol_n is not None and args.n != protocol_n:
        p.error(f"--protocol {args.protocol} exports {protocol_n} images; leave out --n")
    args.n = args.n if args.n is not None else protocol_n or 5000
    check_inference_arguments(p, args, {"n": 1, "batch_size": 1})
    if args.data_root is not None and not os.path.isdir(args.data_root):
        p.error(f"--data-root {args.data_root}: no such folder")
    return args


def main(argv=None) -> str:
    args = parse_args(argv)
    started = time.time()
    info = distributed.setup(args.device)
    state = load_inference_state(args.checkpoint)
    step = int(state["step"])
    model, cfg = model_from_state(state, args.checkpoint, info.device, use_ema=not args.no_ema,
                                  precision=args.precision)
    del state  # its tensors now live in the model
    out_dir = args.out_dir or f"eval_data_run_{cfg.run.run_idx}"
    d = cfg.data
    check_image_size(PROTOCOLS[args.protocol], d.image_size)
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
        write_json(paths["info"], {"status": "running", "settings": settings}, indent=1)
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
        write_json(paths["info"], {
            "status": "complete", "settings": settings, "n": len(items), "seed": args.seed,
            "protocol": args.protocol,
            "checkpoint": settings["checkpoint"], "checkpoint_step": step,
            "config": config_summary(cfg, model), "sampler_options": opts,
            "data_root": settings["data_root"], "val_split": d.val_split,
            "timings": {"generated": generated, "reused": sum(s["reused"] for s in shards),
                        "sampling_seconds": round(seconds, 3),
                        "images_per_s": round(generated / seconds, 3) if generated else None,
                        "total_seconds": round(time.time() - started, 3),
                        "batch_size_per_process": args.batch_size},
            "hardware": hardware(info.device, info.world_size), "world_size": info.world_size,
            "torch": torch.__version__}, indent=1)
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
