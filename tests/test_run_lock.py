"""One writer per run directory, with real processes: a second launch fails fast naming the
holder and touches nothing; a SIGKILLed holder leaves no stale lock; of processes racing for
a free lock exactly one wins; an export into a held --out-dir is refused the same way.
(A SIGKILLed *training* run relaunched on its own run directory: tests/test_fault_tolerance.py.)"""
import errno
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
from test_train import TINY

from tti import export, train
from tti.infra import run_lock
from tti.infra.run_lock import LOCK_FILE, RunLock, RunLockedError, lock_run_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
# Takes the run lock as tti.train does, says so, then holds it until killed.
HOLDER = ("import sys, time\nfrom tti.infra.run_lock import lock_run_dir\n"
          "lock_run_dir(sys.argv[1])\nprint('locked', flush=True)\ntime.sleep(600)\n")
# Waits for a common start time, then tries the lock once: "won" (and holds it) or "lost <why>".
RACER = ("import sys, time\nfrom tti.infra.run_lock import RunLock, RunLockedError\n"
         "time.sleep(max(0.0, float(sys.argv[2]) - time.time()))\n"
         "try:\n    RunLock(sys.argv[1]).acquire()\nexcept RunLockedError as e:\n"
         "    print('lost', e, flush=True)\n    sys.exit(0)\n"
         "print('won', flush=True)\ntime.sleep(600)\n")


def start_holder(run_dir):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, run_dir], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def tree_digest(root):
    """relative path -> md5 of every file under root (and '/' for every folder)."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for d in dirs:
            out[os.path.relpath(os.path.join(folder, d), root)] = "/"
        for f in files:
            with open(os.path.join(folder, f), "rb") as fh:
                out[os.path.relpath(os.path.join(folder, f), root)] = hashlib.md5(fh.read()).hexdigest()
    return out


def train_args(root, results, *extra):
    args = ["--config", "configs/shapes32.yaml", "--device", "cpu",
            "--set", f"data.root={root}", "--set", f"run.results_dir={results}"]
    for item in TINY + ["train.steps=2", "train.ckpt_every=2"] + list(extra):
        args += ["--set", item]
    return args


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(shapes root, results dir, run dir) of a finished 2-step tiny run."""
    from tti.data.shapes import write_coco

    root = str(tmp_path_factory.mktemp("shapes"))
    write_coco(root, n_train=96, n_val=16, image_size=32, seed=0)
    results = str(tmp_path_factory.mktemp("results"))
    return root, results, train.main(train_args(root, results))


def test_second_launch_fails_fast_naming_the_holder_and_touches_nothing(trained):
    root, results, run_dir = trained
    holder = start_holder(run_dir)
    try:
        before = tree_digest(run_dir)
        t0 = time.perf_counter()
        second = subprocess.run([sys.executable, "-m", "tti.train"] + train_args(root, results),
                                cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
        seconds = time.perf_counter() - t0
    finally:
        holder.kill()
        holder.wait()
    assert second.returncode != 0
    assert f"process {holder.pid} on host {socket.gethostname()}" in second.stderr, second.stderr[-2000:]
    assert "is in use" in second.stderr and "another run.run_idx" in second.stderr
    assert tree_digest(run_dir) == before  # checkpoints, config.yaml, log.txt: not a byte changed
    assert "run directory" not in second.stdout  # failed before its first log line, data, model
    assert seconds < 120, seconds  # mostly `import torch` (seconds on an idle box)


def test_sigkilled_holder_leaves_no_stale_lock_and_the_run_resumes(trained, tmp_path):
    root, results, _ = trained
    shutil.copytree(results, tmp_path / "results")
    run_dir = os.path.join(tmp_path, "results", "shapes32_diffusion", "0")
    holder = start_holder(run_dir)
    with pytest.raises(RunLockedError, match=f"process {holder.pid} on host"):
        train.main(train_args(root, tmp_path / "results", "train.steps=4"))
    holder.send_signal(signal.SIGKILL)  # no handler, no cleanup
    assert holder.wait() == -signal.SIGKILL
    assert train.main(train_args(root, tmp_path / "results", "train.steps=4")) == run_dir
    with open(os.path.join(run_dir, "log.txt")) as f:
        assert "at step 2" in f.read().split("resumed from")[-1]
    assert os.path.exists(os.path.join(run_dir, "checkpoints", "0000004.pt"))
    with open(os.path.join(run_dir, LOCK_FILE)) as f:
        assert f.read() == ""  # released at the end of the run, holder record cleared


@pytest.mark.parametrize("round_", range(3))
def test_racing_processes_exactly_one_wins(tmp_path, round_):
    at = f"{time.time() + 1.0:.3f}"  # after every racer has started
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(tmp_path), at], cwd=REPO, env=ENV,
                               stdout=subprocess.PIPE, text=True) for _ in range(4)]
    try:
        lines = [r.stdout.readline().strip() for r in racers]
    finally:
        for r in racers:
            r.kill()
            r.wait()
    winners = [r.pid for r, line in zip(racers, lines) if line == "won"]
    assert len(winners) == 1, lines
    losers = [line for line in lines if line.startswith("lost")]
    assert len(losers) == 3 and all(f"process {winners[0]} on host" in line for line in losers), lines


def test_restarted_torchrun_group_waits_for_the_old_holder(tmp_path, monkeypatch):
    holder = start_holder(str(tmp_path))
    timer = subprocess.Popen(["sh", "-c", f"sleep 1; kill -9 {holder.pid}"])
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    try:
        lock = lock_run_dir(str(tmp_path))  # a first launch would fail; a restart waits it out
    finally:
        timer.wait()
        holder.wait()
    lock.release()


def test_lock_left_by_a_run_that_raised_in_this_process_is_taken_over(tmp_path):
    leaked = lock_run_dir(str(tmp_path))  # e.g. train.main raised; its frame lives in a traceback
    again = lock_run_dir(str(tmp_path))
    assert leaked._fd is None
    probe = subprocess.run([sys.executable, "-c", RACER, str(tmp_path), "0"], cwd=REPO, env=ENV,
                           capture_output=True, text=True, timeout=60)
    assert probe.stdout.startswith(f"lost {tmp_path} is in use: process {os.getpid()} on host")
    again.release()


def test_filesystem_without_locks_warns_and_goes_on(tmp_path, monkeypatch, capsys):
    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(run_lock.fcntl, "lockf", no_locks)
    RunLock(str(tmp_path)).acquire().release()
    assert "does not support locks" in capsys.readouterr().err


def test_export_into_a_held_out_dir_is_refused(trained, tmp_path):
    _, _, run_dir = trained
    out = tmp_path / "eval"
    holder = start_holder(str(out))
    try:
        with pytest.raises(RunLockedError, match=f"process {holder.pid} on host .*another --out-dir"):
            export.main(["--checkpoint", run_dir, "--out-dir", str(out), "--n", "2", "--device", "cpu"])
    finally:
        holder.kill()
        holder.wait()
    assert os.listdir(out) == [LOCK_FILE]
