"""The embedded shapes dataset: determinism, held-out pairs, COCO layout, caption parsing."""
import itertools
import json
import os

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

import tti.data.shapes as shapes
from tti.data.shapes import (COLOURS, HELD_OUT_PAIRS, RELATIONS, SHAPES, SIZES, Scene, ShapeObject, caption_variants,
                             generate_examples, is_held_out, parse_caption, render, write_coco)


def _all_files(root):
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            path = os.path.join(dirpath, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, root)] = fh.read()
    return out


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("shapes") / "ds")
    write_coco(out, n_train=60, n_val=30, image_size=32, seed=0)
    return out


def test_same_seed_same_bytes_and_different_seed_differs(small_dataset, tmp_path):
    write_coco(str(tmp_path / "again"), n_train=60, n_val=30, image_size=32, seed=0)
    write_coco(str(tmp_path / "other"), n_train=60, n_val=30, image_size=32, seed=1)
    first = _all_files(small_dataset)
    again, other = _all_files(str(tmp_path / "again")), _all_files(str(tmp_path / "other"))
    assert len(first) == 60 + 30 + 5  # 2 annotation files, held_out_pairs, meta, .shapes.lock
    assert first == again
    assert first.keys() == other.keys()
    differing = [k for k in first if k.endswith(".png") and first[k] != other[k]]
    assert len(differing) > 80
    assert first["annotations/captions_train2014.json"] != other["annotations/captions_train2014.json"]


def test_coco_layout_loads_with_pycocotools(small_dataset):
    for split, n in (("train", 60), ("val", 30)):
        coco = COCO(os.path.join(small_dataset, "annotations", f"captions_{split}2014.json"))
        assert len(coco.getImgIds()) == n
        for image_id in coco.getImgIds():
            info = coco.loadImgs(image_id)[0]
            assert info["file_name"] == f"COCO_{split}2014_{image_id:012d}.png"
            with Image.open(os.path.join(small_dataset, f"{split}2014", info["file_name"])) as img:
                assert img.size == (32, 32) and img.mode == "RGB"
            captions = [a["caption"] for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id))]
            assert len(captions) == 3 and len(set(captions)) == 3
            assert len({parse_caption(c) for c in captions}) == 1  # all state the same scene
    with open(os.path.join(small_dataset, "held_out_pairs.json")) as f:
        assert [tuple(p) for p in json.load(f)] == list(HELD_OUT_PAIRS)
    with open(os.path.join(small_dataset, "meta.json")) as f:
        assert json.load(f)["n_train"] == 60


def test_other_image_sizes(tmp_path):
    write_coco(str(tmp_path), n_train=3, n_val=2, image_size=64, seed=0)
    with Image.open(tmp_path / "val2014" / "COCO_val2014_001000000001.png") as img:
        assert img.size == (64, 64)
    with pytest.raises(ValueError, match="image_size"):
        write_coco(str(tmp_path / "bad"), n_train=1, n_val=1, image_size=48)


def test_second_write_does_no_work(small_dataset, monkeypatch):
    before = {p: os.stat(os.path.join(small_dataset, p)).st_mtime_ns for p in _all_files(small_dataset)}
    monkeypatch.setattr(shapes, "render_example", lambda *a, **k: pytest.fail("rendered again"))
    write_coco(small_dataset, n_train=60, n_val=30, image_size=32, seed=0)
    after = {p: os.stat(os.path.join(small_dataset, p)).st_mtime_ns for p in _all_files(small_dataset)}
    assert before == after


def _dies_after(n, monkeypatch):
    """Make the n+1-th render raise KeyboardInterrupt, as a Ctrl-C mid-way would."""
    real, calls = shapes.render_example, []

    def render(*args, **kwargs):
        calls.append(1)
        if len(calls) > n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(shapes, "render_example", render)


def _meta(out):
    with open(os.path.join(out, "meta.json")) as f:
        return json.load(f)


def test_killed_run_is_not_complete_and_rerun_finishes(tmp_path, monkeypatch):
    write_coco(str(tmp_path / "reference"), n_train=10, n_val=5, seed=0)
    reference = _all_files(str(tmp_path / "reference"))
    out = str(tmp_path / "ds")
    with monkeypatch.context() as patch:
        _dies_after(5, patch)
        with pytest.raises(KeyboardInterrupt):
            write_coco(out, n_train=10, n_val=5, seed=0)
    assert _meta(out)["complete"] is False  # claimed before the first image, never complete
    write_coco(out, n_train=10, n_val=5, seed=0)
    assert _all_files(out) == reference


def test_other_settings_are_refused_and_replace_is_explicit(tmp_path, monkeypatch):
    out = str(tmp_path / "ds")
    write_coco(out, n_train=10, n_val=5, seed=0)
    before = _all_files(out)
    with pytest.raises(shapes.ShapesFolderError) as refused:
        write_coco(out, n_train=12, n_val=5, seed=0)
    assert _all_files(out) == before
    message = str(refused.value)
    assert "other settings" in message and "n_train 10 -> 12" in message
    assert f"--out {out} --train 12 --val 5 --size 32 --seed 0 --captions-per-image 3 --replace" in message
    with monkeypatch.context() as patch:  # an interrupted replacement stays claimed by the new settings
        _dies_after(3, patch)
        with pytest.raises(KeyboardInterrupt):
            write_coco(out, n_train=6, n_val=5, seed=1, replace=True)
    assert (_meta(out)["n_train"], _meta(out)["complete"]) == (6, False)
    with pytest.raises(shapes.ShapesFolderError, match="n_train 6 -> 10"):
        write_coco(out, n_train=10, n_val=5, seed=0)
    write_coco(out, n_train=6, n_val=5, seed=1)  # the same settings resume without --replace
    write_coco(str(tmp_path / "reference"), n_train=6, n_val=5, seed=1)
    assert _all_files(out) == _all_files(str(tmp_path / "reference"))  # old train images 7-10 gone


def test_held_out_pairs_never_in_train_and_present_in_val():
    for example in generate_examples(4000, "train", seed=3):
        assert not any((o.colour, o.shape) in HELD_OUT_PAIRS for o in example.scene.objects)
        assert not any(is_held_out(c) for c in example.captions)
    val = generate_examples(1000, "val", seed=3)
    held = [any((o.colour, o.shape) in HELD_OUT_PAIRS for o in e.scene.objects) for e in val]
    assert 0.25 < np.mean(held) < 0.35
    assert all(is_held_out(c) == h for e, h in zip(val, held) for c in e.captions)
    seen_pairs = {(o.colour, o.shape) for e in val for o in e.scene.objects}
    assert set(HELD_OUT_PAIRS) <= seen_pairs


def test_val_does_not_depend_on_train_size(tmp_path):
    write_coco(str(tmp_path / "a"), n_train=5, n_val=8, seed=0)
    write_coco(str(tmp_path / "b"), n_train=9, n_val=8, seed=0)
    a, b = _all_files(str(tmp_path / "a")), _all_files(str(tmp_path / "b"))
    assert {k: v for k, v in a.items() if "val" in k} == {k: v for k, v in b.items() if "val" in k}


def test_vocabulary_coverage():
    words = " ".join(c for e in generate_examples(2000, "train", seed=0) for c in e.captions)
    for word in list(COLOURS) + list(SHAPES) + list(SIZES) + ["to the left of", "to the right of", "above", "below"]:
        assert word in words, word
    scenes = [e.scene for e in generate_examples(2000, "train", seed=0)]
    assert {len(s.objects) for s in scenes} == {1, 2}


def test_every_template_parses_back_exhaustively():
    objects = [ShapeObject(c, s, z) for c in COLOURS for s in SHAPES for z in SIZES]
    count = 0
    for a in objects:
        for caption in caption_variants(Scene.of(a)):
            assert parse_caption(caption) == Scene.of(a)
            count += 1
    for a, b in itertools.permutations(objects, 2):
        if a.colour == b.colour:
            continue
        for relation in ("left of", "above"):
            scene = Scene.of(a, relation, b)
            variants = caption_variants(scene)
            assert len(set(variants)) == 2 * len(shapes.TWO_OBJECT_TEMPLATES)
            for caption in variants:
                assert parse_caption(caption) == scene, caption
            count += len(variants)
    assert count == 36 * 4 + 36 * 30 * 2 * 14


def test_parse_normalises_relation_direction_and_text():
    red = ShapeObject("red", "circle", "small")
    blue = ShapeObject("blue", "square", "large")
    left = parse_caption("a small red circle to the left of a large blue square")
    assert left == Scene((red, blue), "left of")
    assert parse_caption("A large blue square is to the right of a small red circle.") == left
    assert parse_caption("  there is a large blue square  below a small red circle") == Scene((red, blue), "above")
    assert parse_caption("a large blue square with a small red circle above it") == Scene((red, blue), "above")
    assert parse_caption("a picture of a small red circle") == Scene((red,))
    assert parse_caption("a small red circle to the left of a large blue square") != parse_caption(
        "a small red circle to the right of a large blue square")
    for bad in ("a dog on a couch", "a small red circle next to a large blue square", "a huge red circle"):
        with pytest.raises(ValueError, match="cannot parse"):
            parse_caption(bad)
    for relation in RELATIONS:
        assert Scene.of(red, relation, blue).relation in ("left of", "above")


def test_scene_geometry_is_unambiguous():
    for e in generate_examples(3000, "val", seed=7):
        halves = [SIZES[o.size] / 2 for o in e.scene.objects]
        for (cx, cy), h in zip(e.centres, halves):
            assert h <= cx <= 1 - h and h <= cy <= 1 - h
        if len(e.scene.objects) == 2:
            assert e.scene.objects[0].colour != e.scene.objects[1].colour
            (x0, y0), (x1, y1) = e.centres
            main, cross = (x1 - x0, y1 - y0) if e.scene.relation == "left of" else (y1 - y0, x1 - x0)
            assert main >= halves[0] + halves[1] + 0.05  # boxes apart with a gap along the axis
            assert abs(cross) <= 0.5 * main + 1e-9


@pytest.mark.parametrize("shape, expected", [("square", 1.0), ("circle", np.pi / 4), ("triangle", 0.5)])
def test_render_area_matches_closed_form(shape, expected):
    obj = ShapeObject("red", shape, "large")
    img = render([obj], [(0.5, 0.5)], image_size=128)
    coverage = img[..., 0].astype(np.float64) / COLOURS["red"][0]
    side = SIZES["large"] * 128
    assert coverage.sum() == pytest.approx(expected * side * side, rel=0.02)
    assert tuple(img[0, 0]) == shapes.BACKGROUND
