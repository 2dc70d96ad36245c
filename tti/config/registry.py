"""Where a model kind, an objective or a backbone is looked up by name: three registries.

tti/models/registry.py adds every `Entry` when `tti.models` is imported; everything else
(config rules, train, sample, export, evaluate) asks these registries and never compares names.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from tti.config.errors import ConfigError


@dataclass(frozen=True)
class Entry:
    """One plug-in.

    name: its name in model.kind / model.objective / model.backbone, and its section model.<name>.
    build: kinds: (cfg, text_encoder) -> module with loss/sample; objectives: (cfg) ->
          Objective; backbones: (cfg, image_channels, context_dim) -> module (x, t, text).
    schema: the dataclass model.<name> is read into (its defaults); None = no section.
    validate: (cfg) -> None, raising ConfigError naming the key (tti.config.rules helpers).
    samplers: {sampler id: display name}, for objectives and for kinds that sample alone.
    parts: the registries a model kind composes ("objective", "backbone"), in that order.
    text: the text encoder a kind needs regardless of text.name ("vocab": word ids).
    label: (cfg) -> a short description for tables (kinds; parts may add theirs).
    """
    name: str
    build: Callable
    schema: Optional[type] = None
    validate: Optional[Callable[[Any], None]] = None
    samplers: dict = field(default_factory=dict)
    parts: tuple = ()
    text: Optional[str] = None
    label: Optional[Callable[[Any], str]] = None


class Registry:
    """Entries of one kind of plug-in, keyed by name; `key` is the config key that names one."""

    def __init__(self, key: str):
        self.key = key
        self.entries: dict[str, Entry] = {}

    def add(self, entry: Entry) -> Entry:
        if entry.name in self.entries:
            raise ValueError(f"{self.key}: {entry.name!r} is registered twice")
        if entry.schema is not None and not dataclasses.is_dataclass(entry.schema):
            raise TypeError(f"{self.key} {entry.name!r}: schema must be a dataclass")
        self.entries[entry.name] = entry
        return entry

    def get(self, name: str) -> Entry:
        """The entry called `name`; ConfigError naming the key and the known names."""
        if not self.entries:
            raise RuntimeError(f"no {self.key} is registered: import tti.models first "
                               "(it registers every plug-in)")
        if name not in self.entries:
            raise ConfigError(f"{self.key}: unknown {name!r}; known: {', '.join(self.entries)}",
                              (self.key,))
        return self.entries[name]

    def __contains__(self, name: str) -> bool:
        return name in self.entries


MODEL_KINDS = Registry("model.kind")
OBJECTIVES = Registry("model.objective")
BACKBONES = Registry("model.backbone")
PARTS = {"objective": OBJECTIVES, "backbone": BACKBONES}


def used_entries(model) -> list[Entry]:
    """The entries a ModelConfig uses: its kind, then the parts the kind composes."""
    kind = MODEL_KINDS.get(model.kind)
    return [kind] + [PARTS[part].get(getattr(model, part)) for part in kind.parts]


def section_entry(name: str) -> Entry | None:
    """The entry whose section is model.<name>, in any registry (None if none)."""
    for registry in (MODEL_KINDS, *PARTS.values()):
        entry = registry.entries.get(name)
        if entry is not None and entry.schema is not None:
            return entry
    return None


def samplers(cfg) -> dict:
    """{sampler id: display name} of `cfg`'s model: its objective's where its kind composes
    one, else the kind's own ({} for a kind that takes no sampler options)."""
    kind = MODEL_KINDS.get(cfg.model.kind)
    if "objective" in kind.parts:
        return OBJECTIVES.get(cfg.model.objective).samplers
    return kind.samplers


def all_samplers() -> dict:
    """Every registered sampler id with its display name (the CLIs' --sampler choices)."""
    out = {}
    for registry in (MODEL_KINDS, OBJECTIVES):
        for entry in registry.entries.values():
            out.update(entry.samplers)
    return out


def model_label(cfg) -> str:
    """How tables name the model: its kind's label and its parts' (an entry without a label
    shows its name; an empty label shows nothing)."""
    labels = (e.label(cfg) if e.label else e.name for e in used_entries(cfg.model))
    return ", ".join(label for label in labels if label)
