"""An export folder: what `tti.export` writes and `tti.evaluate` reads, written so that a
killed export resumes and never leaves a half-written image a metric could read.

    <out-dir>/{gt,tti}/images/<id>.png   {gt,tti}/{gt,tti}_captions.json   {"<id>": "<caption>"}
    <out-dir>/selection.json             {"<id>": {"row", "image_id", "file_name", "caption_index"}}
    <out-dir>/export_info.json           settings, config summary, timings (`tti.export`)
"""
from __future__ import annotations

import json
import os
import time

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from tti.eval.items import ExportItem, generate_items
from tti.infra.atomic_file import atomic_file, is_temp_file, write_json
from tti.infra.cli import UserError

SETTINGS_KEYS = ("checkpoint", "checkpoint_step", "use_ema", "sampler_options", "seed",
                 "data_root", "val_split", "image_size", "precision")


class ExportError(UserError, ValueError):
    """An export folder that cannot be written, resumed or read as one; the message says why."""


def png_is_complete(path: str, size: int) -> bool:
    """True if `path` is a PNG that decodes fully to an RGB size x size image."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.format == "PNG" and image.mode == "RGB" and image.size == (size, size)
    except (OSError, SyntaxError, ValueError):
        return False


def save_png(image: torch.Tensor | np.ndarray, path: str) -> None:
    """image: uint8 [3, S, S] -> PNG at `path`, atomically."""
    array = image.cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[0] != 3:
        raise ValueError(f"save_png: expected uint8 [3, H, W], got {array.dtype} {array.shape}")
    with atomic_file(path, "wb") as f:
        Image.fromarray(np.ascontiguousarray(array.transpose(1, 2, 0))).save(f, format="PNG")


def export_paths(out_dir: str) -> dict:
    return {"gt": os.path.join(out_dir, "gt", "images"), "tti": os.path.join(out_dir, "tti", "images"),
            "gt_json": os.path.join(out_dir, "gt", "gt_captions.json"),
            "tti_json": os.path.join(out_dir, "tti", "tti_captions.json"),
            "selection": os.path.join(out_dir, "selection.json"),
            "info": os.path.join(out_dir, "export_info.json")}


def export_shard(model, val_set, items: list[ExportItem], out_dir: str, seed: int,
                 sampler_opts: dict, batch_size: int = 64, rank: int = 0, world_size: int = 1,
                 progress: bool = True) -> dict:
    """Write the gt and tti PNGs of items[rank::world_size] that are missing or incomplete;
    returns {"assigned", "generated", "reused", "seconds"} for this shard (seconds of sampling)."""
    paths = export_paths(out_dir)
    size = val_set.image_size
    mine = items[rank::world_size]
    for it in mine:
        gt_path = os.path.join(paths["gt"], it.id + ".png")
        if not png_is_complete(gt_path, size):
            save_png(val_set[it.row][0], gt_path)
    todo = [it for it in mine if not png_is_complete(os.path.join(paths["tti"], it.id + ".png"), size)]
    start = time.perf_counter()
    desc = "export" if world_size == 1 else f"export (rank 0 of {world_size})"
    with tqdm(total=len(mine), initial=len(mine) - len(todo), unit="img", desc=desc,
              disable=not progress) as bar:
        for b in range(0, len(todo), batch_size):
            batch = todo[b:b + batch_size]
            images = generate_items(model, batch, seed, **sampler_opts)
            for it, image in zip(batch, images):
                save_png(image, os.path.join(paths["tti"], it.id + ".png"))
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
            if is_temp_file(name) or (ext == ".png" and stem not in ids):
                os.remove(os.path.join(paths[kind], name))  # an earlier, larger --n or a killed write
        bad = [i for i in sorted(ids)
               if not png_is_complete(os.path.join(paths[kind], i + ".png"), image_size)]
        if bad:
            raise RuntimeError(f"export: {len(bad)} {kind} images missing or unreadable after all "
                               f"ranks finished (e.g. {bad[:5]}); rerun to redo them")
    captions = {it.id: it.caption for it in items}
    write_json(paths["gt_json"], captions, indent=1)
    write_json(paths["tti_json"], captions, indent=1)
    fields = ("row", "image_id", "file_name", "caption_index")
    write_json(paths["selection"], {it.id: {k: getattr(it, k) for k in fields} for it in items},
               indent=1)


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
