"""The COCO-like fixture is shaped like COCO 2014, and what each of its oddities becomes on
the real road (prepare -> CaptionDataset -> TextEncoder -> a training run):

    no_caption     skipped and counted (skipped["images_without_captions"])
    grayscale      RGB with R == G == B          cmyk          RGB in the scene's colours
    exif_rotated   upright                       png_as_jpg    decoded by content, exactly
    long_caption   kept whole in the cache; cut to text.max_length tokens by the encoder,
                   with one warning per run (not per batch)
    non_ascii      kept byte for byte
"""
import json
import logging
import os

import numpy as np
import pytest
from coco_fixture import SIZES, render, write_coco_fixture
from PIL import Image
from torch.utils.data import DataLoader

from tti import train
from tti.data.coco import collate, load_split
from tti.data.prepare import centre_square
from tti.text.encoder import TextEncoder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 32
SPLITS = ("train2014", "val2014")
IMAGE_FIELDS = {"license", "file_name", "coco_url", "height", "width", "date_captured",
                "flickr_url", "id"}


@pytest.fixture(scope="module")
def fixture(coco_fixture):  # conftest.py writes it once per session
    return coco_fixture


@pytest.fixture(scope="module")
def packed(fixture):
    return {split: load_split(fixture.root, split, SIZE, num_workers=0) for split in SPLITS}


def annotations(fixture, split):
    path = fixture.root / "annotations" / f"captions_{split}.json"
    return json.loads(path.read_text(encoding="utf-8"))


def test_files_and_fields_are_those_of_coco_2014(fixture):
    all_ids = []
    for split in SPLITS:
        data = annotations(fixture, split)
        assert set(data) == {"info", "licenses", "images", "annotations"}
        licenses = {entry["id"] for entry in data["licenses"]}
        for entry in data["images"]:
            assert set(entry) == IMAGE_FIELDS and entry["license"] in licenses
            assert entry["file_name"] == f"COCO_{split}_{entry['id']:012d}.jpg"
            assert entry["coco_url"].endswith(f"/{split}/{entry['file_name']}")
            with Image.open(fixture.root / split / entry["file_name"]) as img:
                assert img.size == (entry["width"], entry["height"])
        assert all(set(a) == {"image_id", "id", "caption"} for a in data["annotations"])
        all_ids += [entry["id"] for entry in data["images"]]
    ids = sorted(all_ids)
    assert len(set(ids)) == len(ids)
    assert all(b - a > 1 for a, b in zip(ids, ids[1:])) and ids[-1] > 10 * len(ids)  # sparse
    assert set(SIZES[:5]) <= {scene.size for scene in fixture.scenes.values()}
    for image_id, captions in fixture.captions.items():
        if image_id != fixture.odd["train2014/no_caption"]:
            assert len(captions) == 5 and len({len(c) for c in captions}) == 5


def test_same_seed_writes_the_same_bytes_and_never_over_files(fixture, tmp_path):
    again = write_coco_fixture(tmp_path / "again")
    names = sorted(p.relative_to(fixture.root) for p in fixture.root.rglob("*")
                   if p.is_file() and "cache" not in p.parts)
    assert names == sorted(p.relative_to(again.root) for p in again.root.rglob("*") if p.is_file())
    for name in names:
        assert (fixture.root / name).read_bytes() == (again.root / name).read_bytes(), name
    with pytest.raises(FileExistsError, match="not empty"):
        write_coco_fixture(tmp_path / "again")


def rows_by_id(ds):
    return {ds.image_id(i): i for i in range(len(ds))}


def distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int64) - b.astype(np.int64)).mean())


def reference(scene, transpose=None) -> np.ndarray:
    """What the packed pixels of `scene` should be, from its lossless rendering."""
    img = render(scene)
    img = img.transpose(transpose) if transpose is not None else img
    return centre_square(img.convert("L").convert("RGB") if scene.grayscale else img, SIZE)


def test_uncaptioned_image_is_skipped_and_counted(fixture, packed):
    train_set = packed["train2014"]
    assert train_set.skipped == {"unreadable_images": 0, "orphan_annotations": 0,
                                 "empty_captions": 0, "images_without_captions": 1}
    assert fixture.odd["train2014/no_caption"] not in rows_by_id(train_set)
    assert len(train_set) == len(fixture.splits["train2014"]) - 1
    assert packed["val2014"].skipped["images_without_captions"] == 0


def test_every_image_is_rgb_and_nearest_its_own_scene(fixture, packed):
    # Each packed image, whatever its file's mode, is closer to its own scene's rendering
    # than to any other scene's: the pixels are the right ones, in the right colours.
    references = {image_id: reference(scene) for image_id, scene in fixture.scenes.items()}
    grayscale = set(fixture.odd["train2014/grayscale"] + fixture.odd["val2014/grayscale"])
    for ds in packed.values():
        for image_id, row in rows_by_id(ds).items():
            pixels = ds[row][0].numpy()
            assert pixels.shape == (3, SIZE, SIZE) and pixels.dtype == np.uint8
            nearest = min(references, key=lambda other: distance(pixels, references[other]))
            assert nearest == image_id
            gray = (pixels[0] == pixels[1]).all() and (pixels[1] == pixels[2]).all()
            assert gray == (image_id in grayscale)


def test_cmyk_jpeg_has_its_colours_not_their_negative(fixture, packed):
    image_id = fixture.odd["train2014/cmyk"]
    assert Image.open(fixture.path(image_id)).mode == "CMYK"
    pixels = packed["train2014"][rows_by_id(packed["train2014"])[image_id]][0].numpy()
    expected = reference(fixture.scenes[image_id])
    assert distance(pixels, expected) < distance(pixels, 255 - expected)


def test_exif_rotated_image_is_upright(fixture, packed):
    image_id = fixture.odd["train2014/exif_rotated"]
    with Image.open(fixture.path(image_id)) as stored:  # stored sideways, tagged
        assert stored.getexif()[0x0112] == 6
        assert stored.size == fixture.scenes[image_id].size[::-1]
    pixels = packed["train2014"][rows_by_id(packed["train2014"])[image_id]][0].numpy()
    scene = fixture.scenes[image_id]
    turns = [None, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180,
             Image.Transpose.ROTATE_270]
    nearest = min(turns, key=lambda turn: distance(pixels, reference(scene, turn)))
    assert nearest is None


def test_png_under_a_jpg_name_is_decoded_by_content(fixture, packed):
    image_id = fixture.odd["train2014/png_as_jpg"]
    assert fixture.path(image_id).suffix == ".jpg"
    assert fixture.path(image_id).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = packed["train2014"][rows_by_id(packed["train2014"])[image_id]][0].numpy()
    np.testing.assert_array_equal(pixels, reference(fixture.scenes[image_id]))  # lossless


def test_captions_are_kept_exactly_but_stripped(fixture, packed):
    for split, ds in packed.items():
        for image_id, row in rows_by_id(ds).items():
            assert sorted(ds.captions(row)) == sorted(c.strip() for c in fixture.captions[image_id])
    rows = rows_by_id(packed["train2014"])
    long_row = rows[fixture.odd["train2014/long_caption"]]
    assert max(len(c) for c in packed["train2014"].captions(long_row)) > 1000
    non_ascii = [c for c in packed["train2014"].captions(rows[fixture.odd["train2014/non_ascii"]])
                 if not c.isascii()]
    assert len(non_ascii) == 1 and "à gauche d’un" in non_ascii[0] and "☕" in non_ascii[0]


def truncation_warnings(caplog):
    return [r for r in caplog.records if r.name == "tti.text.encoder" and "text.max_length" in r.message]


def test_long_captions_are_cut_with_one_warning_per_run(packed, tiny_roberta, caplog):
    max_length = 16
    train_set = packed["train2014"]
    encoder = TextEncoder(tiny_roberta, max_length=max_length, cache=False)
    loader = DataLoader(train_set, batch_size=4, shuffle=False, collate_fn=collate)
    over_long_batches = 0
    with caplog.at_level(logging.WARNING, logger="tti.text.encoder"):
        for epoch in range(2):
            train_set.set_epoch(epoch)
            for _, captions in loader:
                text = encoder(captions)
                assert text.mask.shape[1] <= max_length
                lengths = [len(ids) for ids in encoder.tokenizer(captions)["input_ids"]]
                over_long_batches += max(lengths) > max_length
    assert over_long_batches >= 2  # so "once" is not "once per batch"
    assert len(truncation_warnings(caplog)) == 1
    assert "text.max_length=16" in truncation_warnings(caplog)[0].message
    # The longest caption keeps its first tokens and still ends in </s>.
    longest = max((c for i in range(len(train_set)) for c in train_set.captions(i)), key=len)
    text = encoder([longest])
    ids = encoder.tokenizer([longest], truncation=True, max_length=max_length)["input_ids"][0]
    assert int(text.mask.sum()) == max_length and ids[0] == 0 and ids[-1] == 2
    # A new encoder is a new run: it says so again, once.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tti.text.encoder"):
        TextEncoder(tiny_roberta, max_length=max_length, cache=False)([longest, longest])
    assert len(truncation_warnings(caplog)) == 1


def test_a_fine_tuned_roberta_run_on_the_fixture(fixture, packed, tiny_roberta, tmp_path, caplog):
    sets = {"text.name": tiny_roberta, "text.max_length": 16, "data.root": fixture.root,
            "data.num_workers": 0, "run.results_dir": tmp_path, "model.unet.channels": "[16, 32, 32]",
            "model.unet.num_res_blocks": 1, "model.unet.head_dim": 16, "train.batch_size": 8,
            "train.steps": 2, "train.warmup_steps": 1, "train.ckpt_every": 2,
            "train.log_every": 1, "sample.steps": 2}
    args = ["--config", os.path.join(REPO, "configs", "coco32_ft_roberta.yaml"), "--device", "cpu"]
    for key, value in sets.items():
        args += ["--set", f"{key}={value}"]
    with caplog.at_level(logging.WARNING, logger="tti.text.encoder"):
        run_dir = train.main(args)
    assert os.path.isfile(os.path.join(run_dir, "checkpoints", "latest.pt"))
    assert len(truncation_warnings(caplog)) == 1
    log = open(os.path.join(run_dir, "log.txt"), encoding="utf-8").read()
    kept = len(fixture.splits["train2014"]) - 1
    assert f"data train2014: {kept} images at 32px, skipped 1 images without captions" in log
