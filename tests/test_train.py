"""End to end on a tiny generated shapes set: training lowers the loss, resume is exact, the
log shows FLOP/s and peak memory, the sample CLI writes a grid and a GIF, a checkpoint alone
rebuilds the model."""
import os
import re

import pytest
import torch
from PIL import Image

from tti import sample, train
from tti.data.shapes import write_coco

TINY = [
    "data.shapes_train=96", "data.shapes_val=16", "data.num_workers=0",
    "model.unet.channels=[16, 32]", "model.unet.attn_resolutions=[16]", "model.unet.self_attn_resolutions=[16]", "model.unet.head_dim=16",
    "sample.steps=4",
    "train.batch_size=16", "train.warmup_steps=2", "train.log_every=1",
    "train.sample_every=1000", "train.eval_samples=0", "train.deterministic=true",
    "sample.captions=['a large red circle', 'a small blue square']",
]


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    write_coco(str(root), n_train=96, n_val=16, image_size=32, seed=0)
    return str(root)


def tiny_args(shapes_root, results, *extra) -> list:
    """tti.train's arguments for a TINY shapes run in `results`, then the `extra` --set items."""
    args = ["--config", "configs/shapes32.yaml", "--device", "cpu",
            "--set", f"data.root={shapes_root}", "--set", f"run.results_dir={results}"]
    for item in TINY + list(extra):
        args += ["--set", item]
    return args


def run(shapes_root, results, *extra):
    return train.main(tiny_args(shapes_root, results, *extra))


def logged_losses(run_dir):
    with open(os.path.join(run_dir, "log.txt")) as f:
        return [float(m.group(1)) for m in re.finditer(r"^step \d+ loss=([0-9.eE+-]+)", f.read(), re.M)]


def test_loss_falls(shapes_root, tmp_path):
    run_dir = run(shapes_root, tmp_path, "train.steps=60", "train.lr=3e-3", "train.ckpt_every=60")
    losses = logged_losses(run_dir)
    assert len(losses) == 60
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.7 * first, (first, last)


def _weights(run_dir):
    state = torch.load(os.path.join(run_dir, "checkpoints", "latest.pt"), weights_only=True)
    return state["model"], state["ema"]["shadow"], state["step"]


def test_resume_continues_identically(shapes_root, tmp_path):
    # train.steps=3 is how the second run is stopped early; under a cosine decay it would
    # also change that run's LR schedule, so the schedule is pinned to constant here (a run
    # killed with its steps unchanged resumes bitwise under the default cosine decay:
    # tests/test_fault_tolerance.py).
    common = ("train.ckpt_every=3", "train.lr_decay=constant")
    straight = run(shapes_root, tmp_path / "a", "train.steps=6", *common)
    # Same run, stopped after its step-3 checkpoint, then restarted to step 6.
    run(shapes_root, tmp_path / "b", "train.steps=3", *common)
    resumed = run(shapes_root, tmp_path / "b", "train.steps=6", *common)
    model_a, ema_a, step_a = _weights(straight)
    model_b, ema_b, step_b = _weights(resumed)
    assert step_a == step_b == 6
    assert model_a.keys() == model_b.keys()
    for k in model_a:
        assert torch.equal(model_a[k], model_b[k]), k
    for k in ema_a:
        assert torch.equal(ema_a[k], ema_b[k]), k
    assert "resumed from" in open(os.path.join(resumed, "log.txt")).read()


@pytest.fixture(scope="module")
def two_steps(shapes_root, tmp_path_factory):
    return run(shapes_root, tmp_path_factory.mktemp("two_steps"), "train.steps=2",
               "train.ckpt_every=2")


def test_log_shows_flop_rate_data_wait_and_peak_memory(two_steps):
    log = open(os.path.join(two_steps, "log.txt")).read()
    gflop = float(re.search(r"training FLOPs per image: ([0-9.]+) GFLOP", log).group(1))
    assert gflop > 0
    lines = re.findall(r"^step (\d+) (.*)$", log, re.M)
    assert [int(step) for step, _ in lines] == [1, 2]
    for _, values in lines:
        logged = dict(item.split("=") for item in values.split())
        assert {"img_per_s", "tflops", "data_wait", "peak_mem_gib"} <= logged.keys()
        assert "mfu" not in logged  # no bf16 peak on a CPU
        # FLOP/s = images/s x FLOPs per image (both logged rounded: 5 and 4 digits)
        expected = float(logged["img_per_s"]) * gflop / 1e3
        assert float(logged["tflops"]) == pytest.approx(expected, rel=2e-3)
        assert 0 <= float(logged["data_wait"]) < 1 and float(logged["peak_mem_gib"]) > 0.05


def test_sample_cli_writes_grid_and_gif(two_steps, tmp_path):
    run_dir = two_steps
    out, gif = tmp_path / "grid.png", tmp_path / "denoise.gif"
    sample.main(["--checkpoint", run_dir, "--caption", "a large green triangle",
                 "--caption", "a small red circle above a large blue square", "--n", "3",
                 "--steps", "4", "--guidance", "2", "--out", str(out), "--gif", str(gif),
                 "--device", "cpu"])
    grid = Image.open(out)
    assert grid.size[0] > 3 * 64 and grid.size[1] >= 2 * 64
    frames = Image.open(gif)
    assert frames.n_frames == 4
    # Same seed, same pixels.
    out2 = tmp_path / "grid2.png"
    sample.main(["--checkpoint", run_dir, "--caption", "a large green triangle",
                 "--caption", "a small red circle above a large blue square", "--n", "3",
                 "--steps", "4", "--guidance", "2", "--out", str(out2), "--device", "cpu"])
    assert list(Image.open(out2).getdata()) == list(grid.getdata())


def grids(run_dir):
    folder = os.path.join(run_dir, "samples")
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def test_grids_every_interval_and_at_the_end_unless_the_run_is_shorter(shapes_root, tmp_path):
    run_dir = run(shapes_root, tmp_path / "long", "train.steps=3", "train.sample_every=2")
    assert grids(run_dir) == ["step_0000002.png", "step_0000003.png"]
    short = run(shapes_root, tmp_path / "short", "train.steps=2", "train.sample_every=3")
    assert grids(short) == []
    for steps in (3, 4):  # off: no grid at the last step, on the interval (4) or not (3)
        no_end = run(shapes_root, tmp_path / f"no_end{steps}", f"train.steps={steps}",
                     "train.sample_every=2", "train.sample_at_end=false")
        assert grids(no_end) == ["step_0000002.png"]
    # The run says which file and which --set items made it (its folder is named by
    # run.dataset, which an override of text.name, say, would leave as the file said).
    header = open(os.path.join(short, "config.yaml")).read().split("\nrun:")[0].splitlines()
    assert header[0].startswith("# From configs/shapes32.yaml, then these --set overrides")
    assert header[2:] == [f"#   --set {item}" for item in
                          [f"data.root={shapes_root}", f"run.results_dir={tmp_path / 'short'}"]
                          + TINY + ["train.steps=2", "train.sample_every=3"]]
    log = open(os.path.join(short, "log.txt")).read()
    assert "config: configs/shapes32.yaml --set data.root=" in log
    assert "--set train.sample_every=3\n" in log


def test_data_workers_are_capped_by_the_cpus_each_rank_may_use(monkeypatch):
    from types import SimpleNamespace

    from tti.infra import threads
    from tti.training import setup
    from tti.config.load import load_config

    cfg = load_config("configs/coco64_ft_roberta.yaml")
    assert cfg.data.num_workers == 8
    lines = []
    log = SimpleNamespace(print=lines.append)
    for cpus, ranks, expected in ((64, 4, 8), (6, 4, 1), (6, 1, 6), (2, 4, 0)):
        monkeypatch.setattr(setup, "usable_cpus", lambda: set(range(cpus)))
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(ranks))
        assert setup.data_workers(cfg, log) == expected
    capped = ((6, 4, 1), (6, 1, 6), (2, 4, 0))  # (CPUs, ranks on the node, workers)
    assert lines == [f"data.num_workers=8 capped to {n}: this process may use {c} CPU(s), "
                     f"shared by {r} rank(s) on this node" for c, r, n in capped]
    monkeypatch.undo()
    assert threads.usable_cpus() == os.sched_getaffinity(0)


def test_unreachable_encoder_fails_before_any_data_or_run_directory(tmp_path, monkeypatch):
    import huggingface_hub.constants
    from coco_fixture import write_coco_fixture

    from tti.text.source import TextEncoderError

    fixture = write_coco_fixture(tmp_path / "coco")
    args = ["--config", "configs/coco64_ft_roberta.yaml", "--device", "cpu", "--set",
            f"data.root={fixture.root}", "--set", f"run.results_dir={tmp_path / 'results'}"]
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TextEncoderError, match="--set text.name=/path/to/roberta-base"):
        train.main(args)
    assert not (fixture.root / "cache").exists() and not (tmp_path / "results").exists()
