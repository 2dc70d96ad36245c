"""Reading a `Config` (tti/config/schema.py) from YAML files and `--set a.b=value` overrides.

Unknown keys, wrong types and impossible values (tti/config/rules.py) fail here, before any
work, in one line naming the key and what set it (the YAML file or the `--set` item); the
modules that read a config trust it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import os
import typing
from typing import Any, Optional

import yaml

from tti.config.errors import ConfigError
from tti.config.registry import MODEL_KINDS, PARTS, section_entry
from tti.config.rules import validate
from tti.config.schema import Config, ModelConfig
from tti.infra.atomic_file import atomic_file

# Removed options, with the value that meant "off": older runs' config.yaml and checkpoints
# (which list every field) still load when the option was off.
RETIRED = {"model.unet.text_skip": False, "model.unet.add_full_res_skips": False}
# Renamed sections of model, old -> new: an old config.yaml, checkpoint or --set item loads.
RENAMED_SECTIONS = {"diffusion": "gaussian"}


def _renamed(data: Any) -> Any:
    """`data` with model's RENAMED_SECTIONS under their new names (whose values win)."""
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or not set(model) & set(RENAMED_SECTIONS):
        return data
    model = dict(model)
    for old, new in RENAMED_SECTIONS.items():
        if old in model:
            value = model.pop(old)
            both = isinstance(value, dict) and isinstance(model.get(new), dict)
            model[new] = _merge(value, model[new]) if both else model.get(new, value)
    return {**data, "model": model}


_EXPECTED = {bool: "true/false", int: "an integer", float: "a number", str: "a string"}


def _type_error(key: str, expected: str, value: Any) -> ConfigError:
    return ConfigError(f"{key}: expected {expected}, got {value!r}", (key.split("[")[0],))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert one leaf value against its annotated type; `key` names it in errors."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:  # Optional[X], or a choice: Optional[Union[int, str]]
        options = [a for a in args if a is not type(None)]
        if value is None or len(options) == 1:
            return None if value is None else _coerce(value, options[0], key)
        for option in options:
            with contextlib.suppress(ConfigError):
                return _coerce(value, option, key)
        raise _type_error(key, " or ".join(_EXPECTED[o] for o in options), value)
    if tp in _EXPECTED:
        if tp is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if tp is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        elif tp is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, tp) or (isinstance(value, bool) and tp is not bool):
            raise _type_error(key, _EXPECTED[tp], value)
        return value
    if tp is list or origin is list:
        if not isinstance(value, (list, tuple)):
            raise _type_error(key, "a list", value)
        if not args:
            return list(value)
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise _type_error(key, "a mapping", value)
    return value


def _all_keys(cls=None, prefix: str = "") -> list[str]:
    """Every dotted key of `cls` (default Config), sections included."""
    keys = []
    for name, tp in _fields(cls or Config).items():
        keys.append(prefix + name)
        if dataclasses.is_dataclass(tp):
            keys += _all_keys(tp, f"{prefix}{name}.")
    return keys


def _fields(cls) -> dict:
    """{field name: type} of a config dataclass; a ModelConfig's are its kind, parts and
    autoencoder, and the section of every registered plug-in."""
    if cls is not ModelConfig:
        return typing.get_type_hints(cls)
    if not MODEL_KINDS.entries:
        raise RuntimeError("no model plug-ins are registered: import tti.models before reading a "
                           "config (it registers the kinds, objectives and backbones)")
    names = {"kind": str, **{part: str for part in PARTS}, "autoencoder": str}
    for registry in (MODEL_KINDS, *PARTS.values()):
        names.update({e.name: e.schema for e in registry.entries.values() if e.schema})
    return names


def _unknown_key(key: str, value: Any, cls) -> None:
    """Passes a retired key left off; any other key `cls` lacks is an error with a suggestion."""
    if key in RETIRED:
        if value == RETIRED[key]:
            return
        raise ConfigError(f"{key}: this option was removed from tti (commit 65003ea still has it)",
                          (key,))
    section = key.rpartition(".")[0]
    close = difflib.get_close_matches(key, _all_keys(), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    where = f"in {section}" if section else "at the top level"
    names = ", ".join(sorted(_fields(cls)))
    raise ConfigError(f"unknown config key {key!r} ({hint}valid keys {where}: {names})", (key,))


def _build(cls, data: Any, prefix: str = ""):
    """A `cls` instance from a partial nested dict; the fields it leaves out keep their defaults."""
    if not isinstance(data, dict):
        raise _type_error(prefix.rstrip(".") or "config", "a mapping", data)
    hints = _fields(cls)
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in hints:
            _unknown_key(key, value, cls)
        elif dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _build(hints[name], value, key + ".")
        else:
            kwargs[name] = _coerce(value, hints[name], key)
    if cls is ModelConfig:  # plug-in sections go to `sections`; the kind's fills the rest
        kwargs["sections"] = {n: kwargs.pop(n) for n in list(kwargs) if section_entry(n)}
    return cls(**kwargs)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def flatten(data: dict, prefix: str = "") -> dict:
    """{dotted key: value} of the leaves of a nested dict: {'train.lr': 0.001, ...} (a
    mapping-valued option such as model.aligndraw.overrides contributes its items)."""
    out = {}
    for name, value in data.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = value
    return out


def _source_of(keys: tuple, sources: list) -> Optional[str]:
    """The last of `sources` ((dotted key, label), in the order applied) that set one of `keys`
    or a section above or below it."""
    for set_key, label in reversed(sources):
        for key in keys:
            if set_key == key or set_key.startswith(key + ".") or key.startswith(set_key + "."):
                return label
    return None


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error in one line (PyYAML's own text spans several)."""
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"{getattr(e, 'problem', None) or type(e).__name__}{where}"


def parse_override(text: str) -> dict:
    """'train.lr=1e-3' -> {'train': {'lr': '1e-3'}}. The value is read as YAML (numbers,
    true/false, null, [lists], {mappings}); the field's type converts it."""
    key, sep, raw = text.partition("=")
    parts = [p.strip() for p in key.split(".")]
    if not sep or not all(parts):
        raise ConfigError(f"--set {text}: expected key=value with a dotted key, "
                          "e.g. --set train.lr=3e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {text}: the value is not valid YAML "
                          f"({_yaml_problem(e)})") from None
    for part in reversed(parts):
        value = {part: value}
    return value


def _read_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read it: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {_yaml_problem(e)}") from None
    if not isinstance(data, (dict, type(None))):
        raise ConfigError(f"{path}: expected a mapping of sections (run, data, ...) "
                          "at the top level")
    return data or {}


def from_dict(data: Optional[dict]) -> Config:
    """A validated Config from a nested dict (a YAML file's content, or Config.to_dict())."""
    cfg = _build(Config, _renamed(data or {}))
    validate(cfg)
    return cfg


def load_config(path: Optional[str] = None, overrides: Optional[list] = None) -> Config:
    """Defaults <- YAML file <- `key=value` overrides (in order), then validation. An error
    names the file or the `--set` item that set the key it is about."""
    data = _renamed(_read_yaml(path)) if path else {}
    sources = [(key, path) for key in flatten(data)]
    for item in overrides or []:
        extra = _renamed(parse_override(item))
        data = _merge(data, extra)
        sources += [(key, f"--set {item}") for key in flatten(extra)]
    try:
        cfg = from_dict(data)
    except ConfigError as e:
        label = _source_of(e.keys, sources) or path
        raise (ConfigError(f"{label}: {e}", e.keys) if label else e) from None
    _check_sets_are_read(cfg, sources)
    return cfg


def _check_sets_are_read(cfg: Config, sources: list) -> None:
    """ConfigError for a --set item on a plug-in section this model does not read (model.gaussian.*
    with objective flow), which would be dropped without a word. The YAML file's unused
    sections are dropped quietly, so one --set item can switch the objective or backbone."""
    for key, label in sources:
        parts = key.split(".")
        if not label.startswith("--set ") or parts[0] != "model" or len(parts) < 2:
            continue
        name = parts[1]
        if section_entry(name) is None or name in cfg.model.sections:
            continue
        choose = next((f"model.{part}={name}" for part, registry in PARTS.items()
                       if name in registry), f"model.kind={name}")
        reads = ", ".join(f"model.{n}" for n in cfg.model.sections)
        raise ConfigError(f"{label}: this model does not read model.{name} (it reads {reads}); "
                          f"set {choose} first to use it", (key,))


def save_config(cfg: Config, path: str, source: Optional[str] = None,
                overrides: Optional[list] = None) -> None:
    """Write `cfg` as YAML, atomically. With `source` (the YAML file) a comment header names it
    and every `--set` item applied: the run folder is named by run.dataset, which an override
    of, say, text.name leaves as the file said."""
    with atomic_file(path) as f:
        if source is not None and overrides:
            f.write(f"# From {source}, then these --set overrides (the run folder's name comes "
                    f"from run.dataset,\n# which they may have left as the file said):\n")
            f.writelines(f"#   --set {item}\n" for item in overrides)
        elif source is not None:
            f.write(f"# From {source}, with no --set overrides.\n")
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
