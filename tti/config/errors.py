"""The one error a config can raise: it names the key, and load_config names who set it."""
from __future__ import annotations

from tti.infra.cli import UserError


class ConfigError(UserError, ValueError):
    """A config key or value is wrong. The message is one line naming the key; `keys` holds
    every key the error is about, so load_config can name the file or --set item behind it."""

    def __init__(self, message: str, keys: tuple = ()):
        super().__init__(message)
        self.keys = tuple(keys)
