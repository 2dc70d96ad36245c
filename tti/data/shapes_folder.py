"""Which folders the shapes generator may write into: it never writes over a user's data.

A folder is the generator's if its meta.json (the settings, written before the first image)
says tti.data.shapes; see `check_may_write` for the rule.
"""
from __future__ import annotations

import json
import os

from tti.infra.cli import UserError

META_FILE = "meta.json"  # the generator's settings: its mark on a folder it wrote
LOCK_FILE = ".shapes.lock"  # one generator per folder at a time


class ShapesFolderError(UserError, RuntimeError):
    """The output folder holds files the generator did not write, or a shapes dataset made
    with other settings; nothing in it was changed. The message says what is there."""


def read_meta(out_dir: str) -> dict | None:
    """The generator's meta.json in out_dir, or None if there is none (or not the generator's)."""
    try:
        with open(os.path.join(out_dir, META_FILE)) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("generator") == "tti.data.shapes" else None


def settings(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if k != "complete"}


def is_complete(meta: dict) -> bool:
    return meta.get("complete", True)  # meta.json without the flag was written last, when done


def _describe_contents(out_dir: str, entries: list[str]) -> str:
    """'annotations/captions_train2014.json, train2014/ and 3 more': what a user would recognise."""
    shown = []
    for name in sorted(entries):
        path = os.path.join(out_dir, name)
        if name == "annotations" and os.path.isdir(path):
            shown += [f"annotations/{n}" for n in sorted(os.listdir(path))[:2]]
        else:
            shown.append(name + "/" if os.path.isdir(path) else name)
    more = f" and {len(shown) - 3} more" if len(shown) > 3 else ""
    return ", ".join(shown[:3]) + more


def _settings_diff(old: dict, new: dict) -> str:
    short = lambda v: (json.dumps(v) if len(json.dumps(v)) <= 40 else json.dumps(v)[:37] + "...")
    keys = [k for k in new if old.get(k) != new[k]] + [k for k in old if k not in new]
    return ", ".join(f"{k} {short(old.get(k))} -> {short(new.get(k))}" for k in keys)


def regenerate_command(out_dir: str, meta: dict) -> str:
    """The CLI call that (re)writes out_dir with meta's settings, replacing other settings."""
    return (f"python -m tti.data.shapes --out {out_dir} --train {meta['n_train']} --val {meta['n_val']} "
            f"--size {meta['image_size']} --seed {meta['seed']} "
            f"--captions-per-image {meta['captions_per_image']} --replace")


def check_may_write(out_dir: str, meta: dict, replace: bool) -> dict | None:
    """Raise ShapesFolderError unless out_dir is missing, empty, or a shapes dataset with these
    settings (or, with replace, other settings). Returns the meta.json found there, if any."""
    if not os.path.exists(out_dir):
        return None
    if not os.path.isdir(out_dir):
        raise ShapesFolderError(f"{out_dir} is a file, not a folder: point data.root (or --out) at "
                                f"an empty or missing folder")
    entries = [e for e in os.listdir(out_dir) if e != LOCK_FILE]
    old = read_meta(out_dir)
    if entries and old is None:
        raise ShapesFolderError(
            f"{out_dir} holds {_describe_contents(out_dir, entries)}, not written by the shapes "
            f"generator (it has no {META_FILE} of tti.data.shapes); nothing was changed. Point "
            f"data.root (or --out) at an empty or missing folder, or set data.generate_shapes=false "
            f"to train on the data already there")
    if old is not None and settings(old) != meta and not replace:
        raise ShapesFolderError(
            f"{out_dir} holds a shapes dataset made with other settings ({_settings_diff(old, meta)}); "
            f"nothing was changed. To replace it run `{regenerate_command(out_dir, meta)}` or delete "
            f"the folder; or point data.root (or --out) at another folder")
    return old


def is_shapes_dataset(root: str) -> bool:
    """Whether `root` holds the embedded shapes dataset (whose captions the judge reads)."""
    return os.path.isfile(os.path.join(root, "held_out_pairs.json"))
