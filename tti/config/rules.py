"""Every rule on config values: `validate(cfg)` fails on an impossible value, before any work,
in one line naming the key. Plug-ins check their own sections through their registry entry's
`validate`, written with `check`, `one_of` and `bounds` below.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from tti.config.errors import ConfigError
from tti.config.registry import MODEL_KINDS, samplers, used_entries
from tti.config.schema import LATENT_FACTOR
from tti.infra.precision import PRECISIONS

if TYPE_CHECKING:
    from tti.config.schema import Config, DataConfig, TrainConfig

IMAGE_SIZES = (16, 32, 64, 128, 256)
LR_DECAYS = ("constant", "cosine")


def check(ok: bool, key: str, message: str, *related: str) -> None:
    """Fails naming `key` unless `ok`; `related`: the other keys the rule reads."""
    if not ok:
        raise ConfigError(f"{key}: {message}", (key, *related))


def one_of(value: str, allowed: tuple, key: str) -> None:
    check(value in allowed, key, f"must be one of {', '.join(allowed)}, got {value!r}")


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


def bounds(section, prefix: str, rules: dict) -> None:
    """Checks each field of `section` against its rule: {field name: rule (see _holds)}."""
    for name, rule in rules.items():
        value = getattr(section, name)
        check(_holds(value, rule), f"{prefix}.{name}", f"must be {rule}, got {value}")


def validate(cfg: Config, world_size: int = 1) -> None:
    """`world_size`: the processes that share train.batch_size. Rules that need the data or
    the model (training-set size, text.hidden_layer's range, the fields of
    model.aligndraw.overrides) are checked where those are opened."""
    _check_data(cfg.data)
    check(bool(cfg.text.name), "text.name", "must name an encoder (an HF id, a folder, "
          "packaged-minilm or vocab)")
    bounds(cfg.text, "text", {"caption_dropout": "in [0, 1)", "max_length": ">= 2", "lr": "> 0"})
    _check_autoencoder(cfg)
    for entry in used_entries(cfg.model):  # the kind, then its objective and backbone
        if entry.validate is not None:
            entry.validate(cfg)
    if samplers(cfg):  # a kind without samplers (alignDRAW) ignores sample.sampler
        one_of(cfg.sample.sampler, tuple(samplers(cfg)), "sample.sampler")
    bounds(cfg.sample, "sample", {"guidance": ">= 0", "eta": ">= 0"})
    _check_train(cfg.train, world_size)


def _check_data(d: DataConfig) -> None:
    check(d.image_size in IMAGE_SIZES, "data.image_size",
          f"must be one of {'/'.join(map(str, IMAGE_SIZES))}, got {d.image_size}")
    bounds(d, "data", {"max_bad_fraction": "in [0, 1]", "num_workers": ">= 0",
                       "canonical_caption_fraction": "in [0, 1]"})
    check(d.shapes_train >= 1 and d.shapes_val >= 1, "data.shapes_train",
          f"and data.shapes_val must be >= 1, got {d.shapes_train} and {d.shapes_val}",
          "data.shapes_val")


def _check_autoencoder(cfg: Config) -> None:
    """A latent space needs a kind built on a backbone: the backbone is built for the latent
    grid (Config.grid), where a kind of its own (alignDRAW) models RGB pixels itself."""
    if not cfg.model.autoencoder:
        return
    kind = MODEL_KINDS.get(cfg.model.kind)
    check("backbone" in kind.parts, "model.autoencoder",
          f"model.kind {cfg.model.kind} models pixels itself; a latent space needs a kind "
          f"built on a backbone (model.autoencoder \"\" = pixel space)", "model.kind")
    check(cfg.data.image_size % LATENT_FACTOR == 0, "data.image_size",
          f"{cfg.data.image_size} is not divisible by the autoencoder's {LATENT_FACTOR}x",
          "model.autoencoder")


def _valid_batch_sizes(batch_size: int, multiple: int) -> str:
    """The multiples of `multiple` next to `batch_size`: '28 or 32' (or just '4' below it)."""
    lower = batch_size // multiple * multiple
    return " or ".join(str(b) for b in (lower, lower + multiple) if b > 0)


def _check_train(tr: TrainConfig, world_size: int) -> None:
    bounds(tr, "train", {"batch_size": "> 0", "grad_accum": ">= 1", "steps": ">= 1", "lr": "> 0",
                         "warmup_steps": ">= 0", "weight_decay": ">= 0", "ema_decay": "in [0, 1)",
                         "log_every": ">= 1", "sample_every": ">= 1", "ckpt_every": ">= 1",
                         "keep_last": ">= 1", "eval_samples": ">= 0", "max_bad_steps": ">= 0",
                         "fid_every": ">= 0"})
    _check_split(tr, world_size)
    one_of(tr.lr_decay, LR_DECAYS, "train.lr_decay")
    one_of(tr.precision, PRECISIONS, "train.precision")
    check(tr.grad_clip >= 0, "train.grad_clip",
          f"must be >= 0 (0 disables clipping), got {tr.grad_clip}")
    check(tr.fid_samples >= 2, "train.fid_samples",
          f"must be >= 2 (FID needs a covariance), got {tr.fid_samples}")


def _nearest_divisors(n: int, near: int) -> str:
    """The divisors of `n` next to `near`: '8 or 16' (one when `near` is past either end)."""
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    below = [d for d in divisors if d < near][-1:]
    above = [d for d in divisors if d > near][:1]
    return " or ".join(str(d) for d in below + above)


def _check_split(tr: TrainConfig, world_size: int) -> None:
    """train.batch_size (the global batch) splits evenly over the processes and into
    micro-batches: by train.grad_accum when train.micro_batch is null, else by micro_batch
    (a number, or auto: chosen at start), which then sets the accumulation itself."""
    processes = f"{world_size} process{'es' if world_size != 1 else ''}"
    mb = tr.micro_batch
    if mb is None:
        per_step = world_size * tr.grad_accum
        check(tr.batch_size % per_step == 0, "train.batch_size",
              f"{tr.batch_size} is not divisible by {processes} x {tr.grad_accum} grad_accum: "
              f"use {_valid_batch_sizes(tr.batch_size, per_step)}", "train.grad_accum")
        return
    check(mb == "auto" or (isinstance(mb, int) and not isinstance(mb, bool) and mb >= 1),
          "train.micro_batch", f"must be auto, a number of images >= 1, or null, got {mb!r}")
    check(tr.grad_accum == 1, "train.grad_accum",
          f"{tr.grad_accum} and train.micro_batch={mb} both set how the batch splits: leave "
          f"grad_accum at 1 (micro_batch sets the accumulation), or set train.micro_batch=null "
          f"to split by grad_accum", "train.micro_batch")
    check(tr.batch_size % world_size == 0, "train.batch_size",
          f"{tr.batch_size} is not divisible by {processes}: use "
          f"{_valid_batch_sizes(tr.batch_size, world_size)}")
    per_process = tr.batch_size // world_size
    if mb != "auto":
        check(per_process % mb == 0, "train.micro_batch",
              f"{mb} does not divide {per_process}, the images per process per step "
              f"(train.batch_size {tr.batch_size} over {processes}): use "
              f"{_nearest_divisors(per_process, mb)}, or auto", "train.batch_size")
