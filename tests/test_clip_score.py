"""CLIP score on a randomly initialised CLIPModel with a tiny config and a byte-level tokenizer
written in tmp (no downloads): clipscore's formula by hand, clipping, loading, folder matching."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from tti.eval.metrics import clip_score as cs

transformers = pytest.importorskip("transformers")
from tokenizers.pre_tokenizers import ByteLevel  # noqa: E402

CAPTIONS = ["a red circle left of a blue square", "two green triangles", "A BIG yellow star",
            "nothing at all"]


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A folder in HF layout: tiny CLIPModel (random weights) + CLIPProcessor, 32x32 images."""
    folder = tmp_path_factory.mktemp("tiny_clip")
    alphabet = sorted(ByteLevel.alphabet())
    tokens = alphabet + [a + "</w>" for a in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    with open(folder / "vocab.json", "w") as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f)
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(folder))
    image_processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32},
                                                      crop_size={"height": 32, "width": 32})
    transformers.CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(tokens), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77, **special),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2),
        projection_dim=16)
    torch.manual_seed(0)
    transformers.CLIPModel(config).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_clip(tiny_clip_dir):
    clip, reason = cs.load_clip(tiny_clip_dir)
    assert clip is not None, reason
    return clip


def random_images(seed, n=4, height=40, width=52):
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, size=(n, 3, height, width), dtype=np.uint8))


def hand_clip_s(images, captions, model, tokenizer):
    """Reference: torchvision's original CLIP transform + CLIPModel.forward's normalised embeds."""
    from torchvision import transforms as T

    transform = T.Compose([T.Resize(32, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32),
                           T.ToTensor(), T.Normalize(cs.CLIP_MEAN, cs.CLIP_STD)])
    pixels = torch.stack([transform(Image.fromarray(im.permute(1, 2, 0).numpy())) for im in images])
    text = tokenizer(["A photo depicts " + c for c in captions], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=text["input_ids"], attention_mask=text["attention_mask"],
                    pixel_values=pixels)
    cosines = (out.image_embeds * out.text_embeds).sum(-1).numpy().astype(np.float64)
    return cosines, 2.5 * np.maximum(cosines, 0)


def test_load_clip_from_local_folder(tiny_clip_dir, tiny_clip):
    assert isinstance(tiny_clip.model, transformers.CLIPModel)
    assert not tiny_clip.model.training
    assert tiny_clip.model.config.vision_config.image_size == 32


def test_score_matches_hand_computation(tiny_clip):
    images = random_images(0)
    cosines, expected = hand_clip_s(images, CAPTIONS, tiny_clip.model, tiny_clip.processor.tokenizer)
    result = cs.clip_score(images, CAPTIONS, tiny_clip.model, tiny_clip.processor, batch_size=3)
    np.testing.assert_allclose(result["per_image"], expected, atol=1e-5)
    assert result["mean"] == pytest.approx(expected.mean(), abs=1e-5)
    # PIL input gives the same numbers as uint8 tensors
    pil = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in images]
    np.testing.assert_allclose(cs.clip_score(pil, CAPTIONS, tiny_clip.model, tiny_clip.processor)
                               ["per_image"], expected, atol=1e-5)


def test_negative_cosines_clip_to_zero(tiny_clip):
    images = random_images(1)
    plain = cs.clip_score(images, CAPTIONS, tiny_clip.model, tiny_clip.processor)["per_image"]
    flipped_model = transformers.CLIPModel(tiny_clip.model.config)
    flipped_model.load_state_dict(tiny_clip.model.state_dict())
    with torch.no_grad():
        flipped_model.text_projection.weight.neg_()  # every cosine changes sign
    flipped = cs.clip_score(images, CAPTIONS, flipped_model, tiny_clip.processor)["per_image"]
    cosines, _ = hand_clip_s(images, CAPTIONS, tiny_clip.model, tiny_clip.processor.tokenizer)
    # for each image exactly one of the two runs sees a negative cosine and scores exactly 0
    assert ((plain == 0) ^ (flipped == 0)).all()
    np.testing.assert_allclose(plain + flipped, 2.5 * np.abs(cosines), atol=1e-5)
    assert (plain >= 0).all() and (flipped >= 0).all()


def test_clip_preprocess_matches_torchvision_original_transform():
    from torchvision import transforms as T

    transform = T.Compose([T.Resize(224, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224),
                           T.ToTensor(), T.Normalize(cs.CLIP_MEAN, cs.CLIP_STD)])
    rng = np.random.default_rng(2)
    for height, width in [(31, 45), (299, 225), (224, 301)]:  # odd crop margins included
        image = Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))
        assert torch.equal(cs.clip_preprocess(image), transform(image))


def test_unavailable_weights_give_none_and_reason(tmp_path):
    clip, reason = cs.load_clip(str(tmp_path / "no-such-clip"))
    assert clip is None
    assert "weights" in reason and "no-such-clip" in reason and "not available" in reason


def test_bad_inputs_raise(tiny_clip):
    with pytest.raises(ValueError, match="4 images but 3 captions"):
        cs.clip_score(random_images(3), CAPTIONS[:3], tiny_clip.model, tiny_clip.processor)
    with pytest.raises(ValueError, match="uint8"):
        cs.clip_score(random_images(3).float(), CAPTIONS, tiny_clip.model, tiny_clip.processor)


def write_folder(folder, images, ids):
    os.makedirs(folder, exist_ok=True)
    for image, name in zip(images, ids):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(os.path.join(folder, f"{name}.png"))


def test_folder_scores_by_id(tiny_clip, tmp_path):
    images = random_images(4)
    ids = ["img_3", "img_1", "img_2", "img_0"]
    write_folder(tmp_path / "imgs", images, ids)
    (tmp_path / "candidates.json").write_text(json.dumps(dict(zip(ids, CAPTIONS))))
    result = cs.clip_score_folder(str(tmp_path / "imgs"), str(tmp_path / "candidates.json"),
                                  tiny_clip.model, tiny_clip.processor, batch_size=3)
    assert result["ids"] == sorted(ids)
    order = [ids.index(i) for i in result["ids"]]
    _, expected = hand_clip_s(images[order], [CAPTIONS[i] for i in order], tiny_clip.model,
                              tiny_clip.processor.tokenizer)
    np.testing.assert_allclose(result["per_image"], expected, atol=1e-5)


def test_folder_json_mismatch_lists_ids(tiny_clip, tmp_path):
    write_folder(tmp_path / "imgs", random_images(5, n=3), ["a", "b", "c"])
    (tmp_path / "candidates.json").write_text(json.dumps({"a": "x", "b": "y", "d": "z"}))
    with pytest.raises(ValueError, match=r"do not match one to one.*\['c'\].*\['d'\]"):
        cs.clip_score_folder(str(tmp_path / "imgs"), str(tmp_path / "candidates.json"),
                             tiny_clip.model, tiny_clip.processor)
