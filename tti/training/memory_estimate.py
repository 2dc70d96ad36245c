"""GPU memory a config needs per process, estimated before anything runs: what tti.preflight
(and `tti.train --device cuda`) hold against each GPU's free memory. The model is built on
PyTorch's meta device (shapes only; the text encoder from its config.json alone).

- Training state, exact up to the allocator's rounding (the *_BYTES constants below).
- Activations, rough: what the image model's loss saves for backward per image, at fp32
  (batch 2 minus batch 1, so saved weights count once; bf16 autocast halves many). Not
  counted: backward temporaries, a fine-tuned text encoder's activations (transformers'
  masks cannot run on the meta device), the CUDA context, fragmentation; a loss that cannot
  run on the meta device gets the state alone.

So it catches a GPU that cannot hold the run at all and an explicit micro-batch far too
large; `train.micro_batch: auto` measures the real limit (tti/training/micro_batch_search.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch

from tti.config.registry import MODEL_KINDS
from tti.config.schema import Config
from tti.infra.gpus import GIB
from tti.text.batch import TextBatch
from tti.text.source import WORD_VOCAB, check_text_encoder

# Bytes per trained parameter: fp32 weight, gradient, AdamW exp_avg and exp_avg_sq, EMA copy.
TRAINED_BYTES = 4 + 4 + 8 + 4
DDP_BUCKET_BYTES = 4  # DDP keeps its own copy of the gradients for the all-reduce
FROZEN_BYTES = 4
# A word-vocabulary model's vocabulary comes from the captions, unknown before the data is
# read: a COCO-sized guess (its embeddings are a small share of alignDRAW's weights).
VOCAB_GUESS = 10_000


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one process needs: `state` whatever the micro-batch, `per_image` more per image
    of the micro-batch (None: could not be counted for this model)."""
    state: int
    per_image: int | None

    def at(self, micro: int) -> int:
        return self.state + micro * (self.per_image or 0)

    def largest_micro(self, free: int) -> int | None:
        """The largest micro-batch whose estimate fits in `free` bytes (0: not even one;
        None: any, as far as an estimate without activations can tell)."""
        if free < self.at(1):
            return 0
        return (free - self.state) // self.per_image if self.per_image else None

    def describe(self, micro: int) -> str:
        """'about 4.6 GiB at micro-batch 1 (training state 3.9 GiB + 0.7 GiB per image)'."""
        per = (f"{self.per_image / GIB:.2f} GiB per image" if self.per_image is not None
               else "activations not counted")
        return (f"about {self.at(micro) / GIB:.1f} GiB at micro-batch {micro} (training state "
                f"{self.state / GIB:.1f} GiB + {per})")


def _text_side(cfg: Config) -> tuple[int, int, int | None]:
    """(trained, frozen) parameter counts of the text encoder and its token width (None for
    word ids), from its config.json alone."""
    if MODEL_KINDS.get(cfg.model.kind).text == "vocab" or cfg.text.name == WORD_VOCAB:
        return 0, 0, None
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(check_text_encoder(cfg.text.name))
    with torch.device("meta"):
        encoder = AutoModel.from_config(config)
    n = sum(p.numel() for p in encoder.parameters())
    return (n, 0, config.hidden_size) if cfg.text.finetune else (0, n, config.hidden_size)


def _saved_bytes(image_model, cfg: Config, batch: int, width: int | None) -> int:
    """Bytes the image model's loss saves for backward on a meta batch of `batch` images."""
    size, length = cfg.data.image_size, cfg.text.max_length
    images = torch.zeros(batch, 3, size, size, device="meta")
    mask = torch.ones(batch, length, dtype=torch.bool, device="meta")
    tokens = (torch.zeros(batch, length, dtype=torch.long, device="meta") if width is None else
              torch.zeros(batch, length, width, device="meta", requires_grad=cfg.text.finetune))
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel() * t.element_size())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        image_model.loss(images, TextBatch(tokens, mask))
    return sum(saved)


def estimate(cfg: Config, world_size: int) -> MemoryEstimate:
    """What one of `world_size` processes training `cfg` needs."""
    trained, frozen, width = _text_side(cfg)
    stub = SimpleNamespace(dim=width, vocab=range(VOCAB_GUESS))  # what kinds' builders read
    with torch.device("meta"):
        image_model = MODEL_KINDS.get(cfg.model.kind).build(cfg, stub)
    trained += sum(p.numel() for p in image_model.parameters() if p.requires_grad)
    per_trained = TRAINED_BYTES + (DDP_BUCKET_BYTES if world_size > 1 else 0)
    state = trained * per_trained + frozen * FROZEN_BYTES
    try:
        per_image = _saved_bytes(image_model, cfg, 2, width) - _saved_bytes(image_model, cfg, 1, width)
    except (RuntimeError, NotImplementedError):  # an op without a meta kernel: state alone
        per_image = None
    return MemoryEstimate(state, per_image)
