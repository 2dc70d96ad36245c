"""COCO caption loader: packing, crop geometry, caption draw, idempotence, resume, DataLoader."""
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import tti.data.prepare as prepare_module
from tti.data.coco import CaptionDataset, cache_paths, collate, load_split, main, prepare

SPLIT = "val2014"
REPO = Path(__file__).resolve().parents[1]


def write_coco(root: Path, images: dict, captions: dict, split: str = SPLIT) -> None:
    """COCO 2014 layout: images {file_name: PIL image}, captions {file_name: [str]}."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / split).mkdir(parents=True, exist_ok=True)
    entries, annotations = [], []
    for image_id, (name, img) in enumerate(images.items(), start=100):
        img.save(root / split / name)
        entries.append({"id": image_id, "file_name": name, "width": img.width, "height": img.height})
        for text in captions.get(name, []):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "caption": text})
    data = {"info": {}, "images": entries, "annotations": annotations}
    (root / "annotations" / f"captions_{split}.json").write_text(json.dumps(data), encoding="utf-8")


def solid(size, color):
    return Image.new("RGB", size, color)


def noise(size, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture
def small_coco(tmp_path):
    """Four images of different sizes and aspect ratios (one smaller than S), 2-5 captions."""
    images = {"wide.png": solid((40, 24), (200, 10, 30)), "tall.png": solid((20, 52), (5, 90, 250)),
              "square.png": noise((33, 33), 1), "tiny.png": solid((9, 7), (17, 240, 64))}
    captions = {"wide.png": ["a wide red thing", "red and wide", "something red"],
                "tall.png": ["a tall blue thing", "blue"],
                "square.png": [f"noise caption {k}" for k in range(5)],
                "tiny.png": ["tiny green", "small green", "green dot", "a green pixel"]}
    write_coco(tmp_path, images, captions)
    return tmp_path, images, captions


def test_prepare_packs_all_images_with_all_captions(small_coco):
    root, images, captions = small_coco
    path = prepare(root, SPLIT, 16, num_workers=0)
    assert path == root / "cache" / f"{SPLIT}_16px.npy"
    ds = CaptionDataset(path)
    assert len(ds) == 4 and ds.image_size == 16
    assert [ds.file_name(i) for i in range(4)] == list(images)
    assert [ds.image_id(i) for i in range(4)] == [100, 101, 102, 103]
    for i, name in enumerate(images):
        image, caption = ds[i]
        assert image.dtype == torch.uint8 and image.shape == (3, 16, 16)
        assert ds.captions(i) == captions[name]
        assert caption in captions[name]
    # Solid images stay exactly their colour whatever the scale (down- or up-sampled).
    for i, name in [(0, "wide.png"), (1, "tall.png"), (3, "tiny.png")]:
        expected = torch.tensor(images[name].getpixel((0, 0)), dtype=torch.uint8)
        assert torch.equal(ds[i][0], expected.view(3, 1, 1).expand(3, 16, 16))
    assert ds.skipped == {"unreadable_images": 0, "orphan_annotations": 0,
                          "empty_captions": 0, "images_without_captions": 0}
    # The same cache opened from the root by split and size.
    assert len(CaptionDataset(root, split=SPLIT, image_size=16)) == 4


def test_center_crop_preserves_aspect_ratio(tmp_path):
    # 64x32: left quarter red, centre half green, right quarter blue -> the square crop is green.
    wide = np.zeros((32, 64, 3), np.uint8)
    wide[:, :16], wide[:, 16:48], wide[:, 48:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    tall = np.ascontiguousarray(wide.transpose(1, 0, 2))  # 32x64: red top, blue bottom
    write_coco(tmp_path, {"wide.png": Image.fromarray(wide), "tall.png": Image.fromarray(tall)},
               {"wide.png": ["w"], "tall.png": ["t"]})
    ds = CaptionDataset(prepare(tmp_path, SPLIT, 16, num_workers=0))
    for i in range(2):
        red, green, blue = ds[i][0].int()
        # A distorting 64x32 -> 16x16 resize would put 4 pure red and 4 pure blue lines here.
        assert (green >= 230).all() and (red <= 25).all() and (blue <= 25).all()
        # Away from the crop edges (the antialiasing filter's reach) it is exactly green.
        inner = ds[i][0][:, 3:13, 3:13] if i == 0 else ds[i][0][:, 3:13, :]
        assert (inner[1] == 255).all() and (inner[0] == 0).all() and (inner[2] == 0).all()


def test_caption_choice_is_deterministic_and_varies_by_epoch(small_coco):
    root, _, _ = small_coco
    path = prepare(root, SPLIT, 16, num_workers=0)

    def draws(ds, epochs):
        out = []
        for epoch in epochs:
            ds.set_epoch(epoch)
            out.append([ds[i][1] for i in range(len(ds))])
        return out

    first = draws(CaptionDataset(path, seed=3), range(40))
    assert draws(CaptionDataset(path, seed=3), range(40)) == first  # fresh object, same data
    assert draws(CaptionDataset(path, seed=3), [7]) == [first[7]]  # a resumed run mid-way
    assert draws(CaptionDataset(path, seed=4), range(40)) != first
    ds = CaptionDataset(path, seed=3)
    for i in range(len(ds)):
        per_epoch = [epoch[i] for epoch in first]
        assert set(per_epoch) == set(ds.captions(i))  # every caption is used
        if len(ds.captions(i)) > 1:
            assert len(set(per_epoch[:10])) > 1  # not stuck on one caption
        assert per_epoch == [ds.captions(i)[ds.caption_choice(i, e)] for e in range(40)]


def test_rerun_of_complete_cache_does_no_work(small_coco, monkeypatch):
    root, _, _ = small_coco
    path = prepare(root, SPLIT, 16, num_workers=0)
    stamp = path.stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("a complete cache must not be rebuilt")

    monkeypatch.setattr(prepare_module, "load_annotations", fail)
    monkeypatch.setattr(prepare_module, "_decode_task", fail)
    assert prepare(root, SPLIT, 16, num_workers=0) == path
    assert load_split(root, SPLIT, 16, num_workers=0).images_path == path
    assert path.stat().st_mtime_ns == stamp
    # Only the finished cache (and its lock file) is left behind, no partial or progress.
    assert sorted(p.name for p in path.parent.iterdir()) == [
        f"{SPLIT}_16px.json", f"{SPLIT}_16px.lock", f"{SPLIT}_16px.npy"]


def test_newer_annotations_rebuild_the_cache(small_coco, capsys):
    root, images, captions = small_coco
    path = prepare(root, SPLIT, 16, num_workers=0)
    captions["tall.png"] = ["a new caption"]
    write_coco(root, images, captions)
    annotation_file = root / "annotations" / f"captions_{SPLIT}.json"
    later = path.with_suffix(".json").stat().st_mtime_ns + 10**9
    os.utime(annotation_file, ns=(later, later))
    main([str(root), "--split", SPLIT, "--image-size", "16", "--num-workers", "0"])
    assert f"{path}: 4 images, 13 captions" in capsys.readouterr().out
    assert CaptionDataset(path).captions(1) == ["a new caption"]
    # With the annotation file gone the cache alone is enough.
    annotation_file.unlink()
    assert CaptionDataset(prepare(root, SPLIT, 16, num_workers=0)).captions(1) == ["a new caption"]


@pytest.fixture
def twelve_images(tmp_path):
    images = {f"{k:02d}.png": noise((24 + 3 * k, 30 - k), k) for k in range(12)}
    write_coco(tmp_path / "coco", images, {name: [f"caption of {name}"] for name in images})
    clean = prepare(tmp_path / "coco", SPLIT, 8, cache_dir=tmp_path / "clean", num_workers=0)
    return tmp_path / "coco", clean


def test_killed_prepare_resumes_and_equals_clean_run(twelve_images, monkeypatch):
    root, clean = twelve_images
    real_decode, calls = prepare_module._decode_task, []

    def decode_then_die(task):
        if len(calls) == 7:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C on the 8th image
        calls.append(task[0])
        return real_decode(task)

    monkeypatch.setattr(prepare_module, "_decode_task", decode_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare(root, SPLIT, 8, cache_dir=root / "resumed", num_workers=0, checkpoint_every=3)
    paths = cache_paths(root, SPLIT, 8, root / "resumed")
    assert not paths.images.exists()  # not marked complete
    assert json.loads(paths.progress.read_text())["done"] == 7

    calls.clear()
    monkeypatch.setattr(prepare_module, "_decode_task", lambda t: calls.append(t[0]) or real_decode(t))
    resumed = prepare(root, SPLIT, 8, cache_dir=root / "resumed", num_workers=0, checkpoint_every=3)
    assert calls == list(range(7, 12))  # continued where it stopped, decoded nothing twice
    assert resumed.read_bytes() == clean.read_bytes()
    assert paths.index.read_bytes() == clean.with_suffix(".json").read_bytes()


def test_sigkilled_prepare_resumes_and_equals_clean_run(twelve_images):
    root, clean = twelve_images
    # A hard kill: no finally block runs, only the periodic progress saves survive.
    script = f"""
import os, signal
import tti.data.prepare as p
real, calls = p._decode_task, []
def decode_then_die(task):
    if len(calls) == 8:
        os.kill(os.getpid(), signal.SIGKILL)
    calls.append(task)
    return real(task)
p._decode_task = decode_then_die
p.prepare({str(root)!r}, {SPLIT!r}, 8, cache_dir={str(root / 'killed')!r}, num_workers=0,
          checkpoint_every=3)
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=60)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    paths = cache_paths(root, SPLIT, 8, root / "killed")
    assert not paths.images.exists() and paths.partial.exists()
    assert json.loads(paths.progress.read_text())["done"] == 6  # last save before the kill
    resumed = prepare(root, SPLIT, 8, cache_dir=root / "killed", num_workers=0)
    assert resumed.read_bytes() == clean.read_bytes()
    assert paths.index.read_bytes() == clean.with_suffix(".json").read_bytes()
    assert not paths.partial.exists() and not paths.progress.exists()


def test_worker_processes_give_the_same_cache(twelve_images):
    root, clean = twelve_images
    pooled = prepare(root, SPLIT, 8, cache_dir=root / "pooled", num_workers=2)
    assert pooled.read_bytes() == clean.read_bytes()


def test_dataloader_with_two_workers(twelve_images):
    root, clean = twelve_images
    ds = CaptionDataset(clean, seed=1)
    ds.set_epoch(2)
    expected = [ds[i] for i in range(len(ds))]  # opens the map in this process first
    pickled = pickle.dumps(ds)
    assert np.load(clean)[5].tobytes() not in pickled  # the map is not pickled
    assert pickle.loads(pickled)[5][1] == expected[5][1]
    loader = DataLoader(ds, batch_size=5, num_workers=2, collate_fn=collate)
    images, captions = [], []
    for batch_images, batch_captions in loader:
        assert batch_images.dtype == torch.uint8 and batch_images.shape[1:] == (3, 8, 8)
        assert isinstance(batch_captions, list)
        images.append(batch_images)
        captions += batch_captions
    assert torch.equal(torch.cat(images), torch.stack([image for image, _ in expected]))
    assert captions == [caption for _, caption in expected]
