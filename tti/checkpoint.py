"""Checkpoints that cannot be lost: atomic writes, `latest`, keep-last-K, clear load errors.

A checkpoint is one dict: model, ema, optimizer, scaler, step, rng states, config (and the
text encoder's weights or vocabulary when they are trained). It rebuilds the model with no
other file and resumes training exactly.

Layout: <run_dir>/checkpoints/0001500.pt plus latest.pt (a full copy, so that deleting old
step files never breaks `latest`).
"""
from __future__ import annotations

import errno
import glob
import os
import shutil
import tempfile

import torch


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the file and the cause."""


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(obj, path: str) -> None:
    """torch.save to a temp file in the same folder, fsync, then rename over `path`.

    A kill at any moment leaves either the old file or the new one, never half of one.
    A full disk raises CheckpointError and leaves the old file untouched.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(folder)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise CheckpointError(
                f"disk full while writing checkpoint {path}; the previous checkpoint is intact "
                f"(free space: {shutil.disk_usage(folder).free // 2**20} MiB)") from e
        if isinstance(e, (OSError, RuntimeError)) and not isinstance(e, CheckpointError):
            raise CheckpointError(f"could not write checkpoint {path}: {e}") from e
        raise


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def step_checkpoints(run_dir: str) -> list:
    """Step-numbered checkpoint files, oldest first."""
    return sorted(glob.glob(os.path.join(checkpoint_dir(run_dir), "[0-9]" * 7 + ".pt")))


def save_checkpoint(state: dict, run_dir: str, step: int, keep_last: int = 3) -> str:
    """Write <step>.pt and latest.pt atomically, then prune all but the last `keep_last`."""
    folder = checkpoint_dir(run_dir)
    path = os.path.join(folder, f"{step:07d}.pt")
    atomic_save(state, path)
    atomic_save(state, os.path.join(folder, "latest.pt"))
    for old in step_checkpoints(run_dir)[:-keep_last]:
        os.remove(old)
    return path


def latest_checkpoint(run_dir: str):
    """Path of `latest.pt` in a run directory, or None for a fresh run."""
    path = os.path.join(checkpoint_dir(run_dir), "latest.pt")
    return path if os.path.isfile(path) else None


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Load a checkpoint anywhere (a GPU checkpoint loads on CPU); say which file and why on failure.

    `path` may be a checkpoint file or a run directory (its latest.pt is used).
    """
    if os.path.isdir(path):
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"no checkpoints/latest.pt in run directory {path}")
        path = found
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        # weights_only=False: the checkpoint holds numpy/python RNG states and the config dict.
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # torch raises many types for a damaged file
        raise CheckpointError(f"could not load checkpoint {path}: {type(e).__name__}: {e}") from e
    missing = [k for k in ("model", "config", "step") if k not in state]
    if missing:
        raise CheckpointError(f"{path} is not a tti checkpoint (missing {', '.join(missing)})")
    return state


def rng_state() -> dict:
    """Every random state a resumed run needs: python, numpy, torch CPU and CUDA."""
    import random

    import numpy as np

    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
