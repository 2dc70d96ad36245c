"""One writer per folder: an OS lock a run holds from before its first write until it exits.

On a held folder, rank 0 of `python -m tti.train` (run directory) and `python -m tti.export`
(--out-dir) fail at once, naming the holder's host, PID, start time and command, which it
writes into <folder>/run.lock; the shapes generator, image-cache packer and text store wait.

- fcntl.lockf locks die with their process, SIGKILL included, so a relaunch or torchrun's
  restarted group takes a killed run's lock back. Unlike flock() they are not inherited across
  fork(), so a killed rank 0's DataLoader workers cannot keep its lock alive. Closing any
  descriptor of the lock file drops the holder's lock, so only this module opens it.
- NFSv4 (in the protocol) and NFSv3 (lockd) hold them across nodes, unless mounted `nolock` or
  `local_lock=posix|all`. A crashed node's locks are freed when its lease ends (NFSv4: 90 s
  by default), so a restarted torchrun group waits up to RESTART_WAIT_S.
- Where a filesystem refuses locks (ENOLCK, ENOSYS, EOPNOTSUPP: Lustre without flock, some
  FUSE) the run goes on unprotected after a warning on stderr; on Windows (no fcntl), silently.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import time

from tti.infra.cli import UserError

try:
    import fcntl
except ImportError:  # Windows: no POSIX locks, runs go unprotected
    fcntl = None

LOCK_FILE = "run.lock"
RESTART_WAIT_S = 120.0
_POLL_S = 0.2
_NO_LOCKING = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}
_HELD: dict[str, "RunLock"] = {}  # lock file (real path) -> this process's lock on it


class RunLockedError(UserError, RuntimeError):
    """Another live process holds a folder's lock; the message names its host and PID."""


class RunLock:
    """An exclusive lock on <folder>/<file_name>, held from acquire() until release() or the
    process ends. `advice` ends the RunLockedError message (what to do instead)."""

    def __init__(self, folder: str, file_name: str = LOCK_FILE, advice: str = ""):
        self.folder, self.advice = folder, advice
        self.path = os.path.join(folder, file_name)
        self._fd: int | None = None

    def acquire(self, wait_s: float = 0.0) -> "RunLock":
        """Take the lock, waiting up to wait_s seconds (math.inf: until it is free); creates the
        folder if needed. RunLockedError naming the holder if it is still held after wait_s."""
        if fcntl is None:
            return self
        os.makedirs(self.folder, exist_ok=True)
        key = os.path.realpath(self.path)
        stale = _HELD.pop(key, None)
        if stale is not None:  # ours, never released: a run that raised, kept alive by its traceback
            stale.release()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            self._wait_for(fd, wait_s)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        _HELD[key] = self
        _write_holder(fd)
        return self

    def _wait_for(self, fd: int, wait_s: float) -> None:
        deadline, told = time.monotonic() + wait_s, False
        while not _try_lock(fd, self.path):
            if time.monotonic() >= deadline:
                raise RunLockedError(f"{self.folder} is in use: {_describe_holder(self.path)} "
                                     f"holds its lock {self.path}. Wait for that process to "
                                     f"finish or stop it (a killed process releases the lock "
                                     f"by itself). {self.advice}".rstrip())
            if not told:
                print(f"waiting for {_describe_holder(self.path)} to release {self.path}",
                      file=sys.stderr, flush=True)
                told = True
            time.sleep(_POLL_S)

    def release(self) -> None:
        """Let the lock go (also done by the OS when the process ends). Idempotent."""
        if self._fd is None:
            return
        key = os.path.realpath(self.path)
        if _HELD.get(key) is self:
            del _HELD[key]
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)  # a finished run leaves no holder behind in the file
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "RunLock":  # `with RunLock(folder).acquire(): ...`
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _try_lock(fd: int, path: str) -> bool:
    """True if this process now holds the lock (or the filesystem has none), False if held."""
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EAGAIN):
            return False
        if e.errno not in _NO_LOCKING:
            raise
        reason = os.strerror(e.errno)
    print(f"warning: the filesystem of {path} does not support locks ({reason}): "
          f"a second launch on this folder would not be stopped", file=sys.stderr, flush=True)
    return True


def _write_holder(fd: int) -> None:
    record = {"host": socket.gethostname(), "pid": os.getpid(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
              "command": _short(" ".join([os.path.basename(sys.orig_argv[0])] + sys.orig_argv[1:]))}
    data = (json.dumps(record) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)  # other NFS clients read it on open only once it is on the server


def _short(text: str, limit: int = 120) -> str:
    text = " ".join(text.split())  # one line, even for `python -c "<script>"`
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _read_holder(path: str, wait_s: float = 1.0) -> dict | None:
    """The {host, pid, started, command} record in lock file `path`, or None, waiting up to
    wait_s for a holder that has locked but not yet written it. Never call it in the holding
    process: closing the file would drop the lock."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with open(path, encoding="utf-8") as f:
                record = json.loads(f.read() or "null")
            if isinstance(record, dict):
                return record
        except (OSError, ValueError):
            pass
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)


def _describe_holder(path: str) -> str:
    """'process 123 on host h (since ..., running: ...)', from the lock file `path`."""
    record = _read_holder(path)
    if record is None:
        return "another process (its lock file names none)"
    return (f"process {record.get('pid')} on host {record.get('host')} (since "
            f"{record.get('started')}, running: {record.get('command')})")


def lock_run_dir(run_dir: str) -> RunLock:
    """The training lock on run_dir, for rank 0 to take before it writes anything there. Fails
    at once if held; a restarted torchrun group (TORCHELASTIC_RESTART_COUNT > 0) waits up to
    RESTART_WAIT_S, for a crashed node's lock to expire on shared storage."""
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0
    lock = RunLock(run_dir, advice="To train alongside it, give this launch another run.run_idx.")
    return lock.acquire(RESTART_WAIT_S if restarted else 0.0)

