"""Text side of the model: a Hugging Face transformer's token states plus the padding mask.

`TextEncoder` wraps any AutoTokenizer/AutoModel pair (RoBERTa for COCO, the packaged MiniLM
for the offline default); frozen, it can read its states from a TextStore (tti/text/store.py).
"""
from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn as nn

from tti.text.batch import TextBatch
from tti.text.source import TextEncoderError, check_text_encoder
from tti.text.store import TextStore, encoder_identity
from tti.text.unused_parameters import drop_unused

log = logging.getLogger(__name__)


class TextEncoder(nn.Module):
    """Captions -> TextBatch(tokens float [B, L, D], mask bool [B, L]).

    name: a hub id ("roberta-base"), a local folder, or "packaged-minilm".
    finetune: False freezes the encoder (eval mode, no grad).
    cache: frozen only: the states are fp16-rounded and read from the attached TextStore
        (`use_store`); a caption the store lacks is encoded alone, so its states never
        depend on the rest of its batch.
    max_length: captions are cut to this many tokens, with one warning per run.
    hidden_layer: the hidden state returned: k = the output of layer k (0 = the input
        embeddings), negative counts from the end (-1, the default, = the last layer). A
        middle layer can keep more of the sentence's structure than a last layer trained
        for sentence similarity. The layers above it and the pooler are dropped (or, where
        the model cannot run without them, frozen).
    """

    def __init__(self, name: str, finetune: bool = False, max_length: int = 32,
                 cache: bool = True, tokenizer=None, model=None, hidden_layer: int = -1):
        super().__init__()
        self.name = name
        self.tokenizer, self.model = load_pretrained(name, tokenizer, model)
        self.finetune = finetune
        self.max_length = max_length
        # Depth of the pretrained model, before any layers are dropped (the HF config is kept).
        self.depth = layers = self.model.config.num_hidden_layers
        if not -(layers + 1) <= hidden_layer <= layers:
            raise ValueError(f"TextEncoder: hidden_layer {hidden_layer} out of range for {name!r}, "
                             f"which has {layers} layers (use 0..{layers} or -1..-{layers + 1})")
        self.hidden_layer = hidden_layer % (layers + 1)  # 0..layers
        # BERT-style models keep their blocks in encoder.layer: cut those above the wanted one.
        self._wanted_is_last = self.hidden_layer == layers
        blocks = getattr(getattr(self.model, "encoder", None), "layer", None)
        if not self._wanted_is_last and isinstance(blocks, nn.ModuleList):
            self.model.encoder.layer = blocks[:self.hidden_layer]
            self._wanted_is_last = True
        # Then drop the unused rest (pooler): a trainable part with no gradient stops DDP at step 2.
        self.model.eval()
        self.dropped, self.frozen_unused = drop_unused(
            self.model, lambda: self._run(["a"], note_truncation=False).tokens)
        self.use_cache = cache and not finetune
        self.store: TextStore | None = None  # attached by use_store
        self.store_dir: str | None = None  # where this encoder's store lives (tti.models.text_to_image)
        self._said_truncation = False
        if not finetune:
            self.model.requires_grad_(False)

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def train(self, mode: bool = True):
        # A frozen encoder stays in eval mode (no dropout) even while the UNet trains.
        super().train(mode and self.finetune)
        return self

    def _run(self, captions: list[str], note_truncation: bool = True) -> TextBatch:
        enc = self.tokenizer(list(captions), padding=True, truncation=True,
                             max_length=self.max_length, return_tensors="pt")
        if note_truncation and not self._said_truncation:
            self._note_truncation(captions, enc["attention_mask"])
        enc = {k: v.to(self.device) for k, v in enc.items()}
        if self._wanted_is_last:
            out = self.model(**enc).last_hidden_state
        else:
            out = self.model(**enc, output_hidden_states=True).hidden_states[self.hidden_layer]
        return TextBatch(out, enc["attention_mask"].bool())

    def _note_truncation(self, captions: list[str], mask: torch.Tensor) -> None:
        """Warn once per run (on rank 0) that captions over max_length tokens are cut."""
        full = [c for c, n in zip(captions, mask.sum(1).tolist()) if n == self.max_length]
        if not full:
            return
        lengths = [len(ids) for ids in
                   self.tokenizer(full, truncation=False, verbose=False)["input_ids"]]
        cut = [(n, c) for n, c in zip(lengths, full) if n > self.max_length]
        if not cut:
            return
        self._said_truncation = True
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return
        tokens, caption = max(cut)
        shown = caption if len(caption) <= 80 else caption[:77] + "..."
        log.warning("text.max_length=%d: captions longer than that many tokens are cut to it "
                    "(%d of %d captions in this batch, e.g. one of %d tokens: %r); "
                    "said once per run", self.max_length, len(cut), len(captions), tokens, shown)

    def forward(self, captions: list[str]) -> TextBatch:
        if self.finetune:
            return self._run(captions)
        if not self.use_cache:
            return self.encode_live(captions)
        return self._stored(captions)

    @torch.no_grad()
    def encode_live(self, captions: list[str]) -> TextBatch:
        """The encoder run on `captions` now (never the store), without grad."""
        return self._run(captions)

    def use_store(self, store: TextStore | None) -> None:
        """Read states from `store` (None: encode live); TextStoreError if it holds another
        encoder's states."""
        if store is not None:
            store.check_identity(encoder_identity(self))
        self.store = store

    def _stored(self, captions: list[str]) -> TextBatch:
        """States from the store, fp16 values as float32; absent captions encoded one by one."""
        rows = self.store.find(captions) if self.store is not None else [-1] * len(captions)
        absent = dict.fromkeys(c for c, row in zip(captions, rows) if row < 0)
        for caption in absent:  # alone: the same states whatever batch it came in
            absent[caption] = self.encode_live([caption]).tokens[0].to(torch.float16).cpu().numpy()
        states = [self.store.states(row) if row >= 0 else absent[c] for c, row in zip(captions, rows)]
        tokens = np.zeros((len(states), max(len(s) for s in states), self.dim), dtype=np.float16)
        mask = np.zeros(tokens.shape[:2], dtype=bool)
        for i, s in enumerate(states):
            tokens[i, :len(s)] = s
            mask[i, :len(s)] = True
        # fp16 to the device and float32 there: half the bytes to copy, the cast where it is cheap
        tokens = torch.from_numpy(tokens).to(self.device).float()
        return TextBatch(tokens, torch.from_numpy(mask).to(self.device))

    def null(self, batch_size: int = 1) -> TextBatch:
        """The empty caption, used for caption dropout and classifier-free guidance."""
        return self([""]).repeat(batch_size)


def load_pretrained(name: str, tokenizer=None, model=None):
    """(tokenizer, model) for text.name, each loaded unless given; TextEncoderError (one
    line) if it cannot be loaded."""
    if tokenizer is not None and model is not None:
        return tokenizer, model
    from transformers import AutoModel, AutoTokenizer

    path = check_text_encoder(name)
    try:
        tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(path)
        model = model if model is not None else AutoModel.from_pretrained(path)
    except (OSError, ValueError) as e:  # e.g. a folder with a config but no weights
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise TextEncoderError(f"text.name {name!r}: cannot load it from {path} "
                               f"({first_line})") from None
    return tokenizer, model
