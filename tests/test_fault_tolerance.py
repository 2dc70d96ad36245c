"""A training process killed with SIGKILL mid-run and started again on its run directory ends
with bitwise the same weights, EMA, optimizer state and RNG states as a run never interrupted
(CPU, train.deterministic=true). Only checkpointed steps survive a kill, so the run
checkpoints every step; the restart resumes from whatever latest.pt the kill left.
Elastic restarts of a multi-process group are tested in test_ddp.py."""
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
from test_train import TINY

from tti import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12
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
    """Block until log.txt shows `step <step> loss=...` (or later)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        if os.path.exists(log_path):
            done = [int(s) for s in re.findall(r"^step (\d+) loss=", open(log_path).read(), re.M)]
            if done and max(done) >= step:
                return max(done)
        time.sleep(0.01)
    raise TimeoutError(f"no step {step} in {log_path} after {timeout}s")


def test_sigkilled_run_resumes_to_bitwise_the_same_state(shapes_root, tmp_path):
    straight = train.main(train_args(shapes_root, tmp_path / "straight"))

    kill_at = random.Random(0).randint(2, STEPS // 2)
    proc = start(shapes_root, tmp_path / "killed")
    run_dir = os.path.join(tmp_path, "killed", "shapes32_diffusion", "0")
    seen = wait_for_step(proc, os.path.join(run_dir, "log.txt"), kill_at)
    proc.send_signal(signal.SIGKILL)  # no handler, no cleanup: anything may be half-written
    assert proc.wait() == -signal.SIGKILL
    interrupted = torch.load(os.path.join(run_dir, "checkpoints", "latest.pt"), weights_only=False)
    assert interrupted["step"] < STEPS, "the run finished before it was killed"

    restart = start(shapes_root, tmp_path / "killed")
    _, err = restart.communicate(timeout=300)
    assert restart.returncode == 0, err.decode()[-3000:]
    log = open(os.path.join(run_dir, "log.txt")).read()
    resumed_at = int(re.search(r"resumed from \S+ at step (\d+)", log).group(1))
    assert kill_at <= seen and seen - 1 <= resumed_at < STEPS, (kill_at, seen, resumed_at)
    assert not [f for f in os.listdir(os.path.join(run_dir, "checkpoints")) if f.startswith(".tmp")]

    a = torch.load(os.path.join(straight, "checkpoints", "latest.pt"), weights_only=False)
    b = torch.load(os.path.join(run_dir, "checkpoints", "latest.pt"), weights_only=False)
    assert a["step"] == b["step"] == STEPS
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
