"""Metric export on a tiny trained run: files and captions one to one, resume that redoes only
what is missing or broken (also after real SIGKILLs at random moments), pixels fixed per id
whatever the batch size or sharding, one-line errors of tti.sample / tti.export on a real
checkpoint, and the bash launchers."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from tti import export
from tti.eval import export_folder
from tti.eval import items as export_items
from tti.data.coco import load_split
from tti.models.text_to_image import load_for_inference

from tiny_run import REPO, train_tiny_run  # tests/ is on sys.path under pytest

N = 10


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return train_tiny_run(tmp_path_factory)


@pytest.fixture(scope="module")
def first_export(tiny_run, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("eval") / "eval_data_run_0")
    export.main(["--checkpoint", tiny_run, "--out-dir", out, "--n", str(N), "--batch-size", "4",
                 "--device", "cpu"])
    return out


def pixels(folder):
    return {os.path.splitext(n)[0]: np.asarray(Image.open(os.path.join(folder, n)))
            for n in sorted(os.listdir(folder))}


def read_json(path):
    with open(path) as f:
        return json.load(f)


def test_files_and_captions_match_one_to_one(first_export):
    paths = export_folder.export_paths(first_export)
    gt, tti = read_json(paths["gt_json"]), read_json(paths["tti_json"])
    ids = [export_items.item_id(i) for i in range(N)]
    assert sorted(gt) == sorted(tti) == ids
    assert gt == tti
    for kind in ("gt", "tti"):
        names = sorted(os.listdir(paths[kind]))
        assert names == [i + ".png" for i in ids]  # nothing else: no temp file, no JPEG
        for name in names:
            with open(os.path.join(paths[kind], name), "rb") as f:
                assert f.read(8) == b"\x89PNG\r\n\x1a\n"
            with Image.open(os.path.join(paths[kind], name)) as image:
                assert image.size == (32, 32) and image.mode == "RGB"
    info = read_json(paths["info"])
    assert info["status"] == "complete" and info["n"] == N
    assert info["timings"]["generated"] == N
    for key in ("checkpoint", "config", "sampler_options", "seed", "data_root", "hardware"):
        assert key in info


def test_gt_images_and_captions_come_from_the_val_cache(first_export):
    info = read_json(os.path.join(first_export, "export_info.json"))
    val = load_split(info["data_root"], "val2014", 32)
    selection = read_json(os.path.join(first_export, "selection.json"))
    captions = read_json(os.path.join(first_export, "gt", "gt_captions.json"))
    gt = pixels(os.path.join(first_export, "gt", "images"))
    rows = [s["row"] for s in selection.values()]
    assert len(set(rows)) == N  # N distinct val images
    assert rows != list(range(N))  # a seeded subset, not the first N
    for i, s in selection.items():
        assert np.array_equal(gt[i], val[s["row"]][0].permute(1, 2, 0).numpy())
        assert captions[i] == val.captions(s["row"])[s["caption_index"]]
        assert s["image_id"] == val.image_id(s["row"])
    assert any(s["caption_index"] != 0 for s in selection.values())  # not always the first


def test_selection_is_a_prefix_and_fixed_by_the_seed(first_export):
    val = load_split(read_json(os.path.join(first_export, "export_info.json"))["data_root"],
                     "val2014", 32)
    assert export_items.choose_items(val, 5, seed=0) == export_items.choose_items(val, 12, seed=0)[:5]
    assert export_items.choose_items(val, 100, seed=0) == export_items.choose_items(val, 16, seed=0)
    assert export_items.choose_items(val, 12, seed=1) != export_items.choose_items(val, 12, seed=0)


def test_resume_redoes_only_missing_and_truncated_pngs(first_export, tiny_run, tmp_path):
    out = str(tmp_path / "resumed")
    shutil.copytree(first_export, out)
    before = {k: pixels(os.path.join(out, k, "images")) for k in ("gt", "tti")}
    tti_dir = os.path.join(out, "tti", "images")
    mtimes = {n: os.stat(os.path.join(tti_dir, n)).st_mtime_ns for n in os.listdir(tti_dir)}
    os.remove(os.path.join(tti_dir, "000001.png"))
    os.remove(os.path.join(tti_dir, "000007.png"))
    os.remove(os.path.join(out, "gt", "images", "000003.png"))
    with open(os.path.join(tti_dir, "000004.png"), "r+b") as f:  # as if killed mid-write
        f.truncate(os.path.getsize(f.name) // 2)
    with open(os.path.join(tti_dir, ".000005.png.tmp-12345"), "wb") as f:  # a killed write's leftover
        f.write(b"\x89PNG")
    export.main(["--checkpoint", tiny_run, "--out-dir", out, "--n", str(N), "--batch-size", "3",
                 "--device", "cpu"])
    info = read_json(os.path.join(out, "export_info.json"))
    assert info["timings"]["generated"] == 3 and info["timings"]["reused"] == N - 3
    redone = {"000001.png", "000004.png", "000007.png"}
    for name, mtime in mtimes.items():
        if name not in redone:
            assert os.stat(os.path.join(tti_dir, name)).st_mtime_ns == mtime, name
    assert sorted(os.listdir(tti_dir)) == sorted(mtimes)  # the stray temporary file is gone
    for kind in ("gt", "tti"):
        after = pixels(os.path.join(out, kind, "images"))
        assert after.keys() == before[kind].keys()
        for i in after:
            assert np.array_equal(after[i], before[kind][i]), (kind, i)


def finished_pngs(folder) -> int:
    return len([n for n in os.listdir(folder) if n.endswith(".png") and not n.startswith(".")]) \
        if os.path.isdir(folder) else 0


def wait_for_more_pngs(proc, folder, timeout=240) -> None:
    """Block until `folder` holds more finished PNGs than now (the export `proc` still runs)."""
    start, deadline = finished_pngs(folder), time.time() + timeout
    while finished_pngs(folder) == start:
        assert proc.poll() is None, "the export ended before it could be killed"
        assert time.time() < deadline, f"no new PNG in {folder} after {timeout}s"
        time.sleep(0.002)


def test_export_sigkilled_at_random_moments_ends_like_an_uninterrupted_one(
        first_export, tiny_run, tmp_path):
    """Killed twice at seeded random moments while it writes images (a random fraction of one
    batch's time after a batch lands), then run again: one whole PNG per id in both folders,
    and, for the ids it shares with the uninterrupted export, the same pixels and captions."""
    args = ["--checkpoint", tiny_run, "--n", "16", "--batch-size", "1", "--device", "cpu"]
    killed = str(tmp_path / "killed")
    images = os.path.join(killed, "tti", "images")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    rng = random.Random(5)
    for _ in range(2):
        proc = subprocess.Popen([sys.executable, "-m", "tti.export", "--out-dir", killed] + args,
                                cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        wait_for_more_pngs(proc, images)
        t0 = time.perf_counter()
        wait_for_more_pngs(proc, images)
        time.sleep(rng.uniform(0.0, time.perf_counter() - t0))  # within the next batch
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
        assert finished_pngs(images) < 16, "the export finished before it was killed"
    export.main(["--out-dir", killed] + args)
    ids = [export_items.item_id(i) for i in range(16)]
    for kind in ("gt", "tti"):
        folder = export_folder.export_paths(killed)[kind]
        assert sorted(os.listdir(folder)) == [i + ".png" for i in ids]  # no temp file left
        after, straight = pixels(folder), pixels(export_folder.export_paths(first_export)[kind])
        assert straight.keys() == set(ids[:N])
        for i in straight:
            assert np.array_equal(after[i], straight[i]), (kind, i)
    for key in ("gt_json", "tti_json"):
        captions = read_json(export_folder.export_paths(killed)[key])
        straight = read_json(export_folder.export_paths(first_export)[key])
        assert sorted(captions) == ids and {i: captions[i] for i in ids[:N]} == straight
    assert read_json(export_folder.export_paths(killed)["info"])["status"] == "complete"


def test_pixels_do_not_depend_on_batch_size_or_sharding(first_export, tiny_run, tmp_path):
    model, cfg = load_for_inference(tiny_run, "cpu")
    val = load_split(cfg.data.root, "val2014", 32)
    items = export_items.choose_items(val, N, seed=0)
    opts = model.sampler_options(cfg)
    out = str(tmp_path / "sharded")
    for key in ("gt", "tti"):
        os.makedirs(export_folder.export_paths(out)[key])
    # Two "ranks" of a world of 2 with batch sizes 1 and 3, then rank 0's finalize.
    export_folder.export_shard(model, val, items, out, 0, opts, batch_size=1, rank=1, world_size=2,
                        progress=False)
    export_folder.export_shard(model, val, items, out, 0, opts, batch_size=3, rank=0, world_size=2,
                        progress=False)
    export_folder.finalize(items, out, 32)
    reference = pixels(os.path.join(first_export, "tti", "images"))
    sharded = pixels(os.path.join(out, "tti", "images"))
    assert sharded.keys() == reference.keys()
    for i in reference:
        assert np.array_equal(sharded[i], reference[i]), i
    # ...and the images are not all alike (each id has its own noise).
    assert not np.array_equal(reference["000000"], reference["000001"])


def test_other_settings_are_refused_and_n_is_capped(first_export, tiny_run, tmp_path, capsys):
    out = str(tmp_path / "other")
    shutil.copytree(first_export, out)
    with pytest.raises(export_folder.ExportError, match="other settings"):
        export.main(["--checkpoint", tiny_run, "--out-dir", out, "--n", str(N),
                     "--guidance", "3", "--device", "cpu"])
    # A smaller --n drops the extra pairs without sampling anything.
    export.main(["--checkpoint", tiny_run, "--out-dir", out, "--n", "4", "--device", "cpu"])
    assert sorted(read_json(os.path.join(out, "tti", "tti_captions.json"))) == \
        [export_items.item_id(i) for i in range(4)]
    assert len(os.listdir(os.path.join(out, "tti", "images"))) == 4
    assert read_json(os.path.join(out, "export_info.json"))["timings"]["generated"] == 0
    # --overwrite starts again with the new settings.
    export.main(["--checkpoint", tiny_run, "--out-dir", out, "--n", "4", "--guidance", "3",
                 "--overwrite", "--device", "cpu"])
    info = read_json(os.path.join(out, "export_info.json"))
    assert info["timings"]["generated"] == 4 and info["sampler_options"]["guidance"] == 3.0
    capsys.readouterr()
    capped = str(tmp_path / "capped")
    export.main(["--checkpoint", tiny_run, "--out-dir", capped, "--n", "1000", "--steps", "1",
                 "--device", "cpu"])
    assert "more than the 16 val images" in capsys.readouterr().out
    assert len(read_json(os.path.join(capped, "gt", "gt_captions.json"))) == 16


def test_mistakes_found_after_loading_are_one_line(first_export, tiny_run, tmp_path, monkeypatch,
                                                   capsys):
    from test_cli import assert_one_line, run_module

    legacy = os.path.join(os.path.dirname(__file__), "fixtures", "legacy_diffusion.pt")
    code, err = run_module("tti.sample", ["--checkpoint", legacy, "--steps", "1001", "--device", "cpu",
                                          "--out", str(tmp_path / "grid.png")],
                           monkeypatch, capsys)  # a Gaussian checkpoint with T = 1,000
    assert_one_line(code, err, "tti.sample", "--steps 1001", "1000 diffusion steps")
    out = str(tmp_path / "other")
    shutil.copytree(first_export, out)
    code, err = run_module("tti.export", ["--checkpoint", tiny_run, "--out-dir", out, "--n", str(N),
                                          "--guidance", "3", "--device", "cpu"], monkeypatch, capsys)
    assert_one_line(code, err, "tti.export", "other settings", "--overwrite")


def test_png_is_complete_rejects_broken_files(tmp_path):
    path = str(tmp_path / "a.png")
    export_folder.save_png(np.full((3, 8, 8), 200, np.uint8), path)
    assert export_folder.png_is_complete(path, 8)
    assert not export_folder.png_is_complete(path, 16)  # wrong size
    with open(path, "r+b") as f:
        f.truncate(40)
    assert not export_folder.png_is_complete(path, 8)
    assert not export_folder.png_is_complete(str(tmp_path / "missing.png"), 8)
    with pytest.raises(ValueError, match="uint8"):
        export_folder.save_png(np.zeros((3, 8, 8), np.float32), path)


@pytest.mark.parametrize("script", ["gen_images_for_metrics.sh", "run_tti_eval_coco.sh"])
def test_launchers_parse(script):
    subprocess.run(["bash", "-n", os.path.join(REPO, script)], check=True)


def test_gen_images_for_metrics_on_cpu(tiny_run, tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO, PATH=os.path.dirname(sys.executable) + os.pathsep
               + os.environ["PATH"])
    out = str(tmp_path / "launched")
    result = subprocess.run(["bash", os.path.join(REPO, "gen_images_for_metrics.sh"), "cpu", "7",
                             tiny_run, "--out-dir", out, "--n", "3", "--steps", "2"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(read_json(os.path.join(out, "tti", "tti_captions.json"))) == 3
    assert len(os.listdir(os.path.join(out, "tti", "images"))) == 3
    usage = subprocess.run(["bash", os.path.join(REPO, "gen_images_for_metrics.sh"), "cpu"],
                           capture_output=True, text=True)
    assert usage.returncode == 2 and "usage" in usage.stderr


def test_per_sample_generators_make_each_image_independent_of_its_batch():
    from tti.models.aligndraw.model import AlignDraw
    from diffusion_helpers import gaussian
    from tti.text.batch import TextBatch
    from tti.models.backbones.unet import UNetConfig
    from tti.models.backbones.unet import UNet

    torch.manual_seed(0)
    unet = UNet(UNetConfig(channels=[8, 16], num_res_blocks=1, attn_resolutions=[8], head_dim=8),
                image_size=16, context_dim=8)
    diffusion = gaussian(unet, timesteps=10, image_size=16).eval()
    text = TextBatch(torch.randn(3, 4, 8), torch.ones(3, 4, dtype=torch.bool))
    null = TextBatch(torch.zeros(1, 1, 8), torch.ones(1, 1, dtype=torch.bool))
    words = TextBatch(torch.tensor([[2, 3, 4], [5, 6, 0], [7, 2, 3]]),
                      torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1]], dtype=torch.bool))
    draw = AlignDraw(vocab_size=10, image_size=16, draw_steps=3, read_n=3, write_n=4, word_dim=8,
                     lang_dim=8, align_dim=12, latent_dim=6, enc_dim=16, dec_dim=16).eval()
    cases = [(diffusion, text, dict(sampler="ddpm", guidance=2.0, null_text=null)),
             (diffusion, text, dict(sampler="ddim", steps=4, eta=1.0)),
             (draw, words, {})]
    for model, batch, opts in cases:
        gens = lambda: [export_items.sample_generator(0, i) for i in range(3)]
        together = model.sample(batch, gens(), **opts)
        for i in range(3):
            alone = model.sample(batch.index(slice(i, i + 1)), [gens()[i]], **opts)
            torch.testing.assert_close(alone[0], together[i], atol=1e-5, rtol=0)
        assert not torch.allclose(together[0], together[1])
