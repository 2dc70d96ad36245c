"""Word vocabulary and the word-id text encoder that alignDRAW uses instead of RoBERTa.

`WordVocabEncoder` turns captions into right-padded int64 word ids behind TextEncoder's
interface; the word embeddings belong to the model (tti.models.aligndraw.model.AlignDraw).
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Iterable

import torch
import torch.nn as nn

from tti.text.batch import TextBatch

PAD = "<pad>"
UNK = "<unk>"
# The empty caption is one real token, so a null caption's mask has a True and the
# caption LSTM and the attention softmax always see at least one word.
EMPTY = "<empty>"
SPECIALS = (PAD, UNK, EMPTY)

_WORD = re.compile(r"[a-z0-9]+")


def tokenize(caption: str) -> list[str]:
    """Lowercase runs of [a-z0-9]; punctuation and whitespace split and are dropped.

    "A red Circle, left of a square." -> ["a", "red", "circle", "left", "of", "a", "square"]
    """
    if not isinstance(caption, str):
        raise TypeError(f"tokenize: caption must be str, got {type(caption).__name__}")
    return _WORD.findall(caption.lower())


class WordVocab:
    """Word <-> id table; `words` in id order: <pad>, <unk>, <empty> (ids 0, 1, 2), then words."""

    def __init__(self, words: list[str]):
        words = list(words)
        if tuple(words[:3]) != SPECIALS:
            raise ValueError(f"WordVocab: the first entries must be {SPECIALS}, got {words[:3]}")
        if len(set(words)) != len(words):
            raise ValueError("WordVocab: duplicate entries in the word list")
        self.words = words
        self.index = {w: i for i, w in enumerate(words)}

    pad_id = 0
    unk_id = 1
    empty_id = 2

    def __len__(self) -> int:
        return len(self.words)

    def __eq__(self, other) -> bool:
        return isinstance(other, WordVocab) and self.words == other.words

    def encode(self, caption: str, max_length: int | None = None) -> list[int]:
        """Caption -> at most max_length word ids (unknown words -> unk_id); no words ->
        [empty_id]."""
        ids = [self.index.get(w, self.unk_id) for w in tokenize(caption)]
        if max_length is not None:
            ids = ids[:max_length]
        return ids or [self.empty_id]

    def decode(self, ids: Iterable[int]) -> str:
        """Word ids -> space-joined words; padding is skipped, <empty> gives ""."""
        words = [self.words[int(i)] for i in ids if int(i) not in (self.pad_id, self.empty_id)]
        return " ".join(words)

    def to_dict(self) -> dict:
        """Plain-Python form for checkpoints/JSON; `WordVocab.from_dict` inverts it."""
        return {"format": "tti.vocab/1", "words": list(self.words)}

    @classmethod
    def from_dict(cls, data: dict) -> "WordVocab":
        if not isinstance(data, dict) or data.get("format") != "tti.vocab/1":
            raise ValueError("WordVocab.from_dict: expected a dict from WordVocab.to_dict() "
                             f"(format 'tti.vocab/1'), got {str(data)[:80]!r}")
        return cls(data["words"])

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 1,
              max_size: int | None = None) -> "WordVocab":
        """Same as `build_vocab`."""
        return build_vocab(captions, min_count, max_size)


def build_vocab(captions: Iterable[str], min_count: int = 1,
                max_size: int | None = None) -> WordVocab:
    """Vocabulary of the words in `captions` seen at least `min_count` times.

    max_size: cap on len(vocab), special tokens included (an embedding table of max_size
        rows always fits); the most frequent words are kept, ties broken alphabetically so
        the result does not depend on caption order.
    """
    if min_count < 1:
        raise ValueError(f"build_vocab: min_count must be >= 1, got {min_count}")
    if max_size is not None and max_size < len(SPECIALS):
        raise ValueError(f"build_vocab: max_size must be >= {len(SPECIALS)} "
                         f"(the special tokens), got {max_size}")
    counts = Counter(w for c in captions for w in tokenize(c))
    for special in SPECIALS:
        counts.pop(special, None)
    ranked = sorted((w for w, n in counts.items() if n >= min_count),
                    key=lambda w: (-counts[w], w))
    if max_size is not None:
        ranked = ranked[: max_size - len(SPECIALS)]
    return WordVocab(list(SPECIALS) + ranked)


class WordVocabEncoder(nn.Module):
    """Captions -> TextBatch(tokens int64 word ids [B, L], mask bool [B, L]), right-padded.

    TextEncoder's interface, without weights: nothing to fine-tune or cache. The vocabulary
    travels in `state_dict()` (as extra state) and via `to_dict()`.
    max_length: captions are truncated to this many words.
    """

    finetune = False

    def __init__(self, vocab: WordVocab, max_length: int = 32):
        super().__init__()
        if not isinstance(vocab, WordVocab):
            raise TypeError("WordVocabEncoder: vocab must be a WordVocab, "
                            f"got {type(vocab).__name__}")
        if max_length < 1:
            raise ValueError(f"WordVocabEncoder: max_length must be >= 1, got {max_length}")
        self.vocab = vocab
        self.max_length = max_length
        # Empty, not saved: only records the device that `.to(device)` moved the encoder to.
        self.register_buffer("_device_anchor", torch.zeros(0), persistent=False)

    @property
    def dim(self) -> None:
        """None: tokens are word ids, not embeddings (see `vocab_size` for the id range)."""
        return None

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def device(self) -> torch.device:
        return self._device_anchor.device

    def forward(self, captions: list[str]) -> TextBatch:
        if isinstance(captions, str):
            raise TypeError("WordVocabEncoder: pass a list of captions, not a single str")
        if len(captions) == 0:
            raise ValueError("WordVocabEncoder: empty list of captions")
        ids = [self.vocab.encode(c, self.max_length) for c in captions]
        length = max(len(i) for i in ids)
        tokens = torch.full((len(ids), length), self.vocab.pad_id, dtype=torch.long)
        mask = torch.zeros(len(ids), length, dtype=torch.bool)
        for row, i in enumerate(ids):
            tokens[row, : len(i)] = torch.tensor(i, dtype=torch.long)
            mask[row, : len(i)] = True
        return TextBatch(tokens.to(self.device), mask.to(self.device))

    def null(self, batch_size: int = 1) -> TextBatch:
        """The empty caption: one <empty> token per row, mask [[True]] * batch_size."""
        return self([""]).repeat(batch_size)

    def to_dict(self) -> dict:
        return {"vocab": self.vocab.to_dict(), "max_length": self.max_length}

    @classmethod
    def from_dict(cls, data: dict) -> "WordVocabEncoder":
        return cls(WordVocab.from_dict(data["vocab"]), max_length=int(data["max_length"]))

    def get_extra_state(self) -> dict:
        return self.to_dict()

    def set_extra_state(self, state: dict) -> None:
        self.vocab = WordVocab.from_dict(state["vocab"])
        self.max_length = int(state["max_length"])
