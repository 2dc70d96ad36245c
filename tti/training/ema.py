"""Exponential moving average of the trainable weights (what sampling uses by default)."""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from tti.infra.checkpoints import CheckpointError, mismatched_keys


class EMA:
    """Shadow copies of a module's trainable parameters, keyed like its state_dict. The decay
    ramps up as min(decay, (1 + n) / (10 + n)) over the n updates so far, so short runs are
    not dominated by the random initialisation."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.shadow = {name: p.detach().clone().float()
                       for name, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for name, p in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(p.detach().float(), 1 - decay)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        """Load `state_dict()`'s shadow and update count strictly (CheckpointError naming the
        missing, unexpected or mis-shaped weights); the decay stays the config's
        train.ema_decay, which a resumed run may change."""
        problems = mismatched_keys(self.shadow, state["shadow"])
        if problems:
            raise CheckpointError(f"the checkpoint's EMA weights do not fit the model: {problems}")
        self.updates = state["updates"]
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for name, p in model.named_parameters():
            if name in self.shadow:
                p.copy_(self.shadow[name])

    @contextlib.contextmanager
    def swapped_into(self, model: nn.Module):
        """`model` holds the EMA weights inside the `with` block, its own weights after."""
        backup = {n: p.detach().clone() for n, p in model.named_parameters() if n in self.shadow}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n in backup:
                        p.copy_(backup[n])
