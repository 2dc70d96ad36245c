"""How well training uses the hardware: training FLOPs per image, achieved FLOP/s and MFU
(the share of a GPU's bf16 peak), peak memory. The training log and the benchmarks count
FLOPs with the same `train_flops_per_image`."""
from __future__ import annotations

import os
import re
import resource
import sys
from typing import Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from NVIDIA's datasheets, matched in
# order against torch.cuda.get_device_name(): the first pattern found wins.
PEAK_BF16_TFLOPS = [
    (r"H100.*NVL", 835.0), (r"H100.*PCIe", 756.0), (r"H100", 989.0),
    (r"H200.*NVL", 835.0), (r"H200", 989.0), (r"B200", 2250.0), (r"A100", 312.0),
    (r"L40S", 362.0), (r"\bL4\b", 121.0), (r"\bA10\b", 125.0), (r"RTX 4090", 165.0),
]


def train_flops_per_image(loss_fn: Callable[[], torch.Tensor], n_images: int) -> float:
    """Forward + backward FLOPs per image of `loss_fn()`, a scalar loss over `n_images`
    images, as torch.utils.flop_counter counts them (matmuls and convolutions; attention runs
    through SDPA's math kernel, whose matmuls it sees). The caller clears the gradients."""
    with FlopCounterMode(display=False) as counter, sdpa_kernel([SDPBackend.MATH]):
        loss_fn().backward()
    return counter.get_total_flops() / n_images


def model_flops_per_image(model, images: torch.Tensor, captions: list[str],
                          amp: torch.dtype | None) -> float:
    """Training FLOPs per image of a TextToImage on one micro-batch: images float
    [B, 3, S, S] in [-1, 1] (or a latent store's moments) on the model's device, B captions;
    autocast to `amp` (None: fp32). Random streams and gradients (none) are left as they were."""
    device = images.device
    devices = [device] if device.type == "cuda" else []
    # TextToImage.forward's computation, not a call to it, so what hooks forward (DDP, tests)
    # sees one call per training micro-batch. A latent-space model learns latents.
    latents = model.autoencoder.training_latents if model.autoencoder is not None else None
    loss = lambda: model.image_model.loss(latents(images) if latents else images,
                                          model.encode(captions))
    with torch.random.fork_rng(devices=devices):  # the loss draws timesteps and noise
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            flops = train_flops_per_image(loss, len(captions))
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # the count is not part of training's peak
    return flops


def peak_tflops(device: torch.device) -> float | None:
    """Dense bf16 peak of a known GPU in TFLOP/s; None on CPU or an unlisted GPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for pattern, peak in PEAK_BF16_TFLOPS if re.search(pattern, name)), None)


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory since start-up, in GiB: tensors allocated on a GPU, resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** (30 if sys.platform == "darwin" else 20)  # bytes on macOS, KiB on Linux


def total_memory_gib(device: torch.device) -> float:
    """The device's memory in GiB: a GPU's, or the machine's physical memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / 2 ** 30
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30


def utilisation(images_per_s: float, flops_per_image: float, world_size: int,
                device: torch.device) -> dict:
    """Log values: achieved training TFLOP/s of all ranks together, MFU (their share of the
    devices' bf16 peak; known GPUs only) and this process's peak memory in GiB."""
    tflops = images_per_s * flops_per_image / 1e12
    values = {"tflops": tflops}
    peak = peak_tflops(device)
    if peak:
        values["mfu"] = tflops / (peak * world_size)
    values["peak_mem_gib"] = peak_memory_gib(device)
    return values
