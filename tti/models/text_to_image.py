"""The one model module that training, sampling, export and evaluation share.

`TextToImage` = a text encoder + an image model of a registered kind (`loss(images, text)`,
`sample(text, generator, ...)`) + with model.autoencoder a frozen VAE whose latents the image
model learns (autoencoder.py). Everything outside this file sees captions and uint8/[-1, 1]
images only, so every model kind, in pixels or in a latent space, is interchangeable.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn

import tti.models  # noqa: F401  (registers every plug-in)
from tti.config.load import from_dict
from tti.config.registry import MODEL_KINDS
from tti.config.schema import Config
from tti.infra.checkpoints import CheckpointError, mismatched_keys
from tti.infra.precision import amp_dtype
from tti.infra.release_folder import load_inference_state
from tti.models.autoencoder import FrozenAutoencoder, load_autoencoder
from tti.text.batch import TextBatch
from tti.text.encoder import TextEncoder
from tti.text.store import TextStore, encoder_identity, is_built, store_folder
from tti.text.vocab import WordVocab, WordVocabEncoder


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] in [0, 255] -> float [B, 3, H, W] in [-1, 1]."""
    return images.float().div_(127.5).sub_(1.0)


def model_input(batch: torch.Tensor) -> torch.Tensor:
    """What the training loop hands the model: uint8 images [B, 3, H, W] -> float in [-1, 1];
    a latent store's moments (float16 [B, 2C, h, w], tti/data/latent_store.py) -> float32."""
    return to_model_range(batch) if batch.dtype == torch.uint8 else batch.float()


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [B, 3, H, W] in [-1, 1] -> uint8 [B, 3, H, W] (values outside are clipped)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class TextToImage(nn.Module):
    """Captions in, loss or images out. `forward` is the training loss (so DDP wraps it).
    autoencoder: None (the image model learns pixels) or a FrozenAutoencoder."""

    def __init__(self, text_encoder: nn.Module, image_model: nn.Module,
                 autoencoder: FrozenAutoencoder | None = None):
        super().__init__()
        self.text = text_encoder
        self.image_model = image_model
        self.autoencoder = autoencoder
        self.sample_dtype: torch.dtype | None = None  # autocast dtype for sampling; None = fp32

    def forward(self, images: torch.Tensor, captions: list) -> torch.Tensor:
        """images: float [B, 3, H, W] in [-1, 1] (with an autoencoder, or its moments from a
        latent store: FrozenAutoencoder.training_latents); captions: B strings -> scalar loss."""
        if self.autoencoder is not None:
            images = self.autoencoder.training_latents(images)
        return self.image_model.loss(images, self.encode(captions))

    @torch.compiler.disable
    def encode(self, captions: list) -> TextBatch:
        """B captions -> TextBatch. Left out of torch.compile (train.compile), which would
        otherwise guard on every caption's text and recompile for each new batch."""
        return self.text(captions)

    @torch.no_grad()
    def sample(self, captions: list, generator: torch.Generator | None = None,
               return_trajectory: bool = False, **sampler_opts):
        """B captions -> float [B, 3, H, W] in [-1, 1] (and the trajectory if asked).
        The network runs under autocast to `self.sample_dtype` when set; images are fp32.
        With an autoencoder the latents (and each trajectory frame) are decoded to RGB."""
        text = self.text(captions)
        null = self.text.null(1)
        device_type = next(self.image_model.parameters()).device.type
        with torch.autocast(device_type, dtype=self.sample_dtype or torch.float32,
                            enabled=self.sample_dtype is not None):
            out = self.image_model.sample(text, generator, null_text=null,
                                          return_trajectory=return_trajectory, **sampler_opts)
            if self.autoencoder is None:
                return out
            if not return_trajectory:
                return self.autoencoder.decode(out)
            latents, frames = out
            return self.autoencoder.decode(latents), [self.autoencoder.decode(f) for f in frames]

    def sampler_options(self, cfg: Config) -> dict:
        s = cfg.sample
        return dict(sampler=s.sampler, steps=s.steps, eta=s.eta, guidance=s.guidance)


def build_text_encoder(cfg: Config, train_captions=None, vocab_state=None) -> nn.Module:
    """The text side a config asks for. A word vocabulary (text.name vocab, or a model kind
    that reads word ids) needs the training captions (fresh run) or the vocabulary saved in
    a checkpoint (`vocab_state`)."""
    t = cfg.text
    if MODEL_KINDS.get(cfg.model.kind).text == "vocab" or t.name == "vocab":
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
        if is_built(encoder.store_dir):  # e.g. sampling on the machine that trained
            encoder.use_store(TextStore(encoder.store_dir))
    return encoder


def build(cfg: Config, train_captions=None, vocab_state=None) -> TextToImage:
    """The TextToImage `cfg` describes (train_captions, vocab_state: see build_text_encoder)."""
    text = build_text_encoder(cfg, train_captions, vocab_state)
    autoencoder = load_autoencoder(cfg.model.autoencoder) if cfg.model.autoencoder else None
    return TextToImage(text, MODEL_KINDS.get(cfg.model.kind).build(cfg, text), autoencoder)


# Weight names that earlier versions wrote, old prefix -> new, first match wins: checkpoints
# from before the plug-in core (the image model was `generator`, its network `unet`).
RENAMED_WEIGHTS = (("generator.unet.", "image_model.backbone."), ("generator.", "image_model."))


def current_names(weights: dict) -> dict:
    """`weights` (name -> tensor, as a checkpoint holds them) under today's names."""
    def rename(name: str) -> str:
        for old, new in RENAMED_WEIGHTS:
            if name.startswith(old):
                return new + name[len(old):]
        return name
    return {rename(k): v for k, v in weights.items()}


def _checkpoints_text(model: TextToImage) -> bool:
    """Whether checkpoints carry the text encoder: only when some of it is trained (a frozen
    pretrained encoder is rebuilt by `from_pretrained`; it would make each checkpoint 500 MB)."""
    return any(p.requires_grad for p in model.text.parameters())


def trainable_state(model: TextToImage) -> dict:
    """The weights a checkpoint must carry: everything but a frozen pretrained encoder and
    the frozen autoencoder (both reloaded by name)."""
    keep_text = _checkpoints_text(model)
    return {k: v for k, v in model.state_dict().items()
            if (keep_text or not k.startswith("text.")) and not k.startswith("autoencoder.")}


def load_trainable_state(model: TextToImage, weights: dict) -> None:
    """Load what `trainable_state` saved (or under RENAMED_WEIGHTS' old names), strictly: every
    key it names, with its shape, and nothing else; a frozen encoder keeps its pretrained
    weights. Raises CheckpointError naming the missing, unexpected and mis-shaped keys."""
    weights = current_names(weights)
    problems = mismatched_keys(trainable_state(model), weights)
    if problems:
        raise CheckpointError(f"the checkpoint's weights do not fit the model its config "
                              f"describes: {problems}")
    for name in ["image_model"] + (["text"] if _checkpoints_text(model) else []):
        prefix = name + "."
        getattr(model, name).load_state_dict({k[len(prefix):]: v for k, v in weights.items()
                                              if k.startswith(prefix)}, strict=True)


def text_extra_state(model: TextToImage):
    """What rebuilds a vocabulary encoder (None for pretrained encoders)."""
    to_dict = getattr(getattr(model.text, "vocab", None), "to_dict", None)
    return to_dict() if to_dict else None


def model_from_state(state: dict, path: str, device="cpu", use_ema: bool = True,
                     precision: str = "fp32"):
    """`state` (load_inference_state(path)) -> (TextToImage in eval mode on `device`, Config),
    with the EMA's weights in place of the model's unless `use_ema` is False."""
    if not use_ema and state.get("release", {}).get("weights") == "ema":
        raise CheckpointError(f"{path} is a release: it holds the EMA weights only (sample it "
                              f"without --no-ema, or sample the run's checkpoint)")
    cfg = from_dict(state["config"])
    model = build(cfg, vocab_state=state.get("text_vocab"))
    weights = current_names(state["model"])
    if use_ema and state.get("ema"):
        weights.update(current_names(state["ema"]["shadow"]))
    try:
        load_trainable_state(model, weights)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    model.sample_dtype = amp_dtype(precision, device)
    return model.to(device).eval(), cfg


def load_for_inference(path: str, device="cpu", use_ema: bool = True, precision: str = "fp32"):
    """Checkpoint (file or run dir) or release folder -> (TextToImage in eval mode on `device`,
    Config). Weights only: nothing in the file runs. `precision` (auto | fp32 | bf16 | fp16)
    sets the autocast dtype used for sampling."""
    return model_from_state(load_inference_state(path), path, device, use_ema, precision)
