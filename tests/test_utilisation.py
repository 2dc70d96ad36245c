"""Utilisation numbers: the FLOP counter counts forward and backward (checked against a
count by hand), counting leaves training untouched (random streams, gradients, and calls to
forward, which hooks count as training steps), and GPU names map to the right peak."""
import pytest
import torch
import torch.nn as nn

from tti.models.text_to_image import TextToImage
from tti.text.batch import TextBatch
from tti.training.utilisation import model_flops_per_image, peak_tflops, train_flops_per_image, utilisation


def test_flops_are_counted_forward_and_backward():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(5, 8)
    flops = train_flops_per_image(lambda: model(x).sum(), n_images=5)
    # A matmul of (m x k) by (k x n) is 2mkn FLOPs. Forward: both layers. Backward: the
    # weight gradient of both, the input gradient of the second only (x needs none).
    forward = 2 * (8 * 16 + 16 * 4)
    backward = 2 * (8 * 16 + 16 * 4) + 2 * 16 * 4
    assert flops == forward + backward


class NoisyLoss(nn.Module):
    """A generator whose loss(images, text) draws noise, as the diffusion loss does."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(12, 1)

    def loss(self, images, text):
        noisy = images.flatten(1) + torch.randn(images.shape[0], 12) + text.tokens.sum()
        return self.linear(noisy).square().mean()


class Lengths(nn.Module):
    """A text encoder: each caption's length as its only token."""

    def forward(self, captions):
        lengths = torch.tensor([[[float(len(c))]] for c in captions])
        return TextBatch(lengths, torch.ones(len(captions), 1, dtype=torch.bool))


def test_counting_leaves_random_streams_gradients_and_forward_alone(monkeypatch):
    model, images = TextToImage(Lengths(), NoisyLoss()), torch.zeros(3, 3, 2, 2)
    monkeypatch.setattr(TextToImage, "forward", lambda *a: pytest.fail("forward was called"))
    before = torch.get_rng_state()
    flops = model_flops_per_image(model, images, ["a", "bb", "c"], amp=None)
    assert flops == (2 * 12 + 2 * 12) * 1  # forward + weight gradient, per image
    assert torch.equal(torch.get_rng_state(), before)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L4", 121.0),
    ("NVIDIA L40S", 362.0), ("NVIDIA L40", None), ("NVIDIA A10", 125.0), ("NVIDIA A10G", None),
    ("Tesla V100-SXM2-16GB", None)])
def test_gpu_names_map_to_their_bf16_peak(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_tflops(torch.device("cuda", 0)) == peak
    values = utilisation(1000.0, 2e9, world_size=2, device=torch.device("cpu"))
    assert values["tflops"] == 2.0 and "mfu" not in values


def test_mfu_is_the_share_of_every_device_peak(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-40GB")
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2 ** 30)
    values = utilisation(10_000.0, 15.6e9, world_size=4, device=torch.device("cuda", 0))
    assert values == {"tflops": pytest.approx(156.0), "mfu": pytest.approx(0.125),
                      "peak_mem_gib": 3.0}
