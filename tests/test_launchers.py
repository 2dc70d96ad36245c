"""The bash launchers as a user runs them, through their torchrun branch: `$gpu_ids` = cpu:2
(two CPU processes under torchrun, gloo), on the COCO-like fixture, called from the user's
own folder with a relative dataset path.

The launchers and configs/ are copied into a scratch repository, so results/ is written there
under its real run-directory names while tti is imported from this checkout. Train with the
COCO launcher (its default config, fine-tuned tiny RoBERTa) -> sample that run with the eval
launcher -> export it with gen_images_for_metrics.sh; the same road at 256 px in a VAE's latent
space (TTI_CONFIG=configs/coco256_latent_frozen_roberta.yaml, the tiny VAE), with a resume;
train the alignDRAW launcher; and the mistakes a launcher must catch before any work: a batch
the processes do not divide, and RoBERTa or VAE weights that cannot be found.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image
from test_smoke_matrix import smoke_sets

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["run_tti_64_coco_ft_roberta.sh", "run_tti_eval_coco.sh", "gen_images_for_metrics.sh",
           "scripts/run_aligndraw_coco.sh", "scripts/launch_common.sh"]
COCO64_RUN = "results/coco64_ft_roberta_diffusion/0"
LATENT_CONFIG = "configs/coco256_latent_frozen_roberta.yaml"
LATENT_RUN = "results/coco256_latent_frozen_roberta_diffusion/0"


@pytest.fixture(scope="module")
def place(tmp_path_factory, coco_fixture):
    """(scratch repository, the user's folder holding `coco`, a link to the fixture)."""
    tmp = tmp_path_factory.mktemp("launchers")
    repo, user = tmp / "repo", tmp / "user"
    for script in SCRIPTS:
        (repo / script).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(os.path.join(REPO, script), repo / script)
    shutil.copytree(os.path.join(REPO, "configs"), repo / "configs")
    user.mkdir()
    (user / "coco").symlink_to(coco_fixture.root)
    return repo, user


def bash(script: Path, *args, cwd: Path, **env) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1",
                    PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"], **env)
    return subprocess.run(["bash", str(script), *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=300)


def set_items(sets: dict) -> list:
    return [item for key, value in sets.items() for item in ("--set", f"{key}={value}")]


@pytest.fixture(scope="module")
def coco64_run(place, tiny_roberta):
    """`bash run_tti_64_coco_ft_roberta.sh cpu:2 0 coco` (+ the smoke matrix's --set items)."""
    repo, user = place
    sets = smoke_sets("coco64_ft_roberta.yaml", None, None, tiny_roberta, None)
    del sets["run.results_dir"], sets["data.root"]  # the launcher's, as a user has them
    result = bash(repo / "run_tti_64_coco_ft_roberta.sh", "cpu:2", 0, "coco", *set_items(sets),
                  cwd=user)
    assert result.returncode == 0, result.stderr[-4000:]
    return repo / COCO64_RUN


def test_training_launcher_reads_the_dataset_from_the_callers_folder(coco64_run, place):
    _, user = place
    assert (coco64_run / "checkpoints" / "latest.pt").is_file()
    config = yaml.safe_load((coco64_run / "config.yaml").read_text())
    assert config["data"]["root"] == os.path.realpath(user / "coco")
    assert "world size 2" in (coco64_run / "log.txt").read_text()


def test_eval_launcher_samples_the_run_of_its_config(coco64_run, place):
    repo, user = place
    # Another config's run with the same index: the launcher must not pick it, nor stop at it.
    (repo / "results" / "shapes32_diffusion" / "0" / "checkpoints").mkdir(parents=True)
    result = bash(repo / "run_tti_eval_coco.sh", "cpu:2", 0, "A red bus.", cwd=user,
                  TTI_SAMPLE_ARGS="--n 1 --steps 2")
    assert result.returncode == 0, result.stderr[-4000:]
    assert Image.open(coco64_run / "samples" / "eval_grid.png").size[1] >= 64
    assert Image.open(coco64_run / "samples" / "eval_denoise.gif").n_frames == 2


def test_export_launcher_runs_two_processes_and_writes_in_the_callers_folder(coco64_run, place):
    repo, user = place
    result = bash(repo / "gen_images_for_metrics.sh", "cpu:2", 0,
                  os.path.relpath(coco64_run, user), "--num-samples", 3, "--steps", 2, cwd=user)
    assert result.returncode == 0, result.stderr[-4000:]
    out = user / "eval_data_run_0"
    assert json.loads((out / "export_info.json").read_text())["world_size"] == 2
    for side in ("gt", "tti"):
        assert sorted(os.listdir(out / side / "images")) == [f"00000{i}.png" for i in range(3)]


@pytest.fixture(scope="module")
def latent_run(place, tiny_roberta, tiny_vae):
    """`TTI_CONFIG=configs/coco256_latent_frozen_roberta.yaml bash run_tti_64_coco_ft_roberta.sh
    cpu:2 0 coco` (+ the smoke matrix's --set items: the tiny RoBERTa and VAE), then again
    with one more step: the relaunch resumes."""
    repo, user = place
    sets = smoke_sets(os.path.basename(LATENT_CONFIG), None, None, tiny_roberta, None, tiny_vae)
    del sets["run.results_dir"], sets["data.root"]  # the launcher's, as a user has them
    for steps in (2, 3):
        result = bash(repo / "run_tti_64_coco_ft_roberta.sh", "cpu:2", 0, "coco",
                      *set_items({**sets, "train.steps": steps}), cwd=user, TTI_CONFIG=LATENT_CONFIG)
        assert result.returncode == 0, result.stderr[-4000:]
    return repo / LATENT_RUN


def test_the_latent_config_trains_resumes_samples_and_exports_at_256(latent_run, place):
    repo, user = place
    log = (latent_run / "log.txt").read_text()
    assert log.count("world size 2") == 2 and "resumed from" in log and "latent store" in log
    assert (latent_run / "checkpoints" / "0000003.pt").is_file()
    result = bash(repo / "run_tti_eval_coco.sh", "cpu:2", 0, "A red bus.", cwd=user,
                  TTI_CONFIG=LATENT_CONFIG, TTI_SAMPLE_ARGS="--n 1 --steps 2")
    assert result.returncode == 0, result.stderr[-4000:]
    assert Image.open(latent_run / "samples" / "eval_grid.png").size[1] >= 256
    assert Image.open(latent_run / "samples" / "eval_denoise.gif").n_frames == 2
    result = bash(repo / "gen_images_for_metrics.sh", "cpu:2", 1, os.path.relpath(latent_run, user),
                  "--num-samples", 2, "--steps", 2, cwd=user)
    assert result.returncode == 0, result.stderr[-4000:]
    for side in ("gt", "tti"):
        images = sorted((user / "eval_data_run_1" / side / "images").iterdir())
        assert [p.name for p in images] == ["000000.png", "000001.png"]
        assert Image.open(images[0]).size == (256, 256)


def test_aligndraw_launcher_trains_two_processes(place):
    repo, user = place
    # The paper's 32 DRAW steps cost CPU time the launcher test does not need.
    result = bash(repo / "scripts" / "run_aligndraw_coco.sh", "cpu:2", 0, "coco",
                  *set_items({"train.batch_size": 4, "train.steps": 2,
                              "model.aligndraw.overrides.draw_steps": 4}), cwd=user)
    assert result.returncode == 0, result.stderr[-4000:]
    run = repo / "results" / "coco32_aligndraw" / "0"
    assert (run / "checkpoints" / "latest.pt").is_file()
    assert "world size 2" in (run / "log.txt").read_text()


def assert_failed_before_any_work(result, dataset: Path, run_dir: Path, *expected: str):
    """Exit status 1 and one line on stderr holding `expected`; nothing packed, no run folder."""
    assert result.returncode == 1, result.stderr[-4000:]
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    for text in expected:
        assert text in result.stderr
    assert not (dataset / "cache").exists() and not run_dir.exists()


def test_a_batch_the_processes_do_not_divide_fails_first_in_one_line(place, tiny_roberta):
    from coco_fixture import write_coco_fixture

    repo, user = place
    write_coco_fixture(user / "fresh")
    result = bash(repo / "run_tti_64_coco_ft_roberta.sh", "cpu:2", 1, "fresh",
                  *set_items({"text.name": tiny_roberta, "train.batch_size": 5}), cwd=user)
    assert_failed_before_any_work(
        result, user / "fresh", repo / "results" / "coco64_ft_roberta_diffusion" / "1",
        "train.batch_size: 5 is not divisible by 2 processes: use 4 or 6")


def test_unreachable_autoencoder_fails_first_in_one_line(place, tiny_roberta, tmp_path):
    from coco_fixture import write_coco_fixture

    repo, user = place
    write_coco_fixture(tmp_path / "coco")
    result = bash(repo / "run_tti_64_coco_ft_roberta.sh", "cpu:2", 3, tmp_path / "coco",
                  *set_items({"text.name": tiny_roberta}), cwd=user, TTI_CONFIG=LATENT_CONFIG,
                  HF_HUB_CACHE=str(tmp_path / "empty_hf_cache"), HF_HUB_OFFLINE="1")
    assert_failed_before_any_work(
        result, tmp_path / "coco", repo / "results" / "coco256_latent_frozen_roberta_diffusion" / "3",
        "model.autoencoder 'stabilityai/sd-vae-ft-ema'", "--set model.autoencoder=/path/to/sd-vae-ft-ema")


def test_unreachable_roberta_fails_first_in_one_line(place, tmp_path):
    from coco_fixture import write_coco_fixture

    repo, user = place
    write_coco_fixture(tmp_path / "coco")
    result = bash(repo / "run_tti_64_coco_ft_roberta.sh", "cpu:2", 2, tmp_path / "coco", cwd=user,
                  HF_HUB_CACHE=str(tmp_path / "empty_hf_cache"), HF_HUB_OFFLINE="1")
    assert_failed_before_any_work(
        result, tmp_path / "coco", repo / "results" / "coco64_ft_roberta_diffusion" / "2",
        "text.name 'roberta-base'", "--set text.name=/path/to/roberta-base",
        "--set text.name=packaged-minilm")


@pytest.mark.skipif(os.path.exists("/proc/driver/nvidia"), reason="this machine has an NVIDIA driver")
def test_gpu_ids_without_a_driver_fail_first_in_one_line(place, tiny_roberta, tmp_path):
    """What a new user sees on a machine without a working NVIDIA driver (this one): the
    launcher's check, before torch's traceback from inside torch._C._cuda_init()."""
    from coco_fixture import write_coco_fixture

    repo, user = place
    write_coco_fixture(tmp_path / "coco")
    result = bash(repo / "run_tti_64_coco_ft_roberta.sh", "0", 3, tmp_path / "coco",
                  *set_items({"text.name": tiny_roberta}), cwd=user)
    assert_failed_before_any_work(
        result, tmp_path / "coco", repo / "results" / "coco64_ft_roberta_diffusion" / "3",
        "tti.preflight: error: no usable CUDA GPU here (Found no NVIDIA driver on your system): "
        "run on the CPU with $gpu_ids cpu (one process) or cpu:N (N processes)")


@pytest.mark.skipif(os.path.exists("/proc/driver/nvidia"), reason="this machine has an NVIDIA driver")
@pytest.mark.parametrize("launcher", ["run_tti_eval_coco.sh", "gen_images_for_metrics.sh"])
def test_sampling_launchers_without_a_driver_fail_in_one_line(launcher, coco64_run, place):
    """`$gpu_ids 0` on this driverless machine: one line naming the fix, nothing written."""
    repo, user = place
    last = ["A red bus."] if launcher == "run_tti_eval_coco.sh" else [
        os.path.relpath(coco64_run, user), "--out-dir", "driverless_export"]
    before = sorted(os.listdir(coco64_run))
    result = bash(repo / launcher, "0", 0, *last, cwd=user, TTI_OUT=str(user / "driverless_grid"))
    assert result.returncode == 1, result.stderr[-4000:]
    assert result.stderr.strip().splitlines() == [
        f"tti.{'sample' if launcher == 'run_tti_eval_coco.sh' else 'export'}: error: no usable CUDA "
        "GPU here (Found no NVIDIA driver on your system): run with --device cpu (or a launcher "
        "with $gpu_ids cpu) [--debug shows the traceback]"], result.stderr
    assert sorted(os.listdir(coco64_run)) == before
    assert not (user / "driverless_export").exists() and not (user / "driverless_grid").exists()
