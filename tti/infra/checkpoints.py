"""Checkpoints that cannot be lost: atomic writes, `latest`, keep-last-K, clear load errors.

A checkpoint is one dict (model, ema, optimizer, scaler, step, rng states, config, and the text
encoder's weights or vocabulary when trained) that rebuilds the model alone and resumes
training exactly. It is plain data, loaded with `torch.load(weights_only=True)`: one whose
pickle asks for anything else (a function to call, a class to build) is refused before any of
it runs.

Layout: <run_dir>/checkpoints/0001500.pt plus latest.pt, a hard link to the newest step file
(one write per checkpoint; deleting old step files never breaks it), or a copy where the
filesystem has no hard links.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import os
import pickle
import re
import shutil

import numpy as np
import torch

try:  # numpy 2 moved numpy.core to numpy._core
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy 1.26
    from numpy.core.multiarray import _reconstruct

from tti.infra.atomic_file import fsync_dir, atomic_file, is_temp_file, temp_path
from tti.infra.cli import UserError


STEP_FILES = "[0-9]" * 7 + ".pt"  # 0001500.pt

# All that a weights-only load allows beyond plain data: checkpoints before issue 28 (e.g.
# tests/fixtures/legacy_*.pt) saved np.random.get_state(), whose MT19937 key is a uint32 numpy
# array. These names rebuild exactly that array (no code); today's checkpoints save a list.
LEGACY_SAFE_GLOBALS = [
    (_reconstruct, "numpy._core.multiarray._reconstruct"),  # pickled under numpy 2
    (_reconstruct, "numpy.core.multiarray._reconstruct"),   # pickled under numpy 1
    np.ndarray, np.dtype, np.dtypes.UInt32DType]
PLAIN_DATA = "a tti checkpoint holds only tensors, numbers, strings, lists and dicts"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint could not be written or read; the message names the file and the cause."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint's pickle asks for a global (a function or class) that plain data never needs."""


def unsafe_globals(path: str) -> list:
    """The globals the pickle of checkpoint `path` names beyond torch's weights-only set and
    LEGACY_SAFE_GLOBALS, sorted (e.g. ["posix.system"]), from its opcodes alone: nothing is run.
    [] for a file that is no torch.save zip (the load then says what is wrong)."""
    try:
        with torch.serialization.safe_globals(LEGACY_SAFE_GLOBALS):
            found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # damaged, truncated, not a zip: for load_checkpoint to report
        return []
    return sorted(found)


def refuse_unsafe(path: str) -> None:
    """UnsafeCheckpointError naming the globals when checkpoint `path` asks for more than plain
    data: a cheap look before a launch starts processes that would load it."""
    names = unsafe_globals(path)
    if names:
        raise UnsafeCheckpointError(f"refused to load {path}: its pickle asks for {', '.join(names)}, "
                                    f"which can run code (nothing in it was run; {PLAIN_DATA})")


def _refusal(error: Exception) -> str:
    """What torch's weights-only unpickler refused, in a few words (its wording varies)."""
    text = str(error)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return f"its pickle asks for {found.group(1)}, which can run code"
    found = re.search(r"WeightsUnpickler error: ([^\n]*)", text)
    if found:  # without torch's advice to allow it, which is not ours
        return found.group(1).split(" Please use")[0].rstrip(".")
    return "torch's weights-only unpickler refused it"


def safe_load(path: str, map_location="cpu", mmap: bool = False):
    """torch.load(path, weights_only=True), plus LEGACY_SAFE_GLOBALS: nothing in the file runs.
    UnsafeCheckpointError naming the global a pickle wants beyond that; other errors are torch's."""
    try:
        with torch.serialization.safe_globals(LEGACY_SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, mmap=mmap, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower():
            raise  # a damaged pickle, not a refused one
        refuse_unsafe(path)
        # Refused for what the static scan cannot see (a global's name built at load time).
        raise UnsafeCheckpointError(f"refused to load {path}: {_refusal(e)} (nothing in it was "
                                    f"run; {PLAIN_DATA})") from None


def _disk_full(error: BaseException) -> bool:
    """True if `error`, or an error it wraps, is ENOSPC/EDQUOT (torch.save turns the
    OSError of a failed write into a RuntimeError whose __context__ is the OSError)."""
    for _ in range(8):
        if error is None:
            return False
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        error = error.__cause__ or error.__context__
    return False


def atomic_save(obj, path: str) -> None:
    """torch.save through atomic_file (durable). A full disk raises CheckpointError and leaves
    the old file untouched."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    try:
        with atomic_file(path, "wb", durable=True) as f:
            torch.save(obj, f)
    except BaseException as e:
        if _disk_full(e):
            raise CheckpointError(
                f"disk full (or quota exceeded) while writing checkpoint {path}; the previous "
                f"checkpoint is intact (free space: {shutil.disk_usage(folder).free // 2**20} "
                f"MiB)") from e
        if isinstance(e, (OSError, RuntimeError)) and not isinstance(e, CheckpointError):
            raise CheckpointError(f"could not write checkpoint {path}: {e}") from e
        raise


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def save_checkpoint(state: dict, run_dir: str, step: int, keep_last: int = 3) -> str:
    """Write <step>.pt and point latest.pt at it, both atomically; keep the last `keep_last`.
    Removes the temp files of a killed save first; only one process (rank 0) may save into a
    run directory."""
    folder = checkpoint_dir(run_dir)
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        if is_temp_file(name):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(folder, name))
    path = os.path.join(folder, f"{step:07d}.pt")
    atomic_save(state, path)
    _atomic_link(path, os.path.join(folder, "latest.pt"))
    for old in sorted(glob.glob(os.path.join(folder, STEP_FILES)))[:-keep_last]:
        os.remove(old)
    return path


def _atomic_link(source: str, target: str) -> None:
    """Make `target` the same file as `source` by rename, so a reader sees old or new only."""
    folder = os.path.dirname(os.path.abspath(target))
    tmp = temp_path(target)
    try:
        try:
            os.link(source, tmp)
        except OSError as e:  # no hard links here (some network/FUSE filesystems): copy
            if _disk_full(e):
                raise
            shutil.copyfile(source, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, target)
        fsync_dir(folder)
    except OSError as e:
        if os.path.lexists(tmp):
            os.remove(tmp)
        why = "disk full" if _disk_full(e) else str(e)
        raise CheckpointError(f"could not point {target} at {source} ({why}); "
                              f"the previous {os.path.basename(target)} is intact") from e


def latest_checkpoint(run_dir: str):
    """Path of `latest.pt` in a run directory, or None for a fresh run."""
    path = os.path.join(checkpoint_dir(run_dir), "latest.pt")
    return path if os.path.isfile(path) else None


def checkpoint_file(path: str) -> str:
    """The checkpoint file `path` names: itself, or a run directory's checkpoints/latest.pt.
    CheckpointError when there is none."""
    if os.path.isdir(path):
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"no checkpoints/latest.pt in run directory {path}")
        path = found
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    return path


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Load checkpoint_file(path) onto `map_location`; CheckpointError naming the file and why
    on failure, UnsafeCheckpointError for a file that asks to run code (see safe_load)."""
    path = checkpoint_file(path)
    try:
        state = safe_load(path, map_location=map_location)
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # torch raises many types for a damaged file
        size = os.path.getsize(path)
        others = sorted(glob.glob(os.path.join(os.path.dirname(os.path.abspath(path)), STEP_FILES)))
        others = [os.path.basename(p) for p in others if not os.path.samefile(p, path)]
        hint = f"; other checkpoints in its folder: {', '.join(others[-3:])}" if others else ""
        raise CheckpointError(f"could not load checkpoint {path} ({size} bytes; truncated or "
                              f"damaged?): {type(e).__name__}: {e}{hint}") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a tti checkpoint (holds a {type(state).__name__})")
    missing = [k for k in ("model", "config", "step") if k not in state]
    if missing:
        raise CheckpointError(f"{path} is not a tti checkpoint (missing {', '.join(missing)})")
    return state


def mismatched_keys(expected: dict, found: dict, show: int = 5) -> str:
    """What keeps `found` (name -> tensor) from loading strictly where `expected` is: '' when
    the names and shapes agree, else e.g. "missing a.w, a.b; unexpected c.w; shape d.w
    (3, 4) here, (3, 5) in the checkpoint" (the first `show` of each, and how many)."""
    def names(keys: list) -> str:
        more = f" and {len(keys) - show} more" if len(keys) > show else ""
        return ", ".join(keys[:show]) + more

    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [f"{k} {tuple(expected[k].shape)} here, {tuple(found[k].shape)} in the checkpoint"
              for k in expected if k in found and expected[k].shape != found[k].shape]
    parts = [f"{what} {names(keys)}" for what, keys in
             (("missing", missing), ("unexpected", unexpected), ("shape", shapes)) if keys]
    return "; ".join(parts)
