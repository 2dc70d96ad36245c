"""The frozen encoder's text store: it returns what the encoder returns (to fp16 rounding)
for captions of every length, finds captions by hash without mixing up colliding ones,
resumes a killed build, grows without re-encoding, and is keyed by what the states depend
on. That a node writes it once and every rank maps that one file: tests/test_ddp.py.
"""
import json
import os

import numpy as np
import pytest
import torch

import tti.text.store as text_store
from tti.text.encoder import TextEncoder
from tti.text.source import PACKAGED_MINILM
from tti.text.store import TextStore, TextStoreError, build_store, encoder_identity, store_folder

LAYER = 3  # the shipped shapes configs read MiniLM's layer 3
CAPTIONS = [
    "x",                                                    # one word piece
    "a large red circle",
    "a small blue square to the left of a large yellow circle",
    "Un chat noir à gauche d’un café ☕",                  # non-ASCII
    "A man riding a wave on top of a surfboard. " * 6,      # over max_length: cut
]


@pytest.fixture(scope="module")
def encoder():
    return TextEncoder(PACKAGED_MINILM, hidden_layer=LAYER)


@pytest.fixture(scope="module")
def live():
    """The same encoder without the store: its float32 states, computed at every call."""
    return TextEncoder(PACKAGED_MINILM, hidden_layer=LAYER, cache=False)


def stored_encoder(encoder, folder):
    encoder.use_store(TextStore(folder))
    return encoder


def assert_same_states(text, reference):
    """Equal masks; the states equal where the mask is True, up to fp16 rounding."""
    assert torch.equal(text.mask, reference.mask)
    real = reference.mask
    torch.testing.assert_close(text.tokens[real], reference.tokens[real], rtol=2 ** -10, atol=1e-4)
    assert not text.tokens[~real].any()  # padding is zero, whatever the encoder put there


def test_the_store_returns_what_the_encoder_returns(encoder, live, tmp_path):
    folder = str(tmp_path / "store")
    assert build_store(encoder, CAPTIONS + CAPTIONS[:2], folder, chunk=2) == len(CAPTIONS) + 1  # + ""
    store = TextStore(folder)
    assert sorted(store.caption(r) for r in range(len(store))) == sorted(CAPTIONS + [""])
    stored_encoder(encoder, folder)
    batch = CAPTIONS + ["", "a caption the store does not hold", CAPTIONS[1]]
    assert (store.find(batch) < 0).tolist() == [False] * 6 + [True, False]
    text = encoder(batch)
    assert_same_states(text, live(batch))
    lengths = text.mask.sum(1).tolist()
    assert lengths[0] < lengths[1] < lengths[2] < lengths[4] == encoder.max_length  # every length
    assert text.tokens.dtype == torch.float32
    # fp16 values: the states went through fp16 once, and only once.
    assert torch.equal(text.tokens, text.tokens.half().float())


def test_a_caption_not_stored_is_encoded_alone(encoder, tmp_path):
    """Its states do not depend on the batch it arrives in (exports are batch-independent)."""
    folder = str(tmp_path / "store")
    build_store(encoder, CAPTIONS[:1], folder)
    stored_encoder(encoder, folder)
    new = "a small purple triangle above a large green square"
    alone = encoder([new])
    together = encoder([CAPTIONS[4], new, "x"])
    n = int(alone.mask.sum())
    assert torch.equal(together.tokens[1, :n], alone.tokens[0, :n])


def test_colliding_hashes_are_told_apart_by_the_caption(encoder, tmp_path, monkeypatch):
    monkeypatch.setattr(text_store, "caption_hash", lambda data: len(data) % 2)  # 2 buckets
    folder = str(tmp_path / "store")
    build_store(encoder, CAPTIONS, folder)
    store = TextStore(folder)
    rows = store.find(CAPTIONS + ["y", "a caption of odd length!"])
    assert [store.caption(r) for r in rows[:len(CAPTIONS)]] == CAPTIONS
    assert rows[-2:].tolist() == [-1, -1]  # same hash as stored captions, not stored
    assert len(set(rows[:len(CAPTIONS)].tolist())) == len(CAPTIONS)


class Killed(RuntimeError):
    pass


def test_a_killed_build_resumes_where_it_stopped(encoder, tmp_path, monkeypatch):
    captions = [f"a caption number {i} " + "word " * (i % 7) for i in range(40)]
    clean = str(tmp_path / "clean")
    build_store(encoder, captions, clean, chunk=4)

    monkeypatch.setattr(text_store, "SAVE_EVERY_CHUNKS", 1)
    calls = []
    real = encoder.encode_live

    def dies_at_chunk_five(batch):
        calls.append(len(batch))
        if len(calls) == 5:
            raise Killed("killed mid-build")
        return real(batch)

    folder = str(tmp_path / "store")
    monkeypatch.setattr(encoder, "encode_live", dies_at_chunk_five)
    with pytest.raises(Killed):
        build_store(encoder, captions, folder, chunk=4)
    assert not os.path.exists(folder)  # nothing half-written where readers look
    assert json.load(open(f"{folder}.partial/progress.json"))["done"] == 16
    calls.clear()
    monkeypatch.setattr(encoder, "encode_live", lambda batch: calls.append(len(batch)) or real(batch))
    assert build_store(encoder, captions, folder, chunk=4) == 41
    assert sum(calls) == 41 - 16  # only what the killed build had not saved
    assert not os.path.exists(f"{folder}.partial")
    for name in ("tokens", "hashes", "rows", "text", "text_ends"):
        np.testing.assert_array_equal(np.load(f"{folder}/{name}.npy"), np.load(f"{clean}/{name}.npy"))


def test_the_store_grows_by_the_captions_it_lacks(encoder, tmp_path, monkeypatch):
    folder = str(tmp_path / "store")
    build_store(encoder, CAPTIONS[:3], folder)
    before = stored_encoder(encoder, folder)(CAPTIONS[:3]).tokens.clone()
    assert build_store(encoder, CAPTIONS[:3], folder) == 0  # nothing new: untouched
    calls = []
    real = encoder.encode_live
    monkeypatch.setattr(encoder, "encode_live", lambda batch: calls.append(list(batch)) or real(batch))
    assert build_store(encoder, CAPTIONS, folder) == 2
    assert sorted(c for batch in calls for c in batch) == sorted(CAPTIONS[3:])
    grown = stored_encoder(encoder, folder)
    assert len(grown.store) == len(CAPTIONS) + 1
    assert torch.equal(grown(CAPTIONS[:3]).tokens, before)  # copied, bit for bit
    assert sorted(os.listdir(tmp_path)) == ["store", "store.lock"]  # no partial or old copy left


def test_a_store_is_keyed_by_what_its_states_depend_on(encoder, tmp_path):
    base = store_folder(str(tmp_path), encoder_identity(encoder))
    assert os.path.basename(base).startswith(f"text_packaged-minilm_len32_layer{LAYER}_")
    other_layer = TextEncoder(PACKAGED_MINILM, hidden_layer=LAYER - 1)
    other_length = TextEncoder(PACKAGED_MINILM, hidden_layer=LAYER, max_length=16)
    other_weights = TextEncoder(PACKAGED_MINILM, hidden_layer=LAYER)
    with torch.no_grad():
        other_weights.model.embeddings.word_embeddings.weight[0, 0] += 1.0
    folders = {store_folder(str(tmp_path), encoder_identity(e))
               for e in (encoder, other_layer, other_length, other_weights)}
    assert len(folders) == 4
    # A store of one encoder is refused by another (e.g. a folder copied by hand).
    build_store(encoder, CAPTIONS[:2], base)
    with pytest.raises(TextStoreError, match="hidden_layer 3 \\(not 2\\).*delete the folder"):
        other_layer.use_store(TextStore(base))
    with pytest.raises(TextStoreError, match="weights"):
        build_store(other_weights, CAPTIONS[:2], base)


def test_a_config_names_its_store_by_the_layer_it_holds():
    from tti.config.load import load_config
    from tti.models.text_to_image import build_text_encoder

    def name(layer):
        cfg = load_config("configs/shapes32.yaml", [f"text.hidden_layer={layer}"])
        return os.path.basename(build_text_encoder(cfg).store_dir).rsplit("_", 1)[0]

    assert name(-1) == name(6) == "text_packaged-minilm_len32_layer6"  # the last layer, either way
    assert name(3) == name(-4) == "text_packaged-minilm_len32_layer3"
