"""`python -m tti.release`: the folder a user shares (model.safetensors, config.json, README.md)
samples the same images as the checkpoint it came from, bit for bit (fp32, same seed), through
tti.sample, tti.export and both launchers; it needs no checkpoints/ folder; alignDRAW's
vocabulary and a fine-tuned encoder's weights travel in it; the card holds the metrics table."""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_cli import assert_one_line, run_module
from test_safe_loading import bash

from tti import evaluate, export, release, sample
from tti.config.load import load_config
from tti.eval.grid import generate
from tti.infra.checkpoints import atomic_save, load_checkpoint
from tti.infra.release_folder import is_release_folder
from tti.models.text_to_image import build, load_for_inference, trainable_state

from tiny_run import REPO, TINY, train_tiny_run

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CAPTIONS = ["a small red circle to the left of a large blue square", "a green triangle"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return train_tiny_run(tmp_path_factory)


@pytest.fixture(scope="module")
def released(run_dir, tmp_path_factory):
    """The tiny run's release, moved away from the run (no checkpoints/ beside it)."""
    out = tmp_path_factory.mktemp("shared") / "tiny"
    release.main(["--checkpoint", run_dir, "--out", str(out)])
    return out


def images_of(path, **opts) -> torch.Tensor:
    model, _ = load_for_inference(str(path), "cpu")
    return generate(model, CAPTIONS, 2, seed=3, **opts)


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_the_folder_holds_data_only(released, run_dir):
    assert sorted(os.listdir(released)) == ["README.md", "config.json", "model.safetensors"]
    assert is_release_folder(str(released))
    meta = json.loads((released / "config.json").read_text())
    state = load_checkpoint(run_dir)
    assert meta["step"] == state["step"] == 2 and meta["weights"] == "ema"
    assert meta["images_seen"] == 2 * 16  # steps x train.batch_size
    weights = load_file(released / "model.safetensors")
    for name, shadow in state["ema"]["shadow"].items():
        assert torch.equal(weights[name], shadow), name  # the EMA weights, not the model's


def test_a_release_samples_the_same_images_as_its_checkpoint(released, run_dir):
    for opts in ({}, dict(sampler="heun", steps=3, guidance=1.5),
                 dict(sampler="dpmpp2m", steps=3, eta=1.0)):  # stochastic: the same noise too
        assert torch.equal(images_of(released, **opts), images_of(run_dir, **opts))


def test_tti_sample_draws_the_same_grid(released, run_dir, tmp_path):
    for name, path in (("release", released), ("checkpoint", run_dir)):
        sample.main(["--checkpoint", str(path), "--caption", CAPTIONS[0], "--n", "2",
                     "--device", "cpu", "--precision", "fp32", "--out", str(tmp_path / f"{name}.png")])
    assert np.array_equal(pixels(tmp_path / "release.png"), pixels(tmp_path / "checkpoint.png"))


def test_export_and_launchers_take_a_release(released, run_dir, tmp_path):
    """tti.export of the checkpoint, gen_images_for_metrics.sh of the release: the same PNGs,
    and the release's step in export_info.json; run_tti_eval_coco.sh samples it too."""
    export.main(["--checkpoint", run_dir, "--out-dir", str(tmp_path / "from_checkpoint"),
                 "--n", "3", "--steps", "2", "--device", "cpu"])
    result = bash("gen_images_for_metrics.sh", "cpu", 7, released, "--n", 3, "--steps", 2,
                  cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = tmp_path / "from_checkpoint", tmp_path / "eval_data_run_7"
    assert json.loads((b / "export_info.json").read_text())["checkpoint_step"] == 2
    names = sorted(os.listdir(a / "tti" / "images"))
    assert names == sorted(os.listdir(b / "tti" / "images")) and len(names) == 3
    for name in names:
        assert np.array_equal(pixels(a / "tti" / "images" / name), pixels(b / "tti" / "images" / name))
    result = bash("run_tti_eval_coco.sh", "cpu", 0, "a red circle", cwd=tmp_path,
                  TTI_RUN_DIR=str(released), TTI_OUT=str(tmp_path / "grid"),
                  TTI_SAMPLE_ARGS="--n 1 --steps 2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "grid" / "eval_grid.png").is_file()


def test_the_card_shows_the_scored_export(run_dir, tmp_path):
    export.main(["--checkpoint", run_dir, "--out-dir", str(tmp_path / "scored"), "--n", "3",
                 "--steps", "2", "--device", "cpu"])
    evaluate.evaluate(str(tmp_path / "scored"), ("judge",), device="cpu", progress=False)
    command = ["--checkpoint", run_dir, "--out", str(tmp_path / "r"), "--eval-dir", str(tmp_path / "scored")]
    release.main(command)
    card = (tmp_path / "r" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: tti\npipeline_tag: text-to-image\n")
    assert "| training | 2 steps, 32 images seen" in card
    assert "| Model | FID (↓) |" in card and "TTI caption acc." in card  # tti.evaluate's table
    assert "python -m tti.release " + " ".join(command) in card
    assert "```yaml\nrun:\n  dataset: shapes32\n" in card


def test_an_export_of_another_step_or_no_ema_is_refused(run_dir, released, tmp_path, monkeypatch,
                                                        capsys):
    scored = tmp_path / "old"
    scored.mkdir()
    (scored / "metrics.json").write_text("{}")
    (scored / "export_info.json").write_text(json.dumps({"checkpoint_step": 1}))
    code, err = run_module("tti.release", ["--checkpoint", run_dir, "--out", str(tmp_path / "r"),
                                           "--eval-dir", str(scored)], monkeypatch, capsys)
    assert_one_line(code, err, "tti.release", "exported from step 1", "at step 2")
    assert not (tmp_path / "r").exists()
    code, err = run_module("tti.sample", ["--checkpoint", str(released), "--no-ema",
                                          "--device", "cpu"], monkeypatch, capsys)
    assert_one_line(code, err, "tti.sample", "EMA weights only")


def test_a_damaged_release_says_which_file(released, tmp_path):
    from tti.infra.checkpoints import CheckpointError

    broken = tmp_path / "broken"
    shutil.copytree(released, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated"):
        load_for_inference(str(broken))
    (broken / "config.json").write_text('{"format": "other"}')
    with pytest.raises(CheckpointError, match="config.json is not a tti release config"):
        load_for_inference(str(broken))


@pytest.mark.parametrize("name,opts", [("legacy_diffusion.pt", dict(sampler="ddim", steps=3)),
                                       ("legacy_aligndraw.pt", {})])
def test_a_legacy_checkpoint_releases(name, opts, tmp_path):
    """Today's loader reads the old checkpoint without running code; its release samples as it
    does, alignDRAW's word vocabulary travelling in config.json."""
    out = tmp_path / "release"
    release.main(["--checkpoint", str(FIXTURES / name), "--out", str(out)])
    meta = json.loads((out / "config.json").read_text())
    assert (meta["text_vocab"] is not None) == ("aligndraw" in name)
    assert torch.equal(images_of(out, **opts), images_of(FIXTURES / name, **opts))


def test_a_fine_tuned_encoder_travels(tmp_path):
    """text.finetune: the encoder's trained weights are in model.safetensors and used."""
    cfg = load_config(os.path.join(REPO, "configs", "shapes32.yaml"),
                      TINY + [f"data.root={tmp_path}", "text.finetune=true"])
    torch.manual_seed(0)
    model = build(cfg, train_captions=[])
    with torch.no_grad():
        for p in model.text.parameters():
            p.add_(0.01 * torch.randn_like(p))  # unlike the pretrained weights
    weights = trainable_state(model)
    atomic_save({"model": weights, "config": cfg.to_dict(), "step": 5}, str(tmp_path / "ft.pt"))
    release.main(["--checkpoint", str(tmp_path / "ft.pt"), "--out", str(tmp_path / "release")])
    saved = load_file(tmp_path / "release" / "model.safetensors")
    text = [k for k in weights if k.startswith("text.")]
    assert text and all(torch.equal(saved[k], weights[k]) for k in text)
    assert json.loads((tmp_path / "release" / "config.json").read_text())["weights"] == "model"
    card = (tmp_path / "release" / "README.md").read_text()
    assert "fine-tuned (its weights are in model.safetensors)" in card
    assert torch.equal(images_of(tmp_path / "release", steps=2),
                       images_of(tmp_path / "ft.pt", steps=2))
