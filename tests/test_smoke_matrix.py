"""The smoke matrix: every config in configs/, small, on the road its users take.

Each config trains 2 steps under `torchrun --standalone --nproc_per_node=2` (gloo, CPU) and
writes a checkpoint; a second torchrun launch resumes it for one more step; then, in this
process, `tti.sample` draws a grid and `tti.export` writes a few gt/generated pairs from it.
COCO configs read the COCO-like fixture (tests/coco_fixture.py) with the tiny RoBERTa
(tti/text/tiny_roberta.py) where they name roberta-base and the tiny random VAE
(tti/models/tiny_vae.py) where they name an autoencoder; shapes configs generate a small shapes
set themselves (data.generate_shapes: their users' road). Frozen or fine-tuned encoder,
caption cache, precision, sampler and data.num_workers (capped by the CPUs) stay as each
config says; only what the fixture's size or CPU time requires is shrunk (`smoke_sets`).

A torchrun launch's process start-up costs more than a small config's two steps, so one
launch trains every config in turn: this file is also the torchrun worker, which joins the
process group once and calls tti.train.main per config, holding back
tti.infra.distributed.cleanup until the last. Two launches for the whole matrix, not two per config.
"""
import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every file in configs/ (test_the_matrix_has_every_shipped_config keeps this list whole).
CONFIGS = ["aligndraw_coco32.yaml", "aligndraw_shapes32.yaml", "coco256_latent_frozen_roberta.yaml",
           "coco256_latent_ft_roberta.yaml", "coco256_latent_transformer_frozen_roberta.yaml",
           "coco32_cpu.yaml", "coco32_cpu_flow.yaml", "coco32_frozen_roberta.yaml",
           "coco32_ft_roberta.yaml", "coco64_flow_ft_roberta.yaml", "coco64_frozen_roberta.yaml",
           "coco64_ft_roberta.yaml", "coco64_transformer_ft_roberta.yaml", "shapes32.yaml",
           "shapes32_long.yaml"]
# Each shipped config as it is, and what the first report ran: shapes32 with its
# encoder fine-tuned (a second run index, as the config names the same run folder).
RUNS = {**{config: (config, {}) for config in CONFIGS},
        "shapes32_finetuned_text": ("shapes32.yaml", {"text.finetune": True, "text.lr": 1e-5,
                                                      "run.run_idx": 1})}
FIRST_STEPS, RESUMED_STEPS = 2, 3
LAUNCH_TIMEOUT_S = 420


def smoke_sets(config: str, coco_root, shapes_root, roberta, results, vae=None) -> dict:
    """The --set items that make `config` a smoke run: the data, the tiny RoBERTa for
    roberta-base, the tiny VAE for an autoencoder, a batch the fixture holds, GPU-sized
    networks at a quarter of their widths."""
    from tti.config.load import load_config

    cfg = load_config(os.path.join(REPO, "configs", config))
    sets = {"run.results_dir": results, "train.batch_size": 4, "train.steps": FIRST_STEPS}
    if cfg.data.generate_shapes:
        sets.update({"data.root": shapes_root, "data.shapes_train": 32, "data.shapes_val": 8})
    else:
        sets["data.root"] = coco_root
    if cfg.text.name == "roberta-base":
        sets["text.name"] = roberta
    if cfg.model.autoencoder:
        sets["model.autoencoder"] = vae
    backbone = cfg.model.backbone if cfg.model.kind == "diffusion" else None
    if backbone == "unet" and max(cfg.model.unet.channels) > 128:  # sized for GPUs
        # Same levels, blocks, heads and attention resolutions; a 16th of the parameters.
        sets["model.unet.channels"] = [c // 4 for c in cfg.model.unet.channels]
        sets["model.unet.head_dim"] = cfg.model.unet.head_dim // 4
    if backbone == "transformer" and cfg.model.transformer.width > 128:
        # Same patches, heads and text attention; a quarter of the width and of the depth.
        sets["model.transformer.width"] = cfg.model.transformer.width // 4
        sets["model.transformer.head_dim"] = cfg.model.transformer.head_dim // 4
        sets["model.transformer.depth"] = max(2, cfg.model.transformer.depth // 4)
    return sets


def as_args(config: str, sets: dict) -> list:
    args = ["--config", os.path.join(REPO, "configs", config), "--device", "cpu"]
    for key, value in sets.items():
        args += ["--set", f"{key}={value}"]
    return args


# ---------------------------------------------------------------- the torchrun worker


def worker(plan_file: str, record_dir: str) -> None:
    """One rank: train every run of the plan ({name: tti.train argv}) in turn, in one
    process group; rank 0 records each run directory as its run ends."""
    from tti import train
    from tti.infra import distributed

    info = distributed.setup("cpu")
    leave = distributed.cleanup
    distributed.cleanup = distributed.barrier  # stay in the group for the next config
    for name, args in json.loads(Path(plan_file).read_text()).items():
        print(f"smoke matrix: {name}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        run_dir = train.main(args)
        if info.is_main:
            record = {"run_dir": run_dir, "seconds": round(time.perf_counter() - start, 2)}
            (Path(record_dir) / f"{name}.json").write_text(json.dumps(record))
    leave()


if __name__ == "__main__":
    import faulthandler
    faulthandler.dump_traceback_later(LAUNCH_TIMEOUT_S - 20, exit=True)  # a hang prints its stack
    worker(sys.argv[1], sys.argv[2])
    sys.exit(0)


# ---------------------------------------------------------------- the tests


def torchrun(folder: Path, plan: dict) -> dict:
    """One 2-rank torchrun launch of the worker over `plan`; what it recorded and printed."""
    folder.mkdir()
    (folder / "plan.json").write_text(json.dumps(plan))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "--monitor-interval=0.2", __file__, str(folder / "plan.json"), str(folder)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
    records = {name: json.loads((folder / f"{name}.json").read_text())
               for name in plan if (folder / f"{name}.json").exists()}
    return {"records": records, "output": output, "returncode": proc.returncode,
            "seconds": time.perf_counter() - start}


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("shapes"))  # empty: the shapes configs generate into it


@pytest.fixture(scope="module")
def matrix(coco_fixture, tiny_roberta, tiny_vae, shapes_root, tmp_path_factory):
    """Both launches over every run of RUNS: {"first": ..., "resumed": ..., "args": the
    resumed launch's tti.train argv per run}."""
    tmp = tmp_path_factory.mktemp("matrix")
    sets = {name: {**smoke_sets(config, coco_fixture.root, shapes_root, tiny_roberta,
                                tmp / "results", tiny_vae), **extra}
            for name, (config, extra) in RUNS.items()}
    first = torchrun(tmp / "first", {name: as_args(RUNS[name][0], s) for name, s in sets.items()})
    resumed = {name: as_args(RUNS[name][0], {**sets[name], "train.steps": RESUMED_STEPS})
               for name in first["records"]}  # what the first launch finished
    return {"first": first, "resumed": torchrun(tmp / "resumed", resumed), "args": resumed}


def run_of(launch: dict, name: str) -> str:
    """The run directory `name` trained in `launch`; fails with the launch's output if not."""
    if name not in launch["records"]:
        pytest.fail(f"{name} did not finish (exit status {launch['returncode']}):\n"
                    f"{launch['output'][-6000:]}")
    return launch["records"][name]["run_dir"]


def test_the_matrix_has_every_shipped_config():
    shipped = glob.glob(os.path.join(REPO, "configs", "*.yaml"))
    assert sorted(os.path.basename(p) for p in shipped) == CONFIGS


@pytest.mark.parametrize("name", RUNS)
def test_config_trains_resumes_samples_and_exports(name, matrix, tmp_path):
    from tti import export, sample
    from tti.infra.threads import usable_cpus
    from tti.config.load import load_config

    run_dir = run_of(matrix["first"], name)
    assert run_of(matrix["resumed"], name) == run_dir
    checkpoints = os.path.join(run_dir, "checkpoints")
    for step in (FIRST_STEPS, RESUMED_STEPS):
        assert os.path.isfile(os.path.join(checkpoints, f"{step:07d}.pt"))
    latest = torch.load(os.path.join(checkpoints, "latest.pt"), weights_only=False)
    assert latest["step"] == RESUMED_STEPS and latest["world_size"] == 2
    # Trained as the config says, but for the --set items listed in smoke_sets and RUNS.
    args = matrix["args"][name]
    overrides = [item for flag, item in zip(args, args[1:]) if flag == "--set"]
    assert latest["config"] == load_config(args[args.index("--config") + 1], overrides).to_dict()
    log = Path(run_dir, "log.txt").read_text(encoding="utf-8")
    assert log.count("world size 2") == 2
    assert f"resumed from {checkpoints}/latest.pt at step {FIRST_STEPS}" in log
    # Runs shorter than train.sample_every draw no in-loop grid.
    assert not glob.glob(os.path.join(run_dir, "samples", "step_*.png"))
    # data.num_workers as the config says, capped by the CPUs each of the 2 ranks may use.
    config = RUNS[name][0]
    cfg = load_config(os.path.join(REPO, "configs", config))
    capped = len(usable_cpus()) // 2
    assert (f"data.num_workers={cfg.data.num_workers} capped to {capped}" in log) == \
        (cfg.data.num_workers > capped)
    # The run's config.yaml says which file and which --set items made it.
    header = Path(run_dir, "config.yaml").read_text(encoding="utf-8").split("\nrun:")[0]
    assert f"# From {os.path.join(REPO, 'configs', config)}, then these --set overrides" in header
    assert f"#   --set train.steps={RESUMED_STEPS}" in header

    grid = tmp_path / "grid.png"
    sample.main(["--checkpoint", run_dir, "--n", "1", "--steps", "2", "--device", "cpu",
                 "--out", str(grid)])
    rows = len(cfg.sample.captions) or 1
    assert Image.open(grid).size[1] >= rows * 64
    out = tmp_path / "export"
    export.main(["--checkpoint", run_dir, "--out-dir", str(out), "--n", "2", "--steps", "2",
                 "--device", "cpu"])
    for side in ("gt", "tti"):
        images = sorted(os.listdir(out / side / "images"))
        assert images == ["000000.png", "000001.png"]
        assert Image.open(out / side / "images" / images[0]).size == (cfg.data.image_size,) * 2
