"""The transformer backbone keeps the contract (x, t, text) -> output: shapes, text padding
that changes nothing, adaLN-zero's identity start, a gradient for every weight."""
import pytest
import torch

from tti.models.backbones.transformer import Transformer, TransformerConfig
from tti.text.batch import TextBatch

DESIGNS = [dict(text="cross"), dict(text="joint"), dict(text="cross", skips=True),
           dict(text="joint", skips=True, depth=5, positions="learned"),
           dict(text="cross", text_layers=1, pooled_text=False)]


def make(randomise=True, **kwargs):
    cfg = TransformerConfig(**{"width": 32, "depth": 4, "head_dim": 16, "text_width": 32, **kwargs})
    model = Transformer(cfg, image_size=16, context_dim=8)
    if randomise:  # the zero-initialised gates would hide every path but the first
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.1)
    return model


def batch():
    tokens = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    return torch.randn(2, 3, 16, 16), torch.tensor([10.0, 900.0]), TextBatch(tokens, mask)


@pytest.mark.parametrize("design", DESIGNS, ids=str)
def test_padding_changes_nothing_and_empty_captions_are_finite(design):
    model = make(**design)
    x, t, text = batch()
    out = model(x, t, text)
    assert out.shape == x.shape
    garbage = text.tokens.clone()
    garbage[~text.mask] = 99.0
    torch.testing.assert_close(model(x, t, TextBatch(garbage, text.mask)), out)
    shorter = TextBatch(text.tokens[:, :3], text.mask[:, :3])
    torch.testing.assert_close(model(x, t, shorter), out, atol=1e-5, rtol=0)
    empty = model(x, t, TextBatch(text.tokens, torch.zeros_like(text.mask)))
    assert torch.isfinite(empty).all() and not torch.allclose(empty, out)


@pytest.mark.parametrize("design", DESIGNS, ids=str)
def test_every_weight_gets_a_gradient(design):
    """DDP's requirement: no trainable weight is left out of the graph."""
    model = make(**design)
    x, t, text = batch()
    model(x, t, text).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing, missing


def test_adaln_zero_starts_as_zero_output_and_time_and_text_matter_once_trained():
    x, t, text = batch()
    assert make(randomise=False)(x, t, text).abs().max() == 0  # gates and the output map at 0
    model = make()
    out = model(x, t, text)
    assert not torch.allclose(model(x, torch.tensor([500.0, 500.0]), text), out)
    other = TextBatch(torch.randn_like(text.tokens), text.mask)
    assert not torch.allclose(model(x, t, other), out)
    torch.testing.assert_close(model(x, torch.tensor(10.0), text)[0], out[0])  # a scalar t


def test_a_wrong_input_size_is_named():
    model = make()
    x, t, text = batch()
    with pytest.raises(ValueError, match=r"x must be \[B, 3, 16, 16\]"):
        model(x[:, :, :8, :8], t, text)
