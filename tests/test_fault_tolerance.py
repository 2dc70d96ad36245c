"""A training process killed with SIGKILL at random moments and started again on its run
directory ends with bitwise the same weights, EMA, optimizer state and RNG states as a run
never interrupted (CPU, train.deterministic=true). Only checkpointed steps survive a kill, so
the run checkpoints every step; each restart resumes from whatever latest.pt the kill left.
A full disk during a training save stops the run in one line and the relaunch resumes.
Elastic restarts of a multi-process group are tested in test_ddp.py; kills inside a save,
tests/test_checkpoint.py; inside an export, tests/test_export.py."""
import errno
import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from test_checkpoint import half_then
from test_train import TINY

from tti import train
from tti.infra.checkpoints import load_checkpoint
from tti.infra.cli import run_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12
KILLS = 2
SETTINGS = TINY + [f"train.steps={STEPS}", "train.ckpt_every=1", "train.keep_last=2"]


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    from tti.data.shapes import write_coco

    root = tmp_path_factory.mktemp("shapes")
    write_coco(str(root), n_train=96, n_val=16, image_size=32, seed=0)
    return str(root)


def train_args(root, results):
    args = ["--config", "configs/shapes32.yaml", "--device", "cpu",
            "--set", f"data.root={root}", "--set", f"run.results_dir={results}"]
    for item in SETTINGS:
        args += ["--set", item]
    return args


def start(root, results):
    # One thread, like this test process (conftest), so the arithmetic is the same.
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    return subprocess.Popen([sys.executable, "-m", "tti.train"] + train_args(root, results),
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_for_step(proc, log_path, step, timeout=240):
    """Block until log.txt shows `step <step> loss=...` (or later); returns the last step shown."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        done = logged_steps(log_path) if os.path.exists(log_path) else []
        if done and max(done) >= step:
            return max(done)
        time.sleep(0.01)
    raise TimeoutError(f"no step {step} in {log_path} after {timeout}s")


def assert_same_state(a: dict, b: dict) -> None:
    """Two checkpoints hold bitwise the same step, schedule, weights, EMA, optimizer moments
    and RNG states."""
    assert a["step"] == b["step"]
    assert a["scheduler"] == b["scheduler"] and a["ema"]["updates"] == b["ema"]["updates"]
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for name in a["ema"]["shadow"]:
        assert torch.equal(a["ema"]["shadow"][name], b["ema"]["shadow"][name]), name
    for i, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][i][key]), (i, key)
    (rng_a,), (rng_b,) = a["rng"], b["rng"]
    assert torch.equal(rng_a["torch"], rng_b["torch"])
    assert rng_a["python"] == rng_b["python"]
    kind, keys, *rest = rng_a["numpy"]
    assert kind == rng_b["numpy"][0] and np.array_equal(keys, rng_b["numpy"][1])
    assert rest == list(rng_b["numpy"][2:])


def logged_steps(log_path) -> list:
    with open(log_path) as f:
        return [int(s) for s in re.findall(r"^step (\d+) loss=", f.read(), re.M)]


def test_sigkilled_run_resumes_to_bitwise_the_same_state(shapes_root, tmp_path):
    """Killed KILLS times at seeded random moments (past a random step after the last one
    logged, a random fraction of one step's time: mid-step or mid-save, as it saves every
    step), each time relaunched, the run ends bitwise where an uninterrupted one does."""
    straight = train.main(train_args(shapes_root, tmp_path / "straight"))
    rng = random.Random(0)
    run_dir = os.path.join(tmp_path, "killed", "shapes32_diffusion", "0")
    log_path = os.path.join(run_dir, "log.txt")
    for _ in range(KILLS):
        proc = start(shapes_root, tmp_path / "killed")
        before = max(logged_steps(log_path), default=0) if os.path.exists(log_path) else 0
        seen = wait_for_step(proc, log_path, rng.randint(before + 1, before + 2))
        t0 = time.perf_counter()
        seen = wait_for_step(proc, log_path, seen + 1)
        time.sleep(rng.uniform(0.0, time.perf_counter() - t0))  # within the next step, at any speed
        proc.send_signal(signal.SIGKILL)  # no handler, no cleanup: anything may be half-written
        assert proc.wait() == -signal.SIGKILL
        interrupted = torch.load(os.path.join(run_dir, "checkpoints", "latest.pt"),
                                 weights_only=True)  # whole, wherever the kill fell
        assert seen - 1 <= interrupted["step"] < STEPS, (seen, interrupted["step"])

    restart = start(shapes_root, tmp_path / "killed")
    _, err = restart.communicate(timeout=300)
    assert restart.returncode == 0, err.decode()[-3000:]
    with open(log_path) as f:
        resumed_at = [int(s) for s in re.findall(r"resumed from \S+ at step (\d+)", f.read())]
    assert len(resumed_at) == KILLS and resumed_at[-1] == interrupted["step"], resumed_at
    assert not [f for f in os.listdir(os.path.join(run_dir, "checkpoints")) if f.startswith(".tmp")]

    a = torch.load(os.path.join(straight, "checkpoints", "latest.pt"), weights_only=True)
    b = torch.load(os.path.join(run_dir, "checkpoints", "latest.pt"), weights_only=True)
    assert a["step"] == STEPS
    assert_same_state(a, b)


def test_disk_full_during_a_save_stops_in_one_line_and_the_relaunch_resumes(
        shapes_root, tmp_path, monkeypatch, capsys):
    args = train_args(shapes_root, tmp_path) + ["--set", "train.steps=4", "--set",
                                                "train.ckpt_every=2"]
    saves, real_save = [], torch.save
    fill_the_disk = half_then(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))  # wraps real_save

    def second_save_fills_the_disk(obj, f, *rest, **kwargs):
        saves.append(1)
        return (fill_the_disk if len(saves) == 2 else real_save)(obj, f, *rest, **kwargs)
    monkeypatch.setattr(torch, "save", second_save_fills_the_disk)
    with pytest.raises(SystemExit) as stopped:
        run_cli(train.main, args)
    assert stopped.value.code == 1
    err = capsys.readouterr().err
    run_dir = os.path.join(tmp_path, "shapes32_diffusion", "0")
    step_4 = os.path.join(run_dir, "checkpoints", "0000004.pt")
    assert f"error: disk full (or quota exceeded) while writing checkpoint {step_4}; the " \
           f"previous checkpoint is intact" in err and "Traceback" not in err, err[-2000:]
    assert sorted(os.listdir(os.path.dirname(step_4))) == ["0000002.pt", "latest.pt"]

    monkeypatch.undo()  # space freed: the same command again
    assert train.main(args) == run_dir
    with open(os.path.join(run_dir, "log.txt")) as f:
        assert "at step 2" in f.read().split("resumed from")[-1]
    assert load_checkpoint(run_dir)["step"] == 4
