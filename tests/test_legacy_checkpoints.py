"""Checkpoints written before the plug-in core (commit 552b487, tests/fixtures/README.md) still
load, sample the same images bit for bit, and resume training."""
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from tti import train
from tti.data.shapes import write_coco
from tti.infra.checkpoints import load_checkpoint
from tti.models.text_to_image import load_for_inference

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SAMPLERS = {"dpmpp2m": dict(sampler="dpmpp2m", steps=4, guidance=2.0),
            "ddim": dict(sampler="ddim", steps=5, guidance=1.5, eta=0.0),
            "ddim_eta1": dict(sampler="ddim", steps=5, guidance=2.0, eta=1.0),
            "ddpm": dict(sampler="ddpm", guidance=1.0)}


@pytest.fixture(scope="module")
def expected():
    return torch.load(FIXTURES / "legacy_samples.pt", weights_only=True)


def assert_same_images(got: torch.Tensor, want: torch.Tensor, capability: str) -> None:
    """Bit for bit on the kind of CPU the fixture was drawn on; elsewhere other SIMD kernels
    may round differently, so within float tolerance."""
    if torch.backends.cpu.get_cpu_capability() == capability:
        assert torch.equal(got, want), (got - want).abs().max()
    else:
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def sample(path: Path, captions: list, options: dict) -> dict:
    model, _ = load_for_inference(str(path), "cpu")
    out = {}
    for name, opts in options.items():
        gens = [torch.Generator().manual_seed(100 + i) for i in range(len(captions))]
        out[name] = model.sample(captions, gens, **opts)
    return out


def test_a_legacy_diffusion_checkpoint_samples_the_same_images(expected):
    got = sample(FIXTURES / "legacy_diffusion.pt", expected["captions"], SAMPLERS)
    for name in SAMPLERS:
        assert_same_images(got[name], expected["diffusion"][name], expected["cpu_capability"])


def test_a_legacy_aligndraw_checkpoint_samples_the_same_images(expected):
    got = sample(FIXTURES / "legacy_aligndraw.pt", expected["captions"], {"prior": {}})
    assert_same_images(got["prior"], expected["aligndraw"]["prior"], expected["cpu_capability"])


def test_a_legacy_config_reads_under_todays_names():
    """model.diffusion became model.gaussian; the objective and backbone are named."""
    _, cfg = load_for_inference(str(FIXTURES / "legacy_diffusion.pt"), "cpu")
    saved = load_checkpoint(str(FIXTURES / "legacy_diffusion.pt"))["config"]["model"]
    assert "diffusion" in saved and "gaussian" not in saved  # written before the rename
    assert (cfg.model.objective, cfg.model.backbone) == ("gaussian", "unet")
    assert cfg.model.gaussian.shift == saved["diffusion"]["shift"] == 2.0
    assert cfg.model.to_dict()["gaussian"] == saved["diffusion"]


def test_a_legacy_run_resumes(tmp_path):
    """The legacy run, its data rebuilt, trains one more step with today's loop (weights,
    EMA and optimizer state under their old names)."""
    state = load_checkpoint(str(FIXTURES / "legacy_diffusion.pt"))
    root = tmp_path / "shapes"
    write_coco(str(root), n_train=64, n_val=8, image_size=32, seed=0)  # what it trained on
    run_dir = tmp_path / "results" / "shapes32_diffusion" / "0"
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copy(FIXTURES / "legacy_diffusion.pt", run_dir / "checkpoints" / "0000006.pt")
    os.link(run_dir / "checkpoints" / "0000006.pt", run_dir / "checkpoints" / "latest.pt")
    config = tmp_path / "legacy.yaml"
    config.write_text(yaml.safe_dump(state["config"]))
    train.main(["--config", str(config), "--device", "cpu", "--set", f"data.root={root}",
                "--set", f"run.results_dir={tmp_path / 'results'}", "--set", "train.steps=7"])
    resumed = load_checkpoint(str(run_dir))
    assert resumed["step"] == 7
    assert all(k.startswith(("image_model.", "text.")) for k in resumed["model"])
    moved = [k for k in resumed["model"] if not torch.equal(
        resumed["model"][k], state["model"][k.replace("image_model.backbone.", "generator.unet.")])]
    assert moved  # the step trained the old weights
