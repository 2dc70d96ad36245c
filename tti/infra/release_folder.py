"""A release: the folder a user shares instead of a training checkpoint; nothing in it is unpickled.

    <folder>/model.safetensors   the weights sampling uses (tensors only: safetensors cannot
                                 carry code), under the names a checkpoint's "model" has
    <folder>/config.json         {"format": "tti.release/1", "step", "images_seen", "weights":
                                 "ema" | "model", "text_vocab", "config"}
    <folder>/README.md           the model card (tti/release.py writes all three)
"""
from __future__ import annotations

import json
import os

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from tti.infra.atomic_file import atomic_file
from tti.infra.checkpoints import CheckpointError, load_checkpoint

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
RELEASE_FORMAT = "tti.release/1"


def is_release_folder(path: str) -> bool:
    return all(os.path.isfile(os.path.join(path, name)) for name in (WEIGHTS_FILE, CONFIG_FILE))


def write_release_files(folder: str, weights: dict, meta: dict, card: str) -> None:
    """Write model.safetensors (`weights`: name -> tensor), config.json (`meta`) and README.md
    (`card`) into `folder`, each atomically."""
    other = [k for k, v in weights.items() if not isinstance(v, torch.Tensor)]
    if other:  # safetensors stores tensors alone; anything else belongs in config.json
        raise ValueError(f"release weights must be tensors; not: {', '.join(other[:5])}")
    os.makedirs(folder, exist_ok=True)
    # Own contiguous copies: safetensors refuses tensors that share memory (tied weights).
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in weights.items()}
    with atomic_file(os.path.join(folder, WEIGHTS_FILE), "wb", durable=True) as f:
        f.write(save(tensors, metadata={"format": "pt"}))
    with atomic_file(os.path.join(folder, CONFIG_FILE), "w", durable=True) as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    with atomic_file(os.path.join(folder, CARD_FILE), "w", durable=True) as f:
        f.write(card)


def _read_meta(folder: str) -> dict:
    path = os.path.join(folder, CONFIG_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"could not read release {path}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != RELEASE_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{path} is not a tti release config (format {found!r}, expected "
                              f"{RELEASE_FORMAT!r}; `python -m tti.release` writes one)")
    missing = [k for k in ("config", "step", "weights") if k not in meta]
    if missing:
        raise CheckpointError(f"{path} is not a tti release config (missing {', '.join(missing)})")
    return meta


def read_release(folder: str) -> dict:
    """A release folder -> {"model", "config", "step", "text_vocab", "release"}, weights on CPU.
    CheckpointError naming the file for a missing, damaged or foreign part."""
    meta = _read_meta(folder)
    path = os.path.join(folder, WEIGHTS_FILE)
    try:
        weights = load_file(path, device="cpu")
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"could not read release weights {path} ({os.path.getsize(path)} "
                              f"bytes; truncated or damaged?): {e}") from None
    return {"model": weights, "config": meta["config"], "step": int(meta["step"]),
            "text_vocab": meta.get("text_vocab"), "release": meta}


def load_inference_state(path: str) -> dict:
    """What sampling needs from `path` (a release folder, or a checkpoint file or run directory)
    as one dict: "model" (name -> tensor), "config", "step", "text_vocab" (and a release's
    "release", its config.json)."""
    if os.path.isdir(path) and is_release_folder(path):
        return read_release(path)
    return load_checkpoint(path, map_location="cpu")

