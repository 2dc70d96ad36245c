"""COCO loader on bad data: broken images, odd pixel modes, broken JSON, odd annotations."""
import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tti.data.coco import (AnnotationError, BadDataError, CaptionDataset, load_annotations,
                           prepare)

SPLIT = "train2014"


def write_layout(root: Path, files: dict, images: list, annotations: list) -> Path:
    """files {name: bytes}; images/annotations are the raw COCO lists. Returns the json path."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / SPLIT).mkdir(parents=True, exist_ok=True)
    for name, blob in files.items():
        (root / SPLIT / name).write_bytes(blob)
    path = root / "annotations" / f"captions_{SPLIT}.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}, ensure_ascii=False),
                    encoding="utf-8")
    return path


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def one_caption_each(names):
    images = [{"id": k, "file_name": name} for k, name in enumerate(names)]
    annotations = [{"id": 1000 + k, "image_id": k, "caption": f"picture {name}"}
                   for k, name in enumerate(names)]
    return images, annotations


def good_jpeg(seed):
    rng = np.random.default_rng(seed)
    return encode(Image.fromarray(rng.integers(0, 256, (20, 28, 3), dtype=np.uint8)), "JPEG")


def test_unreadable_images_are_skipped_counted_and_reported(tmp_path, caplog):
    files = {f"good{k}.jpg": good_jpeg(k) for k in range(7)}
    files["truncated.jpg"] = good_jpeg(99)[:300]
    files["corrupt.jpg"] = b"\xff\xd8\xff\xe0 this is not really a JPEG" * 10
    names = list(files) + ["missing.jpg"]
    write_layout(tmp_path, files, *one_caption_each(names))
    with caplog.at_level(logging.INFO, logger="tti.data.prepare"):
        ds = CaptionDataset(prepare(tmp_path, SPLIT, 8, num_workers=0, max_bad_fraction=0.5))
    assert len(ds) == 7 and [ds.file_name(i) for i in range(7)] == names[:7]
    assert [ds.image_id(i) for i in range(7)] == list(range(7))
    assert ds.skipped["unreadable_images"] == 3
    for name in ("truncated.jpg", "corrupt.jpg", "missing.jpg"):
        assert name in caplog.text
    assert "truncated" in caplog.text and "No such file" in caplog.text
    assert "'unreadable_images': 3" in caplog.text


def test_too_many_bad_images_raise_naming_the_fraction(tmp_path):
    files = {"a.jpg": good_jpeg(0), "b.jpg": good_jpeg(1), "c.jpg": b"garbage"}
    write_layout(tmp_path, files, *one_caption_each(["a.jpg", "b.jpg", "c.jpg", "gone.jpg"]))
    with pytest.raises(BadDataError) as error:
        prepare(tmp_path, SPLIT, 8, num_workers=0, max_bad_fraction=0.25)
    message = str(error.value)
    assert "2 of 4 images (50.0%" in message and "0.5000" in message
    assert "max_bad_fraction=0.25" in message and "c.jpg" in message and "gone.jpg" in message
    assert not (tmp_path / "cache" / f"{SPLIT}_8px.npy").exists()
    # Within a looser limit the rerun finishes from the saved progress.
    ds = CaptionDataset(prepare(tmp_path, SPLIT, 8, num_workers=0, max_bad_fraction=0.5))
    assert [ds.file_name(i) for i in range(len(ds))] == ["a.jpg", "b.jpg"]


def cmyk_to_rgb(c, m, y, k):
    return [round((255 - v) * (255 - k) / 255) for v in (c, m, y)]


def over_white(value, alpha):
    return round(value * alpha / 255 + 255 * (255 - alpha) / 255)


def palette_image(transparent: bool) -> bytes:
    img = Image.new("P", (6, 6), 1)
    img.putpalette([0, 0, 0, 30, 160, 90] + [0] * 762)
    return encode(img, "PNG", **({"transparency": 1} if transparent else {}))


def sixteen_bit(value) -> bytes:
    img = Image.fromarray(np.full((6, 6), value, np.uint16))
    assert img.mode == "I;16"
    return encode(img, "PNG")


# (file bytes, expected RGB of every output pixel, tolerance)
MODES = {
    "gray.png": (encode(Image.new("L", (6, 9), 77), "PNG"), [77, 77, 77], 0),
    "bilevel.png": (encode(Image.new("1", (6, 6), 1), "PNG"), [255, 255, 255], 0),
    "cmyk.tif": (encode(Image.new("CMYK", (6, 6), (10, 100, 200, 50)), "TIFF"),
                 cmyk_to_rgb(10, 100, 200, 50), 1),
    "cmyk.jpg": (encode(Image.new("CMYK", (8, 8), (10, 100, 200, 50)), "JPEG", quality=95),
                 cmyk_to_rgb(10, 100, 200, 50), 4),
    "rgba.png": (encode(Image.new("RGBA", (6, 6), (255, 0, 40, 128)), "PNG"),
                 [255, over_white(0, 128), over_white(40, 128)], 1),
    "clear.png": (encode(Image.new("RGBA", (6, 6), (0, 0, 0, 0)), "PNG"), [255, 255, 255], 0),
    "la.png": (encode(Image.new("LA", (6, 6), (20, 200)), "PNG"), [over_white(20, 200)] * 3, 1),
    "palette.png": (palette_image(False), [30, 160, 90], 0),
    "palette_clear.png": (palette_image(True), [255, 255, 255], 0),
    # 16-bit: scaled by 257, where clipping would give 255 for all three.
    "deep_mid.png": (sixteen_bit(32896), [128, 128, 128], 0),
    "deep_dark.png": (sixteen_bit(257 * 50), [50, 50, 50], 0),
    "deep_max.png": (sixteen_bit(65535), [255, 255, 255], 0),
    "deep.tif": (encode(Image.fromarray(np.full((6, 6), 257 * 200, np.uint16)), "TIFF"),
                 [200, 200, 200], 0),
}


def test_pixel_modes_convert_to_correct_rgb(tmp_path):
    write_layout(tmp_path, {name: blob for name, (blob, _, _) in MODES.items()},
                 *one_caption_each(list(MODES)))
    ds = CaptionDataset(prepare(tmp_path, SPLIT, 4, num_workers=0, max_bad_fraction=0.0))
    assert len(ds) == len(MODES)
    for i, (name, (_, expected, tolerance)) in enumerate(MODES.items()):
        image = ds[i][0].int()
        error = (image - np.array(expected).reshape(3, 1, 1)).abs().max().item()
        assert error <= tolerance, (name, image[:, 0, 0].tolist(), expected)


def test_exif_orientation_is_applied(tmp_path):
    # Stored 20x10 with red left, blue right; EXIF 6 says "rotate 90 degrees clockwise to view":
    # upright it is 10x20, red on top, blue below (without EXIF the crop would be red | blue).
    stored = np.zeros((10, 20, 3), np.uint8)
    stored[:, :10], stored[:, 10:] = (255, 0, 0), (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    write_layout(tmp_path, {"rotated.png": encode(Image.fromarray(stored), "PNG", exif=exif)},
                 *one_caption_each(["rotated.png"]))
    image = CaptionDataset(prepare(tmp_path, SPLIT, 10, num_workers=0))[0][0]
    top, bottom = image[:, :4].reshape(3, -1), image[:, 6:].reshape(3, -1)
    assert (top[0] == 255).all() and (top[2] == 0).all()
    assert (bottom[0] == 0).all() and (bottom[2] == 255).all()


def test_malformed_json_names_file_line_and_column(tmp_path):
    path = tmp_path / "captions_train2014.json"
    path.write_text('{\n  "images": [],\n  "annotations": [}\n}\n', encoding="utf-8")
    with pytest.raises(AnnotationError) as error:
        load_annotations(path)
    assert str(path) in str(error.value)
    assert "line 3, column 19" in str(error.value) and "char 36" in str(error.value)


def test_truncated_json_names_file_and_position(tmp_path):
    images, annotations = one_caption_each([f"{k}.jpg" for k in range(30)])
    text = json.dumps({"images": images, "annotations": annotations}, indent=1)
    path = tmp_path / "annotations" / f"captions_{SPLIT}.json"
    path.parent.mkdir()
    path.write_text(text[: len(text) // 2], encoding="utf-8")
    with pytest.raises(AnnotationError) as error:
        prepare(tmp_path, SPLIT, 8, num_workers=0)
    message = str(error.value)
    assert str(path) in message and "truncated" in message
    lines = text[: len(text) // 2].count("\n") + 1
    assert f"line {lines}, column" in message


@pytest.mark.parametrize("content, words", [
    ({"images": []}, ["missing required key", "annotations"]),
    ([1, 2], ["top level must be a JSON object"]),
    ({"images": [{"file_name": "a.jpg"}], "annotations": []}, ["images[0]", "'id'"]),
    ({"images": [], "annotations": [{"id": 1, "caption": "x"}]}, ["annotations[0]", "image_id"]),
])
def test_missing_structure_names_the_file(tmp_path, content, words):
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(content))
    with pytest.raises(AnnotationError) as error:
        load_annotations(path)
    assert str(path) in str(error.value)
    for word in words:
        assert word in str(error.value)


def test_missing_annotation_file_is_named(tmp_path):
    with pytest.raises(AnnotationError, match="annotation file not found: .*captions_train2014"):
        prepare(tmp_path, SPLIT, 8, num_workers=0)


def test_caption_edge_cases(tmp_path, caplog):
    long_caption = ("a very long caption " * 500)[:9_999] + "."
    assert len(long_caption) == 10_000 and long_caption == long_caption.strip()
    unicode_caption = "Ein Hund läuft über die Straße — 犬が道を走る 🐕 café"
    names = ["normal.jpg", "nocaption.jpg", "onlyempty.jpg", "long.jpg", "unicode.jpg"]
    images = [{"id": k, "file_name": name} for k, name in enumerate(names)]
    annotations = [
        {"id": 1, "image_id": 0, "caption": "a plain caption"},
        {"id": 2, "image_id": 0, "caption": "   "},  # whitespace only: dropped
        {"id": 3, "image_id": 0, "caption": " padded caption \n"},
        {"id": 4, "image_id": 2, "caption": ""},  # the image's only caption is empty
        {"id": 5, "image_id": 3, "caption": long_caption},
        {"id": 6, "image_id": 4, "caption": unicode_caption},
        {"id": 7, "image_id": 999, "caption": "points at no image"},
    ]
    write_layout(tmp_path, {name: good_jpeg(k) for k, name in enumerate(names)}, images, annotations)
    with caplog.at_level(logging.WARNING, logger="tti.data.prepare"):
        path = prepare(tmp_path, SPLIT, 8, num_workers=0)
    ds = CaptionDataset(path)
    assert [ds.file_name(i) for i in range(len(ds))] == ["normal.jpg", "long.jpg", "unicode.jpg"]
    assert ds.captions(0) == ["a plain caption", "padded caption"]
    assert ds.captions(1) == [long_caption] and ds[1][1] == long_caption
    assert ds.captions(2) == [unicode_caption] and ds[2][1] == unicode_caption
    assert ds.skipped == {"unreadable_images": 0, "orphan_annotations": 1, "empty_captions": 2,
                          "images_without_captions": 2}
    assert "image 999" in caplog.text and "nocaption.jpg" in caplog.text
    assert unicode_caption in path.with_suffix(".json").read_text(encoding="utf-8")


def test_sources_smaller_than_the_packed_size_are_upscaled_and_said_once(tmp_path, caplog):
    rng = np.random.default_rng(0)
    files = {f"small{k}.png": encode(Image.fromarray(rng.integers(0, 256, (28, 28, 3), np.uint8)),
                                     "PNG") for k in range(3)}
    files["big.png"] = encode(Image.fromarray(rng.integers(0, 256, (36, 40, 3), np.uint8)), "PNG")
    write_layout(tmp_path, files, *one_caption_each(list(files)))
    with caplog.at_level(logging.INFO, logger="tti.data.prepare"):
        prepare(tmp_path, SPLIT, 32, num_workers=0)
        prepare(tmp_path, SPLIT, 32, num_workers=0)  # the cache exists: nothing more to say
    notes = [r.getMessage() for r in caplog.records if "upscaled" in r.getMessage()]
    assert len(notes) == 1
    assert "upscaled 3 of 4 images whose short side is under 32 px" in notes[0]
    assert "small0.png, 28x28" in notes[0]
