"""Text encoder: which hidden state it returns, fine-tuning below the top, the cache's key."""
import os

import pytest
import torch

from tti.text import PACKAGED_MINILM, TextEncoder

CAPTIONS = ["a small red circle to the left of a large blue square", "a large green triangle"]


@pytest.fixture(scope="module")
def reference():
    """The packaged MiniLM's hidden states computed straight through transformers."""
    encoder = TextEncoder(PACKAGED_MINILM, cache=False)
    enc = encoder.tokenizer(CAPTIONS, padding=True, return_tensors="pt")
    with torch.no_grad():
        states = encoder.model(**enc, output_hidden_states=True).hidden_states
    return states, enc["attention_mask"].bool()


@pytest.mark.parametrize("layer, index", [(-1, 6), (6, 6), (3, 3), (-4, 3), (0, 0)])
def test_hidden_layer_returns_that_state(reference, layer, index):
    states, mask = reference
    text = TextEncoder(PACKAGED_MINILM, cache=False, hidden_layer=layer)(CAPTIONS)
    torch.testing.assert_close(text.tokens, states[index])
    assert torch.equal(text.mask, mask)


def test_frozen_encoder_below_the_top_runs_only_the_layers_it_needs():
    assert len(TextEncoder(PACKAGED_MINILM, hidden_layer=3).model.encoder.layer) == 3
    assert len(TextEncoder(PACKAGED_MINILM).model.encoder.layer) == 6


def test_fine_tuning_below_the_top_drops_the_unused_layers(reference):
    states, _ = reference
    encoder = TextEncoder(PACKAGED_MINILM, finetune=True, hidden_layer=3)
    assert len(encoder.model.encoder.layer) == 3
    encoder.eval()  # no dropout, to compare with the frozen reference
    text = encoder(CAPTIONS)
    torch.testing.assert_close(text.tokens, states[3])
    text.tokens.square().mean().backward()
    assert all(p.grad is not None for p in encoder.model.encoder.parameters())  # none unused (DDP)


def test_hidden_layer_out_of_range():
    with pytest.raises(ValueError, match="hidden_layer 7 out of range.*6 layers"):
        TextEncoder(PACKAGED_MINILM, hidden_layer=7)


def test_cache_of_another_layer_is_refused(tmp_path):
    path = str(tmp_path / "cache.pt")
    last = TextEncoder(PACKAGED_MINILM)
    last.warm(CAPTIONS, cache_file=path)
    middle = TextEncoder(PACKAGED_MINILM, hidden_layer=3)
    with pytest.raises(ValueError, match="hidden_layer 6.*delete it"):
        middle.load_cache(path)
    same = TextEncoder(PACKAGED_MINILM)
    same.load_cache(path)
    torch.testing.assert_close(same(CAPTIONS[:1]).tokens, last(CAPTIONS[:1]).tokens)


def test_cache_file_is_named_by_the_layer_it_holds():
    from tti.config import load_config
    from tti.model import build_text_encoder

    def name(layer):
        cfg = load_config("configs/shapes32.yaml", [f"text.hidden_layer={layer}"])
        return os.path.basename(build_text_encoder(cfg).cache_file)

    assert name(-1) == name(6) == "text_packaged-minilm_32.pt"  # the last layer, either way
    assert name(3) == name(-4) == "text_packaged-minilm_32_layer3.pt"
