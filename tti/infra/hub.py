"""Where a pretrained model's files come from, checked before any work: `locate_pretrained`
fails at once in one line where from_pretrained alone would retry the hub for about a
minute, then print a traceback."""
from __future__ import annotations

import os

HUB_TIMEOUT_S = 5.0  # long enough for a slow link, short next to from_pretrained's minute
_TRUE = ("1", "ON", "YES", "TRUE")


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


def cached_snapshot(name: str) -> str | None:
    """The HF cache's snapshot folder of hub id `name`, if its config.json was downloaded."""
    from huggingface_hub import try_to_load_from_cache

    try:
        config = try_to_load_from_cache(name, "config.json")
    except ValueError:  # not a valid hub id either
        return None
    return os.path.dirname(config) if isinstance(config, str) else None


def locate_pretrained(name: str, key: str, error: type, advice: str = "") -> str:
    """What `from_pretrained` should load for the setting `key` = `name` (text.name,
    model.autoencoder): a local folder that save_pretrained wrote, the hub id when the hub
    answers, or its snapshot in the HF cache; no weights are read. Raises `error` (a UserError
    class) in one line naming `key` and the way out; `advice` ends it where the caller knows
    another way (", or try ...")."""
    folder = os.path.expanduser(name)
    if os.path.isdir(folder):
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise error(f"{key} {name!r} is a folder without config.json, not a model folder "
                        f"(as save_pretrained writes one)")
        return folder
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:  # a path, not "org/name"
        raise error(f"{key} {name!r}: no such folder")
    offline = hub_offline()
    if not offline and hub_answers():
        return name
    cached = cached_snapshot(name)
    if cached is not None:
        return cached
    why = ("offline mode is on (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE)" if offline
           else "the Hugging Face hub does not answer")
    raise error(f"{key} {name!r} is neither a local folder nor in the Hugging Face cache, and "
                f"{why}: point it at a local copy with --set {key}=/path/to/"
                f"{name.rsplit('/', 1)[-1]}{advice}")
