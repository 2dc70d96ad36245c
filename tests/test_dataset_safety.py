"""The shapes generator never writes over a user's data, with real processes: training the
quickstart config on a COCO folder leaves every byte of it alone and says why; a shapes
folder made with other counts is refused; a generation SIGKILLed mid-way completes on rerun."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image
from test_run_lock import REPO, tree_digest, train_args

from tti import train
from tti.data.shapes import ShapesFolderError, write_coco

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)


def fake_coco(root):
    """A user's COCO 2014 folder in miniature: two JPEGs per split, their caption files."""
    for split in ("train", "val"):
        os.makedirs(os.path.join(root, f"{split}2014"))
        images, annotations = [], []
        for i in (1, 2):
            name = f"COCO_{split}2014_{i:012d}.jpg"
            Image.new("RGB", (64, 48), (40 * i, 90, 200)).save(os.path.join(root, f"{split}2014", name))
            images.append({"id": i, "file_name": name, "height": 48, "width": 64})
            annotations.append({"id": i, "image_id": i, "caption": f"a photo number {i}"})
        os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
        with open(os.path.join(root, "annotations", f"captions_{split}2014.json"), "w") as f:
            json.dump({"images": images, "annotations": annotations}, f)


def test_quickstart_config_on_a_coco_folder_changes_nothing_and_says_why(tmp_path):
    coco = str(tmp_path / "coco")
    fake_coco(coco)
    before = tree_digest(coco)
    trained = subprocess.run(
        [sys.executable, "-m", "tti.train", "--config", "configs/shapes32.yaml", "--device", "cpu",
         "--set", f"data.root={coco}", "--set", f"run.results_dir={tmp_path / 'results'}"],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    generated = subprocess.run([sys.executable, "-m", "tti.data.shapes", "--out", coco, "--train", "4",
                                "--val", "2", "--replace"],
                               cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert tree_digest(coco) == before  # every file keeps its md5; nothing added
    for done in (trained, generated):
        assert done.returncode != 0
        assert f"{coco} holds annotations/captions_train2014.json, annotations/captions_val2014.json" \
               in done.stderr, done.stderr[-2000:]
        assert "not written by the shapes generator" in done.stderr
        assert "data.generate_shapes=false" in done.stderr


def test_shapes_folder_with_other_counts_is_refused_by_training(tmp_path):
    root = str(tmp_path / "shapes")
    write_coco(root, n_train=96, n_val=16, image_size=32, seed=0)
    before = tree_digest(root)
    with pytest.raises(ShapesFolderError, match="n_train 96 -> 128") as refused:
        train.main(train_args(root, tmp_path / "results", "data.shapes_train=128"))
    assert "--train 128 --val 16 --size 32 --seed 0 --captions-per-image 3 --replace" in str(refused.value)
    assert tree_digest(root) == before


def test_generation_sigkilled_midway_completes_on_rerun(tmp_path):
    args = ["--train", "600", "--val", "20", "--size", "32", "--seed", "0"]
    out = str(tmp_path / "killed")
    proc = subprocess.Popen([sys.executable, "-m", "tti.data.shapes", "--out", out] + args,
                            cwd=REPO, env=ENV, stderr=subprocess.DEVNULL)
    images = os.path.join(out, "train2014")
    deadline = time.time() + 120
    while not (os.path.isdir(images) and len(os.listdir(images)) >= 20) and time.time() < deadline:
        assert proc.poll() is None, "generation ended before it could be killed"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    with open(os.path.join(out, "meta.json")) as f:
        assert json.load(f)["complete"] is False
    assert len(os.listdir(images)) < 600, "the run finished before it was killed"

    from tti.data import shapes
    shapes.main(["--out", out] + args)  # the same command again: no --replace needed
    shapes.main(["--out", str(tmp_path / "straight")] + args)
    assert tree_digest(out) == tree_digest(str(tmp_path / "straight"))  # no stray .tmp either
