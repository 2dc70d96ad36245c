"""Files written by rename: a kill leaves the old file or the new one, never half of one."""
from __future__ import annotations

import contextlib
import json
import os


@contextlib.contextmanager
def atomic_file(path, mode: str = "w"):
    """A temp file beside `path`, open for writing; it replaces `path` when the block ends
    without an error (an error removes it and leaves `path` as it was)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_json(path, obj, **dump_options) -> None:
    """`obj` as UTF-8 JSON at `path`, atomically."""
    with atomic_file(path) as f:
        json.dump(obj, f, ensure_ascii=False, **dump_options)
