"""Files written by rename, the one way tti writes a file that something else may read
(configs, records, exported PNGs, checkpoints, caches): a kill leaves the old file or the new
one, never half of one."""
from __future__ import annotations

import contextlib
import json
import os


def temp_path(path) -> str:
    """The hidden temp name beside `path` (`.<name>.tmp-<pid>`: no glob of `*.png` or
    `*.pt` matches it, and `is_temp_file` finds strays)."""
    folder, name = os.path.split(os.fspath(path))
    return os.path.join(folder, f".{name}.tmp-{os.getpid()}")


def is_temp_file(name: str) -> bool:
    """Whether a file name is one of temp_path's (left behind by a killed write)."""
    return name.startswith(".") and ".tmp-" in name


def fsync_dir(folder: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_file(path, mode: str = "w", durable: bool = False):
    """A temp file beside `path`, open for writing, that replaces `path` when the block ends
    without an error (an error removes it). durable: fsync the file and its folder too, so a
    power loss cannot lose the rename (checkpoints)."""
    tmp = temp_path(path)
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable:
            fsync_dir(os.path.dirname(os.path.abspath(path)))
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_json(path, obj, **dump_options) -> None:
    """`obj` as UTF-8 JSON at `path`, atomically."""
    with atomic_file(path) as f:
        json.dump(obj, f, ensure_ascii=False, **dump_options)
