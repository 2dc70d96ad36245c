"""Every rule on config values, in one place: `validate(cfg)` fails on an impossible value,
before any work, in one line naming the key (tti/config.py names the file or --set item that
set it). Rules that need the data or the model are checked where those are opened.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from tti.aligndraw import PRESETS as ALIGNDRAW_PRESETS
from tti.cli import UserError
from tti.diffusion import PREDICTIONS, SAMPLERS, SCHEDULES

if TYPE_CHECKING:
    from tti.config import Config, DataConfig, DiffusionConfig, SampleConfig, TrainConfig, UNetConfig

PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # train.precision and the CLIs' --precision
MODEL_KINDS = ("diffusion", "aligndraw")
IMAGE_SIZES = (16, 32, 64, 128, 256)
LR_DECAYS = ("constant", "cosine")


class ConfigError(UserError, ValueError):
    """A config key or value is wrong. The message is one line naming the key; `keys` holds
    every key the error is about, so load_config can name the file or --set item behind it."""

    def __init__(self, message: str, keys: tuple = ()):
        super().__init__(message)
        self.keys = tuple(keys)


def _check(ok: bool, key: str, message: str, *related: str) -> None:
    """Fails naming `key` unless `ok`; `related`: the other keys the rule reads."""
    if not ok:
        raise ConfigError(f"{key}: {message}", (key, *related))


def _one_of(value: str, allowed: tuple, key: str) -> None:
    _check(value in allowed, key, f"must be one of {', '.join(allowed)}, got {value!r}")


def _holds(value, rule: str) -> bool:
    """`value` against a rule written as the error says it: '>= 1', '> 0', 'in [0, 1]' or
    'in [0, 1)' (NaN holds none)."""
    op, _, bound = rule.partition(" ")
    if op == ">=":
        return value >= float(bound)
    if op == ">":
        return value > float(bound)
    low, high = (float(b) for b in bound.strip("[]()").split(", "))
    return low <= value and (value <= high if bound.endswith("]") else value < high)


def _bounds(section, prefix: str, rules: dict) -> None:
    """Checks each field of `section` against its rule: {field name: rule (see _holds)}."""
    for name, rule in rules.items():
        value = getattr(section, name)
        _check(_holds(value, rule), f"{prefix}.{name}", f"must be {rule}, got {value}")


def validate(cfg: Config, world_size: int = 1) -> None:
    """Every rule on config values, in one place: an impossible value fails here, before any
    work, naming the key. `world_size`: the processes that share train.batch_size. Rules that
    need the data or the model (training-set size, text.hidden_layer's range, the fields of
    model.aligndraw.overrides) are checked where those are opened."""
    _check_data(cfg.data)
    _check(bool(cfg.text.name), "text.name", "must name an encoder (an HF id, a folder, "
           "packaged-minilm or vocab)")
    _bounds(cfg.text, "text", {"caption_dropout": "in [0, 1)", "max_length": ">= 2", "lr": "> 0"})
    m = cfg.model
    _one_of(m.kind, MODEL_KINDS, "model.kind")
    if m.kind == "diffusion":
        _check_unet(m.unet, cfg.data.image_size)
        _check_diffusion(m.diffusion, cfg.sample)
    else:
        _one_of(m.aligndraw.preset, tuple(ALIGNDRAW_PRESETS), "model.aligndraw.preset")
    _bounds(cfg.sample, "sample", {"guidance": ">= 0", "eta": ">= 0"})
    _check_train(cfg.train, world_size)


def _check_data(d: DataConfig) -> None:
    _check(d.image_size in IMAGE_SIZES, "data.image_size",
           f"must be one of {'/'.join(map(str, IMAGE_SIZES))}, got {d.image_size}")
    _bounds(d, "data", {"max_bad_fraction": "in [0, 1]", "num_workers": ">= 0",
                        "canonical_caption_fraction": "in [0, 1]"})
    _check(d.shapes_train >= 1 and d.shapes_val >= 1, "data.shapes_train",
           f"and data.shapes_val must be >= 1, got {d.shapes_train} and {d.shapes_val}",
           "data.shapes_val")


def _check_unet(u: UNetConfig, image_size: int) -> None:
    _check(len(u.channels) >= 1 and min(u.channels) > 0, "model.unet.channels",
           f"must be a non-empty list of positive integers, got {u.channels}")
    factor = 2 ** (len(u.channels) - 1)
    _check(image_size % factor == 0, "data.image_size",
           f"{image_size} is not divisible by the UNet's downsampling factor {factor} "
           f"(model.unet.channels has {len(u.channels)} levels)", "model.unet.channels")
    _bounds(u, "model.unet", {"num_res_blocks": ">= 1", "dropout": "in [0, 1)", "head_dim": ">= 1",
                              "text_layers": ">= 0"})
    sizes = [image_size // 2 ** i for i in range(len(u.channels))]
    for r in u.attn_resolutions:
        _check(r in sizes, "model.unet.attn_resolutions",
               f"resolution {r} never occurs (levels: {sizes})", "data.image_size",
               "model.unet.channels")
    attn_channels = [c for c, size in zip(u.channels, sizes) if size in u.attn_resolutions]
    _check(all(c % u.head_dim == 0 for c in attn_channels), "model.unet.head_dim",
           f"{u.head_dim} must divide the channels at attention levels {attn_channels}",
           "model.unet.channels", "model.unet.attn_resolutions")
    if u.self_attn_resolutions is not None:
        extra = sorted(set(u.self_attn_resolutions) - set(u.attn_resolutions))
        _check(not extra, "model.unet.self_attn_resolutions",
               f"{extra} not in model.unet.attn_resolutions {u.attn_resolutions} "
               "(self-attention lives inside the attention blocks)", "model.unet.attn_resolutions")
    if u.text_layers:
        _check(u.text_width > 0 and u.text_width % u.head_dim == 0, "model.unet.text_width",
               f"{u.text_width} must be a positive multiple of model.unet.head_dim {u.head_dim}",
               "model.unet.head_dim")
    _one_of(u.position_init, ("random", "sinusoidal"), "model.unet.position_init")


def _check_diffusion(d: DiffusionConfig, s: SampleConfig) -> None:
    _one_of(d.schedule, SCHEDULES, "model.diffusion.schedule")
    _one_of(d.prediction, PREDICTIONS, "model.diffusion.prediction")
    _bounds(d, "model.diffusion", {"timesteps": ">= 2", "shift": "> 0"})
    _check(d.min_snr_gamma is None or d.min_snr_gamma > 0, "model.diffusion.min_snr_gamma",
           f"must be > 0 or null, got {d.min_snr_gamma}")
    _one_of(s.sampler, SAMPLERS, "sample.sampler")
    _check(1 <= s.steps <= d.timesteps, "sample.steps",
           f"must be in [1, model.diffusion.timesteps={d.timesteps}], got {s.steps}",
           "model.diffusion.timesteps")


def _valid_batch_sizes(batch_size: int, multiple: int) -> str:
    """The multiples of `multiple` next to `batch_size`: '28 or 32' (or just '4' below it)."""
    lower = batch_size // multiple * multiple
    return " or ".join(str(b) for b in (lower, lower + multiple) if b > 0)


def _check_train(tr: TrainConfig, world_size: int) -> None:
    _bounds(tr, "train", {"batch_size": "> 0", "grad_accum": ">= 1", "steps": ">= 1", "lr": "> 0",
                          "warmup_steps": ">= 0", "weight_decay": ">= 0", "ema_decay": "in [0, 1)",
                          "log_every": ">= 1", "sample_every": ">= 1", "ckpt_every": ">= 1",
                          "keep_last": ">= 1", "eval_samples": ">= 0", "max_bad_steps": ">= 0",
                          "fid_every": ">= 0"})
    per_step = world_size * tr.grad_accum
    processes = f"{world_size} process{'es' if world_size != 1 else ''}"
    _check(tr.batch_size % per_step == 0, "train.batch_size",
           f"{tr.batch_size} is not divisible by {processes} x {tr.grad_accum} grad_accum: "
           f"use {_valid_batch_sizes(tr.batch_size, per_step)}", "train.grad_accum")
    _one_of(tr.lr_decay, LR_DECAYS, "train.lr_decay")
    _one_of(tr.precision, PRECISIONS, "train.precision")
    _check(tr.grad_clip >= 0, "train.grad_clip",
           f"must be >= 0 (0 disables clipping), got {tr.grad_clip}")
    _check(tr.fid_samples >= 2, "train.fid_samples",
           f"must be >= 2 (FID needs a covariance), got {tr.fid_samples}")
