"""Typed configs: dataclasses with defaults, YAML files, `--set a.b=value` overrides.

Every run is described by one `Config`. YAML files under configs/ set a subset of the
fields; `--set train.lr=1e-3` overrides any field from the command line. Unknown keys,
wrong types and impossible values fail here, before any work, naming the key.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the key."""


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
    cache_dir: Optional[str] = None  # packed uint8 cache; default <root>/cache
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
    cache: bool = True               # frozen encoder: encode each caption once
    caption_dropout: float = 0.1     # share of captions replaced by "" (classifier-free guidance)


PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # train.precision and the CLIs' --precision


@dataclass
class UNetConfig:
    channels: list = field(default_factory=lambda: [32, 64, 96])
    num_res_blocks: int = 1
    attn_resolutions: list = field(default_factory=lambda: [16, 8])
    self_attn_resolutions: Optional[list] = None  # subset of attn_resolutions; None = all
    position_embedding: bool = False  # learned per-pixel embedding in each attention block
    position_init: str = "random"    # random (N(0, 0.02)) | sinusoidal (2-D sin/cos, amplitude 1)
    coord_channels: bool = False     # (x, y) of each pixel as 2 extra input channels (CoordConv)
    text_layers: int = 0             # trainable transformer layers over the text tokens
    text_width: int = 128            # their width (the encoder's tokens are projected to it)
    text_skip: bool = False          # cross-attention also reads the encoder's own tokens
    add_full_res_skips: bool = False  # full-res level: add the skips, don't concatenate (faster)
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
    eval_samples: int = 0            # val captions judged in-loop (embedded shapes dataset only)
    ckpt_every: int = 500
    keep_last: int = 3               # step-numbered checkpoints kept (plus latest)
    max_bad_steps: int = 0           # non-finite losses tolerated (skipped) before stopping
    compile: bool = False


@dataclass
class SampleConfig:
    sampler: str = "ddim"            # ddim | ddpm
    steps: int = 50
    eta: float = 0.0
    guidance: float = 2.0
    captions: list = field(default_factory=list)   # fixed captions for in-loop grids


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


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert one leaf value against its annotated type; `key` names it in errors."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _coerce(value, args[0], key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-3 as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if tp is list or origin is list:
        if isinstance(value, (list, tuple)):
            return list(value)
        raise ConfigError(f"{key}: expected a list, got {value!r}")
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ConfigError(f"{key}: expected a mapping, got {value!r}")
    return value


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = prefix or "top level"
        raise ConfigError(f"unknown config key {prefix + unknown[0]!r} "
                          f"(valid keys at {where}: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, prefix + name)
    return cls(**kwargs)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str) -> dict:
    """'train.lr=1e-3' -> {'train': {'lr': 0.001}} (the value is parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    nested: dict = {}
    cur = nested
    parts = key.strip().split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return nested


def from_dict(data: dict) -> Config:
    cfg = _build(Config, data or {}, "")
    validate(cfg)
    return cfg


def load_config(path: Optional[str] = None, overrides: Optional[list] = None) -> Config:
    """Defaults <- YAML file <- `key=value` overrides, then validation."""
    data: dict = {}
    if path:
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        with open(path) as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{path}: invalid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    for item in overrides or []:
        data = _merge(data, parse_override(item))
    try:
        return from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{path + ': ' if path else ''}{e}") from None


def save_config(cfg: Config, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)


# ---------------------------------------------------------------- validation


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def validate(cfg: Config, world_size: int = 1) -> None:
    """Impossible values fail before any work, naming the key."""
    d, t, m, tr, s = cfg.data, cfg.text, cfg.model, cfg.train, cfg.sample
    _check(d.image_size in (16, 32, 64, 128, 256), "data.image_size",
           f"must be one of 16/32/64/128/256, got {d.image_size}")
    _check(0 <= d.max_bad_fraction <= 1, "data.max_bad_fraction", "must be in [0, 1]")
    _check(d.num_workers >= 0, "data.num_workers", "must be >= 0")
    _check(0 <= d.canonical_caption_fraction <= 1, "data.canonical_caption_fraction",
           f"must be in [0, 1], got {d.canonical_caption_fraction}")
    _check(0 <= t.caption_dropout < 1, "text.caption_dropout", "must be in [0, 1)")
    _check(t.max_length >= 2, "text.max_length", "must be >= 2")
    _check(t.lr > 0, "text.lr", "must be > 0")
    _check(m.kind in ("diffusion", "aligndraw"), "model.kind",
           f"must be 'diffusion' or 'aligndraw', got {m.kind!r}")
    if m.kind == "diffusion":
        u = m.unet
        _check(len(u.channels) >= 1 and all(isinstance(c, int) and c > 0 for c in u.channels),
               "model.unet.channels", f"must be positive integers, got {u.channels}")
        factor = 2 ** (len(u.channels) - 1)
        _check(d.image_size % factor == 0, "data.image_size",
               f"{d.image_size} is not divisible by the UNet's downsampling factor {factor} "
               f"(model.unet.channels has {len(u.channels)} levels)")
        levels = {d.image_size // 2 ** i for i in range(len(u.channels))}
        for r in u.attn_resolutions:
            _check(r in levels, "model.unet.attn_resolutions",
                   f"resolution {r} never occurs (levels: {sorted(levels, reverse=True)})")
        if u.self_attn_resolutions is not None:
            extra = sorted(set(u.self_attn_resolutions) - set(u.attn_resolutions))
            _check(not extra, "model.unet.self_attn_resolutions",
                   f"{extra} not in model.unet.attn_resolutions {u.attn_resolutions} "
                   "(self-attention lives inside the attention blocks)")
        _check(u.text_layers >= 0, "model.unet.text_layers", f"must be >= 0, got {u.text_layers}")
        if u.text_layers:
            _check(u.text_width > 0 and u.text_width % u.head_dim == 0, "model.unet.text_width",
                   f"{u.text_width} must be a positive multiple of model.unet.head_dim {u.head_dim}")
        _check(u.position_init in ("random", "sinusoidal"), "model.unet.position_init",
               f"must be 'random' or 'sinusoidal', got {u.position_init!r}")
        _check(not u.text_skip or u.text_layers > 0, "model.unet.text_skip",
               "needs model.unet.text_layers > 0 (with no text layers the UNet reads the "
               "encoder's tokens anyway)")
        attn_channels = [c for i, c in enumerate(u.channels)
                         if d.image_size // 2 ** i in u.attn_resolutions]
        _check(u.head_dim > 0 and all(c % u.head_dim == 0 for c in attn_channels),
               "model.unet.head_dim",
               f"{u.head_dim} must divide the channels at attention levels {attn_channels}")
        _check(m.diffusion.schedule in ("linear", "cosine"), "model.diffusion.schedule",
               f"must be 'linear' or 'cosine', got {m.diffusion.schedule!r}")
        _check(m.diffusion.prediction in ("eps", "v", "x0"), "model.diffusion.prediction",
               f"must be eps, v or x0, got {m.diffusion.prediction!r}")
        _check(m.diffusion.timesteps >= 2, "model.diffusion.timesteps", "must be >= 2")
        _check(m.diffusion.shift > 0, "model.diffusion.shift", f"must be > 0, got {m.diffusion.shift}")
        _check(s.sampler in ("ddim", "ddpm"), "sample.sampler",
               f"must be 'ddim' or 'ddpm', got {s.sampler!r}")
        _check(1 <= s.steps <= m.diffusion.timesteps, "sample.steps",
               f"must be in [1, model.diffusion.timesteps={m.diffusion.timesteps}]")
    else:
        _check(m.aligndraw.preset in ("shapes", "coco"), "model.aligndraw.preset",
               f"must be 'shapes' or 'coco', got {m.aligndraw.preset!r}")
    _check(s.guidance >= 0, "sample.guidance", f"must be >= 0, got {s.guidance}")
    _check(s.eta >= 0, "sample.eta", "must be >= 0")
    _check(tr.batch_size > 0, "train.batch_size", "must be > 0")
    _check(tr.grad_accum >= 1, "train.grad_accum", "must be >= 1")
    _check(tr.batch_size % (world_size * tr.grad_accum) == 0, "train.batch_size",
           f"{tr.batch_size} is not divisible by world size {world_size} x grad_accum "
           f"{tr.grad_accum}")
    _check(tr.steps >= 1, "train.steps", "must be >= 1")
    _check(tr.lr > 0, "train.lr", "must be > 0")
    _check(tr.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
    _check(tr.lr_decay in ("constant", "cosine"), "train.lr_decay",
           f"must be 'constant' or 'cosine', got {tr.lr_decay!r}")
    _check(0 <= tr.ema_decay < 1, "train.ema_decay", "must be in [0, 1)")
    _check(tr.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 disables clipping)")
    _check(tr.precision in PRECISIONS, "train.precision",
           f"must be one of {', '.join(PRECISIONS)}, got {tr.precision!r}")
    for k in ("log_every", "sample_every", "ckpt_every", "keep_last"):
        _check(getattr(tr, k) >= 1, f"train.{k}", "must be >= 1")
    _check(tr.eval_samples >= 0, "train.eval_samples", "must be >= 0")
    _check(tr.max_bad_steps >= 0, "train.max_bad_steps", "must be >= 0")
