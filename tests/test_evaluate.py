"""Evaluation of a tiny export end to end: metrics.json with judge accuracies, CLIP reported
unavailable offline, FID wiring, reasons for every missing metric, the markdown table.

FID here runs through a stand-in feature function (monkeypatched `_run_inception`, 6-d colour
statistics): the real packaged Inception plus a 2048-d sqrtm takes ~100 s on the 2-core build
machine, over this file's budget. tests/test_fid.py covers the network itself.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg

from tti import evaluate, export
from tti.eval.metrics import fid as fid_module
from tti.eval.metrics.judge import judge_batch

from tiny_run import REPO, train_tiny_run  # tests/ is on sys.path under pytest

N = 8


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    run_dir = train_tiny_run(tmp_path_factory)
    out = str(tmp_path_factory.mktemp("eval") / "eval_data_run_0")
    export.main(["--checkpoint", run_dir, "--out-dir", out, "--n", str(N), "--device", "cpu"])
    return out


@pytest.fixture(scope="module")
def tiny_run_dir(tiny_export):
    return json.load(open(os.path.join(tiny_export, "export_info.json")))["checkpoint"]


def colour_features(batch):
    """Stand-in for the Inception: per-channel mean and std of float [B, 3, 299, 299]."""
    x = batch.double().flatten(2)
    return np.concatenate([x.mean(-1).numpy(), x.std(-1).numpy()], axis=1)


@pytest.fixture
def fake_inception(monkeypatch):
    """Swap the Inception for colour_features (see the module docstring)."""
    def run(batches, device, total, progress):
        return np.concatenate([colour_features(b) for b in batches])
    monkeypatch.setattr(fid_module, "_run_inception", run)


def reference_fid(folder_a, folder_b, resize="clean"):
    """Closed-form Fréchet distance of the stand-in features, computed independently."""
    def network_input(array):  # both resizes as tti/eval/metrics/fid.py's docstring defines them
        if resize == "clean":
            return (torch.from_numpy(fid_module.clean_resize(array)).permute(2, 0, 1) - 128) / 128
        x = torch.tensor(array).permute(2, 0, 1).float()[None] / 255
        return 2 * torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear")[0] - 1

    def feats(folder):
        arrays = [np.asarray(Image.open(os.path.join(folder, n)).convert("RGB"))
                  for n in sorted(os.listdir(folder))]
        return colour_features(torch.stack([network_input(a) for a in arrays]))
    a, b = feats(folder_a), feats(folder_b)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(s1 @ s2).real
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * root))


def fresh_copy(eval_dir, dest):
    """A copy of the export without any metrics.json an earlier test wrote."""
    shutil.copytree(eval_dir, dest)
    if os.path.exists(os.path.join(dest, "metrics.json")):
        os.remove(os.path.join(dest, "metrics.json"))
    return str(dest)


def load(folder):
    return [np.asarray(Image.open(os.path.join(folder, n))) for n in sorted(os.listdir(folder))]


def test_end_to_end_metrics_json(tiny_export, fake_inception, tmp_path):
    result = evaluate.evaluate(tiny_export, device="cpu", fid_cache_dir=str(tmp_path), progress=False)
    on_disk = json.load(open(os.path.join(tiny_export, "metrics.json")))
    assert on_disk == json.loads(json.dumps(result))
    assert "fid_unavailable" not in result, result["fid_unavailable"]
    assert result["n"] == N and result["fid_n"] == N and result["fid_resize"] == "clean"
    assert result["fid"] == pytest.approx(reference_fid(os.path.join(tiny_export, "gt", "images"),
                                                        os.path.join(tiny_export, "tti", "images")),
                                          rel=1e-6)
    assert "clip_score_gt" not in result and "not available locally" in result["clip_score_unavailable"]
    assert "fid_unavailable" not in result and "caption_accuracy_unavailable" not in result
    captions = json.load(open(os.path.join(tiny_export, "tti", "tti_captions.json")))
    ordered = [captions[k] for k in sorted(captions)]
    for kind in ("gt", "tti"):
        acc = result[f"caption_accuracy_{kind}"]
        assert acc == judge_batch(load(os.path.join(tiny_export, kind, "images")), ordered)
        for key in ("all", "colour", "shape", "size", "relation", "seen", "held_out"):
            assert key in acc
        assert acc["seen"]["count"] + acc["held_out"]["count"] == N
    assert result["caption_accuracy_gt"]["all"] >= 0.9  # the dataset's own renders
    assert result["model"].startswith("shapes32: 32x32 rectified flow, logit-normal(0, 1) t, "
                                      "shift 2, UNet 16/32 "
                                      "(packaged-minilm frozen), DPM++(2M) 4, g=2")


def test_pytorch_fid_resize_is_used_and_named(tiny_export, fake_inception, tmp_path):
    copy = fresh_copy(tiny_export, tmp_path / "copy")
    folders = [os.path.join(copy, kind, "images") for kind in ("gt", "tti")]
    result = evaluate.evaluate(copy, metrics=("fid",), fid_cache_dir=str(tmp_path / "cache"),
                               progress=False, fid_resize="pytorch-fid")
    assert result["fid_resize"] == "pytorch-fid"
    assert result["fid"] == pytest.approx(reference_fid(*folders, "pytorch-fid"), rel=1e-5)
    assert result["fid"] != pytest.approx(reference_fid(*folders, "clean"), rel=1e-3)
    assert f"(n={N}, pytorch-fid resize)" in evaluate.markdown_table(result)
    with pytest.raises(ValueError, match="resize"):
        evaluate.evaluate(copy, metrics=("fid",), progress=False, fid_resize="bilinear")


def test_identical_folders_give_zero_fid(tiny_export, fake_inception, tmp_path):
    same = fresh_copy(tiny_export, tmp_path / "same")
    shutil.rmtree(os.path.join(same, "tti", "images"))
    shutil.copytree(os.path.join(same, "gt", "images"), os.path.join(same, "tti", "images"))
    result = evaluate.evaluate(same, metrics=("fid", "judge"), fid_cache_dir=None, progress=False)
    assert abs(result["fid"]) < 1e-6
    assert result["caption_accuracy_tti"] == result["caption_accuracy_gt"]
    assert result["clip_score_unavailable"].startswith("not requested")


def test_missing_metrics_say_why_and_earlier_values_are_kept(tiny_export, fake_inception, tmp_path):
    copy = fresh_copy(tiny_export, tmp_path / "copy")
    first = evaluate.evaluate(copy, metrics=("fid",), fid_cache_dir=None, progress=False)
    assert first["caption_accuracy_unavailable"].startswith("not requested")
    second = evaluate.evaluate(copy, metrics=("judge",), data_root=str(tmp_path), progress=False)
    assert second["fid"] == first["fid"]  # same images: the earlier FID is kept
    assert "not the embedded shapes dataset" in second["caption_accuracy_unavailable"]
    os.remove(os.path.join(copy, "tti", "images", sorted(os.listdir(os.path.join(copy, "tti", "images")))[0]))
    with pytest.raises(ValueError, match="one to one"):
        evaluate.evaluate(copy, metrics=("judge",), progress=False)


def test_fid_unavailable_without_the_inception(tiny_export, monkeypatch, tmp_path):
    def missing():
        raise RuntimeError("FID needs the Inception-2015-12-05 network ... not installed")
    monkeypatch.setattr(fid_module, "inception_path", missing)
    copy = fresh_copy(tiny_export, tmp_path / "copy")
    result = evaluate.evaluate(copy, metrics=("fid",), progress=False)
    assert "not installed" in result["fid_unavailable"] and "fid" not in result


def test_cli_prints_the_results_table(tiny_export, fake_inception, tmp_path, capsys):
    copy = fresh_copy(tiny_export, tmp_path / "copy")
    evaluate.main([copy, "--metrics", "fid,judge", "--device", "cpu", "--no-fid-cache"])
    out = capsys.readouterr().out
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| Model"))
    header, rule, row = lines[start:start + 3]
    assert header.startswith("| Model | FID") and "GT CLIP Score" in header and "TTI held-out" in header
    assert row.count("|") == header.count("|") == rule.count("|")
    assert f"(n={N}, clean resize)" in row and "n/a" in row
    assert "clip_score_unavailable: not requested" in out
    with pytest.raises(SystemExit):
        evaluate.main([copy, "--metrics", "fid,bleu"])


def test_run_tti_eval_coco_writes_grid_and_gif(tiny_run_dir, tmp_path):
    script = os.path.join(REPO, "run_tti_eval_coco.sh")
    env = dict(os.environ, PYTHONPATH=REPO, TTI_RUN_DIR=tiny_run_dir, TTI_OUT=str(tmp_path),
               TTI_SAMPLE_ARGS="--n 2 --steps 2",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    result = subprocess.run(["bash", script, "cpu", "0", "a large red circle", "a small blue square"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert Image.open(tmp_path / "eval_grid.png").size[1] >= 2 * 64
    assert Image.open(tmp_path / "eval_denoise.gif").n_frames == 2
    # A run folder without a checkpoint, and a run index nobody has, fail with a reason.
    env["TTI_RUN_DIR"] = str(tmp_path)
    result = subprocess.run(["bash", script, "cpu", "0"], env=env, capture_output=True, text=True)
    assert result.returncode == 1 and "no checkpoints/latest.pt" in result.stderr
    # Without TTI_RUN_DIR: the run of TTI_CONFIG (default coco64_ft_roberta) with that index.
    del env["TTI_RUN_DIR"]
    env["TTI_CONFIG"] = "configs/coco32_cpu.yaml"
    result = subprocess.run(["bash", script, "cpu", "987654321"], env=env, capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.startswith("results/coco32_cpu_diffusion/987654321 has no checkpoints")
