"""Standard normal noise from one generator, or from one generator per sample."""
from __future__ import annotations

import torch


def draw_noise(shape, generator, device) -> torch.Tensor:
    """Standard normal float32 of `shape` on `device`.

    generator: None (global RNG), one torch.Generator for the whole batch, or a list of
    shape[0] generators, one per sample: row i then comes from generator i alone, so a
    sample's noise does not depend on its batch. Noise is drawn on each generator's own
    device and moved to `device` (a CPU generator gives the same noise for a GPU model).
    """
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"draw_noise: {len(generator)} generators for a batch of {shape[0]}")
        return torch.stack([torch.randn(tuple(shape[1:]), generator=g, device=g.device)
                            for g in generator]).to(device)
    if generator is None:
        return torch.randn(shape, device=device)
    return torch.randn(tuple(shape), generator=generator, device=generator.device).to(device)
