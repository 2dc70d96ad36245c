"""A training step that runs out of GPU memory ends the run in one line and loses nothing:
the line names the run, the micro-batch, peak and total memory and the settings that fix
it; the checkpoints are byte for byte what they were; the relaunch with the fix resumes.
In one process, and in two under torchrun, where only rank 1's GPU is too small: rank 1
says so in one line, torchrun stops rank 0 (waiting for it in a collective), and the
relaunch with `micro_batch: auto` trains on bit for bit as a run that never stopped.

There is no GPU here: tests/fake_gpu.py's fake device raises torch.OutOfMemoryError from
inside the model's forward pass above a chosen micro-batch. This file is also the torchrun
worker: tti.train behind a fake GPU per rank (TEST_FAKE_GPU_FITS="8,4": rank 0 fits 8
images per forward pass, rank 1 fits 4).
"""
import json
import os
import re
import sys
from types import SimpleNamespace

import pytest
import torch
from fake_gpu import FakeGPU
from processes import run_until_exit
from test_cli import assert_one_line, run_module
from test_run_lock import tree_digest
from test_train import run, shapes_root, tiny_args  # noqa: F401  (shapes_root: a fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join("shapes32_diffusion", "0")


def history(run_dir):
    with open(os.path.join(run_dir, "history.jsonl")) as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------- one process


def test_out_of_memory_is_one_line_and_the_fix_resumes(shapes_root, tmp_path, monkeypatch,
                                                       capsys):
    results = tmp_path / "results"
    run_dir = str(results / RUN)
    common = ("train.ckpt_every=2", "train.lr_decay=constant")
    run(shapes_root, results, "train.micro_batch=8", "train.steps=2", *common)
    checkpoints = tree_digest(os.path.join(run_dir, "checkpoints"))

    FakeGPU(fits_up_to=4).install(monkeypatch.setattr)  # a smaller GPU from here on
    argv = tiny_args(shapes_root, results, "train.micro_batch=8", "train.steps=4", *common)
    code, err = run_module("tti.train", argv, monkeypatch, capsys)
    assert_one_line(
        code, err, "tti.train",
        f"out of memory in step 3 on cpu: {run_dir} at micro-batch 8 (x 2 accumulation x 1 "
        f"process(es) = global batch 16), peak ",
        f"its checkpoints are untouched and it resumes from {run_dir}/checkpoints/latest.pt: "
        f"relaunch with --set train.micro_batch=4 or --set train.micro_batch=auto (the largest "
        f"that fits, measured at start): the same global batch in more accumulation steps")
    assert re.search(r"peak [0-9.]+ GiB of [0-9.]+ GiB", err)
    assert tree_digest(os.path.join(run_dir, "checkpoints")) == checkpoints
    assert "stopped: out of memory in step 3" in open(os.path.join(run_dir, "log.txt")).read()
    assert history(run_dir)[-1] == {**history(run_dir)[-1], "event": "out_of_memory",
                                    "step": 3, "micro_batch": 8, "grad_accum": 2}

    run(shapes_root, results, "train.micro_batch=4", "train.steps=4", *common)  # the fix
    log = open(os.path.join(run_dir, "log.txt")).read().split("stopped: out of memory")[-1]
    assert f"resumed from {run_dir}/checkpoints/latest.pt at step 2" in log
    assert "train.micro_batch 8 -> 4" in log and "step 4 loss=" in log
    last = history(run_dir)[-1]
    assert last["changes"]["train.micro_batch"] == [8, 4] and last["grad_accum"] == 4
    assert torch.load(os.path.join(run_dir, "checkpoints", "latest.pt"),
                      weights_only=False)["step"] == 4


@pytest.mark.parametrize("micro_batch, micro, accum, fix", [
    (None, 8, 2, "relaunch with --set train.grad_accum=4 (micro-batch 4) or --set "
                 "train.micro_batch=auto"),
    ("auto", 16, 1, "relaunch with --set train.micro_batch=8: the same global batch"),
    (12, 12, 1, "relaunch with --set train.micro_batch=6 or --set train.micro_batch=auto"),
    (1, 1, 16, "not even one image per micro-batch fits: use a GPU with more free memory, or "
               "--set train.precision=bf16"),
])
def test_the_fix_names_the_settings_of_the_runs_own_split(tmp_path, micro_batch, micro,
                                                          accum, fix):
    from tti.config.load import load_config
    from tti.training.out_of_memory import out_of_memory

    cfg = load_config("configs/shapes32.yaml", [f"run.results_dir={tmp_path}",
                                                f"train.batch_size={micro * accum}",
                                                "train.precision=fp32"])
    cfg.train.micro_batch = micro_batch
    info = SimpleNamespace(device=torch.device("cpu"), world_size=1, rank=0)
    log = SimpleNamespace(print=lambda message: None, record=lambda entry: None)
    images = torch.zeros(micro, 3, 32, 32, dtype=torch.uint8)
    error = out_of_memory(cfg, info, 1, [(images, ["a"] * micro)] * accum, log)
    assert fix in str(error) and "no checkpoint was written yet" in str(error)


# ---------------------------------------------------------------- two processes under torchrun


def torchrun(shapes_root, results, fits: str, *sets) -> tuple[int, str]:
    """Two CPU ranks of this file's worker training a tiny shapes run into `results`, each
    behind a fake GPU (`fits`: rank 0's and rank 1's limit); (exit status, output)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "--monitor-interval=0.2", __file__]
    cmd += tiny_args(shapes_root, results, "train.ckpt_every=2", "train.lr_decay=constant", *sets)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, TEST_FAKE_GPU_FITS=fits,
               TTI_TEST_HANG_S="150")
    return run_until_exit(cmd, 200, cwd=REPO, env=env)


def last_launch(run_dir) -> str:
    """log.txt from the last launch's first line on."""
    log = open(os.path.join(run_dir, "log.txt")).read()
    return log[log.rindex("run directory:"):]


def test_two_ranks_agree_and_the_one_out_of_memory_says_so_in_one_line(shapes_root, tmp_path):
    results, run_dir = tmp_path / "results", str(tmp_path / "results" / RUN)
    code, output = torchrun(shapes_root, results, "8,4", "train.micro_batch=auto", "train.steps=2")
    assert code == 0, output[-4000:]
    assert ("batch: micro-batch 4 x 2 accumulation steps x 2 processes = global batch 16 "
            "(train.micro_batch=auto: the largest that fits every rank's GPU, ranks found "
            "[8, 4])") in last_launch(run_dir)
    checkpoints = tree_digest(os.path.join(run_dir, "checkpoints"))

    code, output = torchrun(shapes_root, results, "8,4", "train.micro_batch=8", "train.steps=4")
    assert code != 0
    # (rank 0's progress bar may share the terminal line: the message starts after it)
    errors = re.findall(r"[\w.]+ \(rank \d\): error: .*", output)
    assert len(errors) == 1 and output.count(": error: ") == 1, output[-4000:]
    assert errors[0].startswith("test_out_of_memory.py (rank 1): error: out of memory in "
                                "step 3 on cpu: "), errors
    assert "at micro-batch 8 (x 1 accumulation x 2 process(es) = global batch 16)" in errors[0]
    assert "relaunch with --set train.micro_batch=4 or --set train.micro_batch=auto" in errors[0]
    # no traceback from the ranks themselves (torchrun's own report of the failed group follows)
    assert not re.search(r'File ".*/tti/', output), output[-4000:]
    assert tree_digest(os.path.join(run_dir, "checkpoints")) == checkpoints

    code, output = torchrun(shapes_root, results, "8,4", "train.micro_batch=auto", "train.steps=4")
    assert code == 0, output[-4000:]
    log = last_launch(run_dir)
    assert f"resumed from {run_dir}/checkpoints/latest.pt at step 2" in log
    assert "step 4 loss=" in log
    # Nothing was lost: it ends bit for bit where a run that never stopped ends.
    straight = tmp_path / "straight"
    code, output = torchrun(shapes_root, straight, "8,4", "train.micro_batch=auto", "train.steps=4")
    assert code == 0, output[-4000:]
    ends = [torch.load(os.path.join(folder, RUN, "checkpoints", "latest.pt"), weights_only=False)
            for folder in (results, straight)]
    assert ends[0]["step"] == ends[1]["step"] == 4
    for key in ends[0]["model"]:
        assert torch.equal(ends[0]["model"][key], ends[1]["model"][key]), key


if __name__ == "__main__":
    import faulthandler

    from tti import train
    from tti.infra.cli import run_cli

    faulthandler.dump_traceback_later(float(os.environ.get("TTI_TEST_HANG_S", "240")), exit=True)
    limits = [int(n) for n in os.environ["TEST_FAKE_GPU_FITS"].split(",")]
    FakeGPU(limits[int(os.environ["RANK"])]).install(setattr)
    run_cli(train.main)
