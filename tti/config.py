"""Typed configs: dataclasses with defaults, YAML files, `--set a.b=value` overrides.

Every run is described by one `Config`. YAML files under configs/ set a subset of the
fields; `--set train.lr=1e-3` overrides any field from the command line. Unknown keys,
wrong types and impossible values fail here, before any work, in one line that names the
key and what set it (the YAML file or the `--set` item). `validate` (tti/config_rules.py)
holds every rule on config values; the modules that read a config trust it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from tti.atomic_file import atomic_file
from tti.config_rules import PRECISIONS, ConfigError, validate  # noqa: F401  (tti.config's names too)


@dataclass
class RunConfig:
    dataset: str = "shapes"          # names the run folder: results/<dataset>_<model>/<run_idx>
    run_idx: int = 0
    results_dir: str = "results"


@dataclass
class DataConfig:
    root: str = "data/shapes"        # a COCO 2014 layout: annotations/, train2014/, val2014/
    train_split: str = "train2014"
    val_split: str = "val2014"
    image_size: int = 32
    cache_dir: Optional[str] = None  # packed uint8 cache and text store; default <root>/cache
    num_workers: int = 2             # DataLoader workers (and prepare's worker processes)
    max_bad_fraction: float = 0.01   # prepare fails if more images than this are unreadable
    generate_shapes: bool = False    # build the embedded dataset into root if it is missing
    shapes_train: int = 20000
    shapes_val: int = 1000
    # Share of training captions replaced by their canonical phrasing (shapes only; the
    # left/top object named first, tti/data/canonical.py); 0 = the captions as written.
    canonical_caption_fraction: float = 0.0


@dataclass
class TextConfig:
    name: str = "packaged-minilm"    # HF id ("roberta-base"), a folder, "packaged-minilm", or "vocab"
    finetune: bool = False
    lr: float = 1e-5                 # encoder learning rate when fine-tuned
    max_length: int = 32
    hidden_layer: int = -1           # encoder hidden state the UNet reads: -1 = last, k = layer k
    cache: bool = True               # frozen encoder: states from the text store
    caption_dropout: float = 0.1     # share of captions replaced by "" (classifier-free guidance)


@dataclass
class UNetConfig:
    channels: list[int] = field(default_factory=lambda: [32, 64, 96])
    num_res_blocks: int = 1
    attn_resolutions: list[int] = field(default_factory=lambda: [16, 8])
    self_attn_resolutions: Optional[list[int]] = None  # subset of attn_resolutions; None = all
    position_embedding: bool = False  # learned per-pixel embedding in each attention block
    position_init: str = "random"    # random (N(0, 0.02)) | sinusoidal (2-D sin/cos, amplitude 1)
    coord_channels: bool = False     # (x, y) of each pixel as 2 extra input channels (CoordConv)
    text_layers: int = 0             # trainable transformer layers over the text tokens
    text_width: int = 128            # their width (the encoder's tokens are projected to it)
    narrow_upsample: bool = False    # each upsample maps to the width of the level it enters
    head_dim: int = 32
    dropout: float = 0.0
    pooled_text: bool = True


@dataclass
class DiffusionConfig:
    schedule: str = "cosine"         # linear | cosine
    timesteps: int = 1000
    prediction: str = "v"            # eps | v | x0
    min_snr_gamma: Optional[float] = None
    shift: float = 1.0               # > 1: more noise at every t (log-SNR - 2 log shift)


@dataclass
class AlignDrawConfig:
    preset: str = "shapes"           # shapes | coco (paper sizes); fields below override it
    overrides: dict = field(default_factory=dict)


@dataclass
class ModelConfig:
    kind: str = "diffusion"          # diffusion | aligndraw
    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    aligndraw: AlignDrawConfig = field(default_factory=AlignDrawConfig)


@dataclass
class TrainConfig:
    batch_size: int = 64             # global batch (all ranks, one optimizer step)
    grad_accum: int = 1              # micro-batches per optimizer step
    steps: int = 1500
    lr: float = 1e-3
    warmup_steps: int = 100
    lr_decay: str = "constant"       # constant | cosine (to 10% of lr after warm-up)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.995
    precision: str = "auto"          # auto (bf16 on CUDA and bf16-capable CPUs, else fp32) | fp32 | bf16 | fp16
    seed: int = 0
    deterministic: bool = False      # torch deterministic algorithms (exact resume on CPU)
    log_every: int = 25
    sample_every: int = 500          # in-loop sample grid (and judge accuracy, see eval_samples)
    sample_at_end: bool = True       # the last step too (quickstart.sh: off, it samples and judges next)
    eval_samples: int = 0            # val captions judged in-loop (embedded shapes dataset only)
    fid_every: int = 0               # FID of the EMA weights on a fixed val subset every N steps; 0 = off
    fid_samples: int = 2000          # val images (one caption and seed each) that FID generates
    ckpt_every: int = 500
    keep_last: int = 3               # step-numbered checkpoints kept (plus latest)
    max_bad_steps: int = 0           # non-finite losses tolerated (skipped) before stopping
    compile: bool = False


@dataclass
class SampleConfig:
    sampler: str = "dpmpp2m"         # dpmpp2m (tti/samplers.py) | ddim | ddpm
    steps: int = 20
    eta: float = 0.0
    guidance: float = 2.0
    captions: list[str] = field(default_factory=list)   # fixed captions for in-loop grids


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    text: TextConfig = field(default_factory=TextConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def run_dir(self) -> str:
        return os.path.join(self.run.results_dir, f"{self.run.dataset}_{self.model.kind}",
                            str(self.run.run_idx))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- building from dicts

# Removed options, with the value that meant "off": the config.yaml and checkpoints of older
# runs (which list every field) still load when the option was off.
RETIRED = {"model.unet.text_skip": False, "model.unet.add_full_res_skips": False}


_EXPECTED = {bool: "true/false", int: "an integer", float: "a number", str: "a string"}


def _type_error(key: str, expected: str, value: Any) -> ConfigError:
    return ConfigError(f"{key}: expected {expected}, got {value!r}", (key.split("[")[0],))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert one leaf value against its annotated type; `key` names it in errors."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        return None if value is None else _coerce(value, args[0], key)
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
    for name, tp in typing.get_type_hints(cls or Config).items():
        keys.append(prefix + name)
        if dataclasses.is_dataclass(tp):
            keys += _all_keys(tp, f"{prefix}{name}.")
    return keys


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
    names = ", ".join(sorted(f.name for f in dataclasses.fields(cls)))
    raise ConfigError(f"unknown config key {key!r} ({hint}valid keys {where}: {names})", (key,))


def _build(cls, data: Any, prefix: str = ""):
    """A `cls` instance from a partial nested dict; the fields it leaves out keep their defaults."""
    if not isinstance(data, dict):
        key = prefix.rstrip(".") or "config"
        raise _type_error(key, "a mapping", data)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in hints:
            _unknown_key(key, value, cls)
        elif dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _build(hints[name], value, key + ".")
        else:
            kwargs[name] = _coerce(value, hints[name], key)
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
    true/false, null, [lists], {mappings}); the field's type converts it when the Config is
    built."""
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
    cfg = _build(Config, data or {})
    validate(cfg)
    return cfg


def load_config(path: Optional[str] = None, overrides: Optional[list] = None) -> Config:
    """Defaults <- YAML file <- `key=value` overrides (in order), then validation. An error
    names the file or the `--set` item that set the key it is about."""
    data = _read_yaml(path) if path else {}
    sources = [(key, path) for key in flatten(data)]
    for item in overrides or []:
        extra = parse_override(item)
        data = _merge(data, extra)
        sources += [(key, f"--set {item}") for key in flatten(extra)]
    try:
        return from_dict(data)
    except ConfigError as e:
        label = _source_of(e.keys, sources) or path
        raise (ConfigError(f"{label}: {e}", e.keys) if label else e) from None


def save_config(cfg: Config, path: str, source: Optional[str] = None,
                overrides: Optional[list] = None) -> None:
    """Write `cfg` as YAML, atomically (a kill leaves the old file or the new one). With
    `source` (the YAML file) a comment header names it and every `--set` item applied: a
    run's folder is named by run.dataset, which an override of, say, text.name leaves as the
    file said."""
    with atomic_file(path) as f:
        if source is not None and overrides:
            f.write(f"# From {source}, then these --set overrides (the run folder's name comes "
                    f"from run.dataset,\n# which they may have left as the file said):\n")
            f.writelines(f"#   --set {item}\n" for item in overrides)
        elif source is not None:
            f.write(f"# From {source}, with no --set overrides.\n")
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
