"""data.canonical_caption_fraction: the shapes captions' canonical phrasing mixed into training."""
import os

import pytest

from tti.config.errors import ConfigError
from tti.config.load import load_config
from tti.config.rules import validate
from tti.data.canonical import CanonicalCaptionMix
from tti.data.coco import load_split
from tti.data.shapes import caption_variants, canonical_caption, generate_examples, parse_caption, write_coco

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("shapes") / "ds")
    write_coco(root, n_train=40, n_val=10, image_size=32, seed=0)
    return root


class FakeCaptions:
    """The CaptionDataset interface the wrapper uses, over n generated scenes (no images)."""

    def __init__(self, n):
        self.examples = generate_examples(n, "train", seed=5)
        self.epoch = 0

    def __len__(self):
        return len(self.examples)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def captions(self, i):
        return list(self.examples[i].captions)

    def __getitem__(self, i):
        return None, self.captions(i)[self.epoch % len(self.captions(i))]

    def image_id(self, i):
        return i

    def file_name(self, i):
        return f"{i}.png"


def test_canonical_captions_state_the_same_facts_left_or_top_first():
    for e in generate_examples(40, "val", seed=3):
        for caption in caption_variants(e.scene):
            canonical = canonical_caption(caption)
            assert parse_caption(canonical) == e.scene
            if e.scene.relation is not None:  # the left/top object is named first
                assert canonical.index(e.scene.objects[0].colour) < canonical.index(e.scene.objects[1].colour)
                assert "right of" not in canonical and "below" not in canonical


def test_fraction_zero_and_one_on_a_real_split(shapes_root):
    ds = load_split(shapes_root, "train2014", 32)
    none = CanonicalCaptionMix(ds, 0.0)
    every = CanonicalCaptionMix(ds, 1.0)
    for i in range(len(ds)):
        image, caption = ds[i]
        image0, caption0 = none[i]
        image1, caption1 = every[i]
        assert caption0 == caption and (image0 == image).all() and (image1 == image).all()
        assert caption1 == canonical_caption(caption)
        assert parse_caption(caption1) == parse_caption(caption)  # same facts, other words
        assert caption1 in every.captions(i) and none.captions(i) == ds.captions(i)
    assert every.split == ds.split and every.image_size == 32  # the dataset's attributes


def test_share_is_the_fraction_and_the_draw_is_reproducible_per_epoch():
    n = 4000
    mix = CanonicalCaptionMix(FakeCaptions(n), 0.3, seed=7)
    draws = [mix.uses_canonical(i) for i in range(n)]
    assert abs(sum(draws) / n - 0.3) < 0.03  # binomial sd 0.007
    again = CanonicalCaptionMix(FakeCaptions(n), 0.3, seed=7)  # e.g. a resumed run
    assert [again.uses_canonical(i) for i in range(n)] == draws
    again.set_epoch(1)
    assert again.dataset.epoch == 1  # the dataset's own caption draw moves on too
    other_epoch = [again.uses_canonical(i) for i in range(n)]
    assert other_epoch != draws and abs(sum(other_epoch) / n - 0.3) < 0.03
    for i in range(200):  # what __getitem__ returns follows the draw
        caption = again[i][1]
        own = again.dataset[i][1]
        assert caption == (canonical_caption(own) if other_epoch[i] else own)


def test_non_shapes_captions_are_refused_naming_the_image():
    ds = FakeCaptions(5)
    ds.examples[3] = ds.examples[3].__class__(ds.examples[3].scene, ds.examples[3].centres,
                                              ("a man riding a horse on a beach",))
    with pytest.raises(ValueError, match=r"image 3 \(3.png\).*a man riding a horse"):
        CanonicalCaptionMix(ds, 0.5)
    with pytest.raises(ValueError, match="fraction"):
        CanonicalCaptionMix(FakeCaptions(5), 1.5)


def test_config_key_is_validated_and_training_opens_the_mix(shapes_root):
    from tti.infra.distributed import setup
    from tti.training.setup import open_datasets

    with pytest.raises(ConfigError, match="data.canonical_caption_fraction"):
        load_config(os.path.join(REPO, "configs", "shapes32.yaml"), ["data.canonical_caption_fraction=1.5"])
    cfg = load_config(os.path.join(REPO, "configs", "shapes32.yaml"),
                      [f"data.root={shapes_root}", "data.generate_shapes=false",
                       "data.canonical_caption_fraction=0.5"])
    validate(cfg)
    train_set, val_set = open_datasets(cfg, setup("cpu"), workers=0)
    assert isinstance(train_set, CanonicalCaptionMix) and train_set.fraction == 0.5
    assert not isinstance(val_set, CanonicalCaptionMix)  # validation captions stay as written
