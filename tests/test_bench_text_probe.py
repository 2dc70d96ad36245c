"""bench.text_probe's linear role probe: a separable role is found, a random one is not."""
import torch

from bench.text_probe import linear_accuracy


def test_linear_probe_finds_a_linear_label_and_not_a_random_one():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(800, 16, generator=gen)
    direction = torch.randn(16, generator=gen)
    linear = (x @ direction > 0).float()
    random = (torch.rand(800, generator=gen) > 0.5).float()
    train, val = slice(0, 600), slice(600, 800)
    _, val_linear = linear_accuracy(x[train], linear[train], x[val], linear[val])
    _, val_random = linear_accuracy(x[train], random[train], x[val], random[val])
    assert val_linear > 0.95
    assert 0.35 < val_random < 0.65
