"""The exact caption judge: right on true captions of real renders, wrong on altered captions."""
import dataclasses

import numpy as np
import pytest
import torch

from tti.data.shapes import (COLOURS, SHAPES, Scene, ShapeObject, caption_variants, generate_examples, is_held_out,
                             render, render_example)
from tti.eval.metrics.judge import RELATION_OUTCOMES, judge_batch, judge_image, relation_outcome


def _val(n, seed, size=32):
    examples = generate_examples(n, "val", seed=seed)
    return examples, [render_example(e, size) for e in examples]


def _caption(scene, rng):
    variants = caption_variants(scene)
    return variants[rng.integers(len(variants))]


def _noisy(img, rng, std=8.0):
    return np.clip(img + rng.normal(0.0, std, img.shape), 0, 255).astype(np.uint8)


def test_true_captions_pass_on_real_renders():
    examples, images = _val(300, seed=11)
    result = judge_batch(images, [e.captions[0] for e in examples])
    for key in ("colour", "shape", "size", "relation", "all"):
        assert result[key] >= 0.99, (key, result)
    assert result["count"] == 300
    assert result["relation_count"] == sum(len(e.scene.objects) == 2 for e in examples)
    held = sum(is_held_out(e.captions[0]) for e in examples)
    assert result["held_out"]["count"] == held and result["seen"]["count"] == 300 - held
    assert result["held_out"]["all"] >= 0.99 and result["seen"]["all"] >= 0.99


@pytest.mark.parametrize("size, n", [(64, 40), (128, 12)])
def test_true_captions_pass_at_larger_sizes(size, n):
    examples, images = _val(n, seed=12, size=size)
    assert judge_batch(images, [e.captions[1] for e in examples])["all"] == 1.0


def test_robust_to_mild_gaussian_noise():
    rng = np.random.default_rng(0)
    examples, images = _val(300, seed=13)
    result = judge_batch([_noisy(i, rng) for i in images], [e.captions[2] for e in examples])
    assert result["all"] >= 0.99, result


def test_accepts_chw_torch_and_numpy():
    examples, images = _val(20, seed=14)
    hwc = [judge_image(i, e.captions[0])["all"] for e, i in zip(examples, images)]
    chw_np = [judge_image(i.transpose(2, 0, 1), e.captions[0])["all"] for e, i in zip(examples, images)]
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    assert hwc == chw_np and all(hwc)
    assert judge_batch(batch, [e.captions[0] for e in examples])["all"] == 1.0
    with pytest.raises(ValueError, match="uint8"):
        judge_image(images[0].astype(np.float32), examples[0].captions[0])
    with pytest.raises(ValueError, match="cannot parse"):
        judge_image(images[0], "a cat")
    with pytest.raises(ValueError, match="captions"):
        judge_batch(images[:2], ["a small red circle"])


def _rejections(alter, key, n=200, seed=21, noise=False):
    """Fraction of n real renders whose altered caption the judge rejects on `key` and on `all`."""
    rng = np.random.default_rng(seed)
    examples, images = _val(n, seed=seed)
    rejected, used = 0, 0
    for e, img in zip(examples, images):
        scene = alter(e.scene, rng)
        if scene is None:
            continue
        used += 1
        verdict = judge_image(_noisy(img, rng) if noise else img, _caption(scene, rng))
        rejected += verdict[key] is False and verdict["all"] is False
    assert used >= n // 5  # one-object scenes are a quarter of the data
    return rejected / used


def _replace(scene, i, **change):
    objects = list(scene.objects)
    objects[i] = dataclasses.replace(objects[i], **change)
    return Scene(tuple(objects), scene.relation)


def _swap_colour(scene, rng):
    i = rng.integers(len(scene.objects))
    absent = [c for c in COLOURS if c not in {o.colour for o in scene.objects}]
    return _replace(scene, i, colour=absent[rng.integers(len(absent))])


def _swap_shape(scene, rng):
    i = rng.integers(len(scene.objects))
    others = [s for s in SHAPES if s != scene.objects[i].shape]
    return _replace(scene, i, shape=others[rng.integers(len(others))])


def _swap_size(scene, rng):
    i = rng.integers(len(scene.objects))
    return _replace(scene, i, size="large" if scene.objects[i].size == "small" else "small")


def _reverse_relation(scene, rng):
    if len(scene.objects) == 1:
        return None
    return Scene(scene.objects[::-1], scene.relation)


def _swap_colours_between_objects(scene, rng):
    if len(scene.objects) == 1:
        return None
    a, b = scene.objects
    return Scene((dataclasses.replace(a, colour=b.colour), dataclasses.replace(b, colour=a.colour)), scene.relation)


def _add_missing_object(scene, rng):
    if len(scene.objects) == 2:
        return None
    absent = [c for c in COLOURS if c != scene.objects[0].colour]
    ghost = ShapeObject(absent[rng.integers(len(absent))], SHAPES[rng.integers(3)], "large")
    return Scene.of(scene.objects[0], ("left of", "right of", "above", "below")[rng.integers(4)], ghost)


@pytest.mark.parametrize("alter, key", [
    (_swap_colour, "colour"), (_swap_shape, "shape"), (_swap_size, "size"), (_reverse_relation, "relation"),
    (_swap_colours_between_objects, "all"), (_add_missing_object, "colour")])
def test_wrong_captions_are_rejected(alter, key):
    assert _rejections(alter, key) >= 0.95
    assert _rejections(alter, key, seed=22, noise=True) >= 0.95


def test_wrong_fact_does_not_spill_into_other_facts():
    rng = np.random.default_rng(3)
    examples, images = _val(60, seed=23)
    for e, img in zip(examples, images):
        shape_wrong = judge_image(img, _caption(_swap_shape(e.scene, rng), rng))
        assert shape_wrong["colour"] and shape_wrong["size"] and not shape_wrong["shape"]
        size_wrong = judge_image(img, _caption(_swap_size(e.scene, rng), rng))
        assert size_wrong["colour"] and size_wrong["shape"] and not size_wrong["size"]


def test_extra_object_fails_all_but_not_the_stated_facts():
    examples, images = _val(80, seed=24)
    checked = 0
    for e, img in zip(examples, images):
        if len(e.scene.objects) == 2:
            verdict = judge_image(img, caption_variants(Scene.of(e.scene.objects[0]))[0])
            assert verdict["colour"] and verdict["shape"] and verdict["size"] and verdict["relation"] is None
            assert verdict["extra_objects"] == 1 and not verdict["all"]
            checked += 1
    assert checked > 40


def test_blank_and_unrelated_images_fail():
    blank = np.zeros((32, 32, 3), np.uint8)
    assert not judge_image(blank, "a small red circle")["all"]
    grey_square = render([ShapeObject("red", "square", "large")], [(0.5, 0.5)])
    grey_square[grey_square[..., 0] > 0] = 128  # right place and shape, but no palette colour
    assert not judge_image(grey_square, "a large red square")["colour"]
    giant = render([ShapeObject("red", "circle", "large")], [(0.5, 0.5)], image_size=64)[16:48, 16:48]
    assert giant.shape == (32, 32, 3)  # the centre crop shows the circle at 86% of the side
    assert judge_image(giant, "a large red circle")["size"] is False


def test_relation_outcome_names_what_went_wrong():
    """On real two-object renders: the true caption is "correct", the objects' order reversed
    is "swapped", the relation moved to the other axis is "other axis", an absent colour is
    "missing"; a one-object caption has no relation outcome."""
    other_axis = {"left of": "above", "above": "left of"}
    examples, images = _val(120, seed=25)
    checked = 0
    for e, img in zip(examples, images):
        if len(e.scene.objects) == 1:
            assert relation_outcome(judge_image(img, e.captions[0]), e.captions[0]) is None
            continue
        a, b = e.scene.objects
        absent = next(c for c in COLOURS if c not in (a.colour, b.colour))
        cases = {"correct": e.scene, "swapped": Scene((b, a), e.scene.relation),
                 "other axis": Scene((a, b), other_axis[e.scene.relation]),
                 "missing": Scene((dataclasses.replace(a, colour=absent), b), e.scene.relation)}
        for want, scene in cases.items():
            caption = caption_variants(scene)[checked % 14]
            assert relation_outcome(judge_image(img, caption), caption) == want, (caption, want)
        checked += 1
    assert checked > 60 and set(RELATION_OUTCOMES) >= {"correct", "swapped", "other axis", "missing"}
