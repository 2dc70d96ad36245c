"""The one model module that training, sampling, export and evaluation share.

`TextToImage` = a text encoder + a generative model that keeps the two-method interface
(`loss(images, text)`, `sample(text, generator, ...)`). Everything outside this file
talks to captions and uint8/[-1, 1] images only, so the diffusion model and alignDRAW
are interchangeable. `build(cfg)` makes one from a config; `load_for_inference(path)`
rebuilds one from a checkpoint alone (EMA weights by default).
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn

from tti.config import PRECISIONS, Config, ConfigError, UNetConfig, from_dict
from tti.text import TextBatch, TextEncoder
from tti.text_store import TextStore, encoder_identity, is_complete, store_folder


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] in [0, 255] -> float [B, 3, H, W] in [-1, 1]."""
    return images.float().div_(127.5).sub_(1.0)


def amp_dtype(precision: str, device) -> torch.dtype | None:
    """The autocast dtype for `precision` on `device` (None = plain fp32).

    "auto" is bf16 on CUDA and on CPUs with native bf16 instructions (AVX512-BF16 or AMX),
    where it trains faster than fp32 (bench/train_throughput.py); fp32 elsewhere, since
    emulated bf16 is slower than fp32.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    device = torch.device(device)
    if precision == "auto":
        native_cpu_bf16 = (torch.cpu._is_avx512_bf16_supported()
                           or torch.cpu._is_amx_tile_supported())
        fast = device.type == "cuda" or (device.type == "cpu" and native_cpu_bf16)
        precision = "bf16" if fast else "fp32"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def precision_name(amp: torch.dtype | None) -> str:
    """What amp_dtype returned, for logs and tables: "fp32" (None), "bf16 autocast" or
    "fp16 autocast"."""
    return {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}[amp]


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [B, 3, H, W] in [-1, 1] -> uint8 [B, 3, H, W] (values outside are clipped)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class TextToImage(nn.Module):
    """Captions in, loss or images out. `forward` is the training loss (so DDP wraps it)."""

    def __init__(self, text_encoder: nn.Module, generator: nn.Module):
        super().__init__()
        self.text = text_encoder
        self.generator = generator
        self.sample_dtype: torch.dtype | None = None  # autocast dtype for sampling; None = fp32

    def forward(self, images: torch.Tensor, captions: list) -> torch.Tensor:
        """images: float [B, 3, H, W] in [-1, 1]; captions: B strings -> scalar loss."""
        return self.generator.loss(images, self.encode(captions))

    @torch.compiler.disable
    def encode(self, captions: list) -> TextBatch:
        """B captions -> TextBatch. Left out of torch.compile (train.compile), which would
        otherwise guard on every caption's text and recompile for each new batch."""
        return self.text(captions)

    @torch.no_grad()
    def sample(self, captions: list, generator: torch.Generator | None = None,
               return_trajectory: bool = False, **sampler_opts):
        """B captions -> float [B, 3, H, W] in [-1, 1] (and the trajectory if asked).
        The network runs under autocast to `self.sample_dtype` when set; images are fp32."""
        text = self.text(captions)
        null = self.text.null(1)
        device_type = next(self.generator.parameters()).device.type
        with torch.autocast(device_type, dtype=self.sample_dtype or torch.float32,
                            enabled=self.sample_dtype is not None):
            return self.generator.sample(text, generator, null_text=null,
                                         return_trajectory=return_trajectory, **sampler_opts)

    def sampler_options(self, cfg: Config) -> dict:
        s = cfg.sample
        return dict(sampler=s.sampler, steps=s.steps, eta=s.eta, guidance=s.guidance)


# ---------------------------------------------------------------- building


def build_text_encoder(cfg: Config, train_captions=None, vocab_state=None) -> nn.Module:
    """The text side a config asks for. alignDRAW's word vocabulary needs the training
    captions (fresh run) or the vocabulary saved in a checkpoint (`vocab_state`)."""
    t = cfg.text
    if cfg.model.kind == "aligndraw" or t.name == "vocab":
        from tti.vocab import WordVocab, WordVocabEncoder

        if vocab_state is not None:
            vocab = WordVocab.from_dict(vocab_state)
        elif train_captions is not None:
            vocab = WordVocab.build(train_captions)
        else:
            raise ValueError("a word-vocabulary text encoder needs the training captions")
        return WordVocabEncoder(vocab, max_length=t.max_length)
    encoder = TextEncoder(t.name, finetune=t.finetune, max_length=t.max_length, cache=t.cache,
                          hidden_layer=t.hidden_layer)
    if encoder.use_cache:
        # Next to the packed image cache: every run on this dataset reuses the states.
        cache_dir = cfg.data.cache_dir or os.path.join(cfg.data.root, "cache")
        encoder.store_dir = store_folder(cache_dir, encoder_identity(encoder))
        if is_complete(encoder.store_dir):  # e.g. sampling on the machine that trained
            encoder.use_store(TextStore(encoder.store_dir))
    return encoder


def build_unet(u: UNetConfig, image_size: int, context_dim: int) -> nn.Module:
    """The UNet that `model.unet` describes, for RGB images of `image_size` and text tokens of
    width `context_dim`."""
    from tti.unet import UNet

    return UNet(u, image_size, context_dim)


def build_generator(cfg: Config, text_encoder: nn.Module) -> nn.Module:
    m = cfg.model
    if m.kind == "diffusion":
        from tti.diffusion import Diffusion

        unet = build_unet(m.unet, cfg.data.image_size, text_encoder.dim)
        d = m.diffusion
        return Diffusion(unet, schedule=d.schedule, timesteps=d.timesteps,
                         prediction=d.prediction, image_size=cfg.data.image_size,
                         image_channels=3, min_snr_gamma=d.min_snr_gamma, shift=d.shift)
    from tti.aligndraw import AlignDraw

    overrides = m.aligndraw.overrides
    fixed = sorted({"image_size", "vocab_size"} & set(overrides))
    if fixed:
        raise ConfigError(f"model.aligndraw.overrides: {fixed} cannot be set here; they come "
                          f"from data.image_size and the training captions' vocabulary")
    try:
        return AlignDraw.from_preset(m.aligndraw.preset, vocab_size=len(text_encoder.vocab),
                                     image_size=cfg.data.image_size, **overrides)
    except (TypeError, ValueError) as e:  # a bad field or value, named by the model
        raise ConfigError(f"model.aligndraw.overrides: {e}") from None


def build(cfg: Config, train_captions=None, vocab_state=None) -> TextToImage:
    text = build_text_encoder(cfg, train_captions, vocab_state)
    return TextToImage(text, build_generator(cfg, text))


# ---------------------------------------------------------------- checkpoint state


def _checkpoints_text(model: TextToImage) -> bool:
    """Whether checkpoints carry the text encoder: only when some of it is trained (a frozen
    pretrained encoder is rebuilt by `from_pretrained`; it would make each checkpoint 500 MB)."""
    return any(p.requires_grad for p in model.text.parameters())


def trainable_state(model: TextToImage) -> dict:
    """The weights a checkpoint must carry: everything but a frozen pretrained encoder."""
    keep_text = _checkpoints_text(model)
    return {k: v for k, v in model.state_dict().items()
            if keep_text or not k.startswith("text.")}


def load_trainable_state(model: TextToImage, weights: dict) -> None:
    """Load what `trainable_state` saved, strictly: every key it names, with its shape, and
    nothing else. A frozen encoder, which checkpoints leave out, keeps its pretrained weights.
    Raises CheckpointError naming the missing, unexpected and mis-shaped keys."""
    from tti.checkpoint import CheckpointError, mismatched_keys

    problems = mismatched_keys(trainable_state(model), weights)
    if problems:
        raise CheckpointError(f"the checkpoint's weights do not fit the model its config "
                              f"describes: {problems}")
    parts = [("generator", model.generator)]
    if _checkpoints_text(model):
        parts.append(("text", model.text))
    for name, module in parts:
        prefix = name + "."
        module.load_state_dict({k[len(prefix):]: v for k, v in weights.items()
                                if k.startswith(prefix)}, strict=True)


def text_extra_state(model: TextToImage):
    """What rebuilds a vocabulary encoder (None for pretrained encoders)."""
    to_dict = getattr(getattr(model.text, "vocab", None), "to_dict", None)
    return to_dict() if to_dict else None


def load_for_inference(path: str, device="cpu", use_ema: bool = True, precision: str = "fp32"):
    """Checkpoint (file or run dir) -> (TextToImage in eval mode on `device`, Config).
    `precision` (auto | fp32 | bf16 | fp16) sets the autocast dtype used for sampling."""
    from tti.checkpoint import CheckpointError, load_checkpoint

    state = load_checkpoint(path, map_location="cpu")
    cfg = from_dict(state["config"])
    model = build(cfg, vocab_state=state.get("text_vocab"))
    weights = dict(state["model"])
    if use_ema and state.get("ema"):
        weights.update(state["ema"]["shadow"])
    try:
        load_trainable_state(model, weights)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    model.sample_dtype = amp_dtype(precision, device)
    return model.to(device).eval(), cfg
