"""Text encoder: which hidden state it returns, fine-tuning below the top, what it keeps
(no pooler), and how a text.name that cannot be loaded fails. Its store: test_text_store.py."""
import shutil
import time

import pytest
import torch

from tti.text.encoder import TextEncoder
from tti.text.source import PACKAGED_MINILM

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


# ---------------------------------------------------------------- where the weights come from


def load_error(name: str) -> tuple[str, float]:
    """check_text_encoder's error message for `name`, and the seconds it took to fail."""
    from tti.text.source import TextEncoderError, check_text_encoder

    start = time.perf_counter()
    with pytest.raises(TextEncoderError) as error:
        check_text_encoder(name)
    return str(error.value), time.perf_counter() - start


def test_unreachable_roberta_fails_at_once_in_one_line(monkeypatch, tmp_path):
    import huggingface_hub.constants

    import tti.infra.hub
    import tti.text.source
    from tti.infra.hub import HUB_TIMEOUT_S
    from tti.text.source import TextEncoderError

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # empty
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message, seconds = load_error("roberta-base")
    assert seconds < HUB_TIMEOUT_S  # offline: the hub is not even asked
    assert "\n" not in message and "text.name 'roberta-base'" in message
    assert "HF_HUB_OFFLINE" in message
    assert "--set text.name=/path/to/roberta-base" in message
    assert f"--set text.name={PACKAGED_MINILM}" in message
    # The encoder itself raises it too (a ValueError the CLI prints without a traceback).
    with pytest.raises(TextEncoderError, match="--set text.name=/path/to/roberta-base"):
        TextEncoder("roberta-base")
    # Online but with no answer from the hub (here a closed local port): the same, fast.
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    message, seconds = load_error("FacebookAI/roberta-base")
    assert seconds < HUB_TIMEOUT_S and "hub does not answer" in message
    assert "--set text.name=/path/to/roberta-base" in message
    # Where the hub answers, the name goes to from_pretrained as it is.
    monkeypatch.setattr(tti.infra.hub, "hub_answers", lambda: True)
    assert tti.text.source.check_text_encoder("FacebookAI/roberta-base") == "FacebookAI/roberta-base"


def test_paths_that_are_not_model_folders_are_named(tmp_path):
    message, _ = load_error(str(tmp_path / "no" / "such" / "roberta"))
    assert "no such folder" in message and str(tmp_path) in message
    message, _ = load_error(str(tmp_path))
    assert "without config.json" in message


def test_local_folders_and_the_hf_cache_load_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from tti.text.source import check_text_encoder, packaged_minilm_path

    assert check_text_encoder(PACKAGED_MINILM) == packaged_minilm_path()
    assert check_text_encoder("vocab") == "vocab"  # alignDRAW's words: nothing to load
    assert check_text_encoder(packaged_minilm_path()) == packaged_minilm_path()
    # A hub id found in the HF cache (the layout hf_hub_download writes) loads offline.
    repo = tmp_path / "hub" / "models--someone--minilm"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(packaged_minilm_path(), snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert check_text_encoder("someone/minilm") == str(snapshot)
    assert TextEncoder("someone/minilm").dim == TextEncoder(PACKAGED_MINILM).dim


def test_pooler_is_dropped_and_nothing_else(reference):
    states, mask = reference
    for finetune in (False, True):
        encoder = TextEncoder(PACKAGED_MINILM, finetune=finetune, cache=False)
        assert encoder.dropped == ["pooler"] and encoder.model.pooler is None
        assert encoder.frozen_unused == []
        encoder.eval()
        torch.testing.assert_close(encoder(CAPTIONS).tokens, states[6])
