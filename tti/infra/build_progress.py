"""Progress of a long array build that a kill must not lose (the text and latent stores): an
fp16 memory-mapped array in a `.partial` folder, and progress.json, {job, done}, saved as
work is flushed. A relaunch of the same job resumes at `done`; any other job starts afresh.
The finished folder then takes the store's place (`swap_in`)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from tti.infra.atomic_file import write_json

PROGRESS_FILE = "progress.json"


def resume_point(partial: str, job: str, array_file: str, shape: tuple) -> int | None:
    """Rows of `partial`/`array_file` that a killed build of this same `job` finished, or None
    (start afresh: another job, another shape, or nothing readable)."""
    try:
        state = json.loads(Path(partial, PROGRESS_FILE).read_text(encoding="utf-8"))
        array = np.load(os.path.join(partial, array_file), mmap_mode="r")
        ok = state["job"] == job and array.shape == shape and array.dtype == np.float16
        del array
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return int(state["done"]) if ok else None


def open_array(partial: str, job: str, array_file: str,
               shape: tuple) -> tuple[np.ndarray, int | None]:
    """The build's fp16 array, memory-mapped for writing, and the rows a killed build of this
    same `job` finished (see resume_point); None starts afresh: a new array, progress cleared."""
    done = resume_point(partial, job, array_file, shape)
    os.makedirs(partial, exist_ok=True)
    path = os.path.join(partial, array_file)
    if done is None:
        clear_progress(partial)
        return np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=shape), None
    return np.lib.format.open_memmap(path, mode="r+"), done


def save_progress(partial: str, job: str, done: int) -> None:
    """Record that `done` rows of `job` are flushed to disk."""
    write_json(os.path.join(partial, PROGRESS_FILE), {"job": job, "done": done})


def clear_progress(partial: str) -> None:
    Path(partial, PROGRESS_FILE).unlink(missing_ok=True)


def swap_in(partial: str, folder: str) -> None:
    """Put the finished `partial` where `folder` is: a rename, with an old store moved away
    first (ranks that still map its files keep reading them until they reopen)."""
    old = f"{folder}.old-{os.getpid()}"
    if os.path.isdir(folder):
        os.rename(folder, old)
    os.rename(partial, folder)
    shutil.rmtree(old, ignore_errors=True)
