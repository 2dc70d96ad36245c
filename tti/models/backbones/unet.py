"""The UNet backbone: a denoiser conditioned on a timestep and on text token embeddings.

Residual blocks (GroupNorm, SiLU, timestep scale-shift) at every level and, at
`attn_resolutions`, a transformer block (self-attention, cross-attention to the text tokens,
feed-forward). Padding tokens never change the output. A masked mean of the text tokens is
added to the time embedding (cheap global conditioning).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from tti.config.registry import Entry
from tti.config.rules import bounds, check, one_of
from tti.models.backbones.layers import (TextAdapter, attention, group_count, text_masks,
                                         timestep_embedding, zero_init)
from tti.models.backbones.positions import CoordinateChannels, position_embedding
from tti.text.batch import TextBatch


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


def validate(cfg) -> None:
    u, image_size = cfg.model.unet, cfg.grid().size  # pixels, or a latent space's grid
    check(len(u.channels) >= 1 and min(u.channels) > 0, "model.unet.channels",
          f"must be a non-empty list of positive integers, got {u.channels}")
    factor = 2 ** (len(u.channels) - 1)
    check(image_size % factor == 0, "data.image_size",
          f"{image_size} is not divisible by the UNet's downsampling factor {factor} "
          f"(model.unet.channels has {len(u.channels)} levels)", "model.unet.channels")
    bounds(u, "model.unet", {"num_res_blocks": ">= 1", "dropout": "in [0, 1)", "head_dim": ">= 1",
                             "text_layers": ">= 0"})
    sizes = [image_size // 2 ** i for i in range(len(u.channels))]
    for r in u.attn_resolutions:
        check(r in sizes, "model.unet.attn_resolutions",
              f"resolution {r} never occurs (levels: {sizes})", "data.image_size",
              "model.unet.channels")
    attn_channels = [c for c, size in zip(u.channels, sizes) if size in u.attn_resolutions]
    check(all(c % u.head_dim == 0 for c in attn_channels), "model.unet.head_dim",
          f"{u.head_dim} must divide the channels at attention levels {attn_channels}",
          "model.unet.channels", "model.unet.attn_resolutions")
    if u.self_attn_resolutions is not None:
        extra = sorted(set(u.self_attn_resolutions) - set(u.attn_resolutions))
        check(not extra, "model.unet.self_attn_resolutions",
              f"{extra} not in model.unet.attn_resolutions {u.attn_resolutions} "
              "(self-attention lives inside the attention blocks)", "model.unet.attn_resolutions")
    if u.text_layers:
        check(u.text_width > 0 and u.text_width % u.head_dim == 0, "model.unet.text_width",
              f"{u.text_width} must be a positive multiple of model.unet.head_dim {u.head_dim}",
              "model.unet.head_dim")
    one_of(u.position_init, ("random", "sinusoidal"), "model.unet.position_init")


def build(cfg, image_channels: int, context_dim: int) -> "UNet":
    return UNet(cfg.model.unet, cfg.grid().size, context_dim, image_channels)


def label(cfg) -> str:
    return "UNet " + "/".join(map(str, cfg.model.unet.channels))


ENTRY = Entry("unet", build, UNetConfig, validate, label=label)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the time embedding as a scale and shift (FiLM)."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(group_count(in_ch), in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = nn.GroupNorm(group_count(out_ch), out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x: float [B, in_ch, H, W]; emb: float [B, emb_dim] already through SiLU."""
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = torch.addcmul(shift, self.norm2(h), 1 + scale)  # norm2(h) * (1 + scale) + shift, one pass
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class TextTransformerBlock(nn.Module):
    """Self-attention over pixels (optional), cross-attention to text tokens, feed-forward.

    The H*W pixels are tokens of width C; each sub-layer is pre-LayerNorm and residual, the
    output projection zero-initialised. Self-attention costs O((HW)^2), cross-attention to a
    few tokens little: hence `self_attention` can be off. position_init: None, or the init of
    a learned per-pixel embedding (positions.py).
    """

    def __init__(self, channels: int, context_dim: int, head_dim: int, size: int,
                 ff_mult: int = 2, self_attention: bool = True, position_init: str | None = None):
        super().__init__()
        self.heads = channels // head_dim
        self.norm_in = nn.GroupNorm(group_count(channels), channels)
        self.pos = position_embedding(size, channels, position_init) if position_init else None
        self.self_attention = self_attention
        if self_attention:
            self.norm_self = nn.LayerNorm(channels)
            self.qkv = nn.Linear(channels, 3 * channels, bias=False)
            self.out_self = nn.Linear(channels, channels)
        self.norm_cross = nn.LayerNorm(channels)
        self.q_cross = nn.Linear(channels, channels, bias=False)
        self.kv_cross = nn.Linear(context_dim, 2 * channels, bias=False)
        self.out_cross = nn.Linear(channels, channels)
        self.norm_ff = nn.LayerNorm(channels)
        self.ff = nn.Sequential(nn.Linear(channels, ff_mult * channels), nn.GELU(),
                                nn.Linear(ff_mult * channels, channels))
        self.proj_out = zero_init(nn.Linear(channels, channels))

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, C] -> [B, heads, N, C / heads]."""
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor, attn_mask: torch.Tensor,
                has_text: torch.Tensor) -> torch.Tensor:
        """x: float [B, C, H, W]; context: float [B, L, D]; attn_mask: bool [B, 1, 1, L]
        (True = attend); has_text: bool [B, 1, 1], False for a caption with no real token."""
        b, c, hgt, wid = x.shape
        h = self.norm_in(x).flatten(2).transpose(1, 2)  # [B, HW, C]
        if self.pos is not None:
            h = h + self.pos.to(h.dtype)

        if self.self_attention:
            q, k, v = self._split(self.qkv(self.norm_self(h))).chunk(3, dim=-1)
            a = attention(q, k, v)
            h = h + self.out_self(a.transpose(1, 2).flatten(2))

        q = self._split(self.q_cross(self.norm_cross(h)))
        k, v = self._split(self.kv_cross(context)).chunk(2, dim=-1)
        a = attention(q, k, v, attn_mask)
        # A caption with no real token contributes nothing (and its all-masked row is not NaN).
        h = h + self.out_cross(a.transpose(1, 2).flatten(2)) * has_text

        h = h + self.ff(self.norm_ff(h))
        return x + self.proj_out(h).transpose(1, 2).reshape(b, c, hgt, wid)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """3x3 conv, then nearest 2x. Convolving before upsampling costs a quarter of the usual
    order; the residual blocks that follow at the higher resolution smooth the 2x2 blocks."""

    def __init__(self, channels: int, out_channels: int | None = None):
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.conv(x), scale_factor=2.0, mode="nearest")


class Stage(nn.Module):
    """A ResBlock optionally followed by a text transformer block."""

    def __init__(self, res: ResBlock, attn: TextTransformerBlock | None):
        super().__init__()
        self.res = res
        self.attn = attn

    def forward(self, x, emb, context, attn_mask, has_text):
        x = self.res(x, emb)
        return x if self.attn is None else self.attn(x, context, attn_mask, has_text)


class UNet(nn.Module):
    """Text-conditioned UNet: (x, t, text) -> a tensor shaped like x.

    Level i works at image_size / 2**i with cfg.channels[i] channels: cfg.num_res_blocks
    stages per level on the way down, one more on the way up, each a ResBlock plus, at
    cfg.attn_resolutions, a TextTransformerBlock. context_dim: the text tokens' width D.
    """

    def __init__(self, cfg: UNetConfig, image_size: int, context_dim: int,
                 image_channels: int = 3):
        super().__init__()
        self.cfg = cfg
        self.image_channels, self.image_size, self.context_dim = image_channels, image_size, context_dim
        self.channels = channels = tuple(cfg.channels)
        self.time_dim, emb_dim = channels[0], 4 * channels[0]
        self.time_mlp = nn.Sequential(nn.Linear(channels[0], emb_dim), nn.SiLU(),
                                      nn.Linear(emb_dim, emb_dim))
        self.text_adapter = (TextAdapter(context_dim, cfg.text_width, cfg.text_layers, cfg.head_dim)
                             if cfg.text_layers else None)
        self.cross_dim = cfg.text_width if cfg.text_layers else context_dim  # what cross-attention reads
        self.text_pool = nn.Linear(self.cross_dim, emb_dim) if cfg.pooled_text else None
        self.coords = CoordinateChannels(image_size) if cfg.coord_channels else None
        self.conv_in = nn.Conv2d(image_channels + 2 * cfg.coord_channels, channels[0], 3, padding=1)
        sizes = [image_size // 2 ** i for i in range(len(channels))]
        skip_channels = self._build_down(sizes, emb_dim)
        ch = channels[-1]
        self.mid = nn.ModuleList([self._stage(ch, ch, sizes[-1], emb_dim),
                                  Stage(ResBlock(ch, ch, emb_dim, cfg.dropout), None)])
        ch = self._build_up(sizes, emb_dim, skip_channels)
        self.norm_out = nn.GroupNorm(group_count(ch), ch)
        self.conv_out = zero_init(nn.Conv2d(ch, image_channels, 3, padding=1))

    def _stage(self, in_ch: int, out_ch: int, size: int, emb_dim: int) -> Stage:
        cfg = self.cfg
        attn = None
        if size in cfg.attn_resolutions:
            self_attn = cfg.self_attn_resolutions is None or size in cfg.self_attn_resolutions
            attn = TextTransformerBlock(
                out_ch, self.cross_dim, cfg.head_dim, size, self_attention=self_attn,
                position_init=cfg.position_init if cfg.position_embedding else None)
        return Stage(ResBlock(in_ch, out_ch, emb_dim, cfg.dropout), attn)

    def _build_down(self, sizes: list, emb_dim: int) -> list:
        """self.down: each level's stages, then a 2x downsample; returns the channels of
        every skip connection (conv_in's output, then each block's), in order."""
        self.down = nn.ModuleList()
        ch = self.channels[0]
        skip_channels = [ch]
        for i, out_ch in enumerate(self.channels):
            for _ in range(self.cfg.num_res_blocks):
                self.down.append(self._stage(ch, out_ch, sizes[i], emb_dim))
                ch = out_ch
                skip_channels.append(ch)
            if i < len(self.channels) - 1:
                self.down.append(Downsample(ch))
                skip_channels.append(ch)
        return skip_channels

    def _build_up(self, sizes: list, emb_dim: int, skip_channels: list) -> int:
        """self.up: each level's stages (each reads the features concatenated with a skip),
        then a 2x upsample (cfg.narrow_upsample: to the entered level's width); returns the
        output width."""
        self.up = nn.ModuleList()
        ch = self.channels[-1]
        for i, out_ch in reversed(list(enumerate(self.channels))):
            for _ in range(self.cfg.num_res_blocks + 1):
                self.up.append(self._stage(ch + skip_channels.pop(), out_ch, sizes[i], emb_dim))
                ch = out_ch
            if i > 0:
                up_ch = self.channels[i - 1] if self.cfg.narrow_upsample else ch
                self.up.append(Upsample(ch, up_ch))
                ch = up_ch
        return ch

    def text_context(self, tokens: torch.Tensor, mask: torch.Tensor,
                     attn_mask: torch.Tensor) -> torch.Tensor:
        """What cross-attention and the pooled text read, float [B, L, cross_dim] with padding
        zeroed: the encoder's tokens (as text_masks returns them) or the text layers' output."""
        if self.text_adapter is None:
            return tokens
        return self.text_adapter(tokens, attn_mask).masked_fill(~mask[..., None], 0.0)

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor, text: TextBatch) -> torch.Tensor:
        """Raise ValueError naming the first input of the wrong shape; returns t as [B]."""
        b = x.shape[0]
        if x.dim() != 4 or x.shape[1] != self.image_channels or x.shape[2:] != (self.image_size,) * 2:
            raise ValueError(f"UNet.forward: x must be [B, {self.image_channels}, {self.image_size}, "
                             f"{self.image_size}], got {tuple(x.shape)}")
        tokens, mask = text.tokens, text.mask
        if tokens.dim() != 3 or tokens.shape[0] != b or tokens.shape[2] != self.context_dim:
            raise ValueError(f"UNet.forward: text.tokens must be float [{b}, L, {self.context_dim}], "
                             f"got {tuple(tokens.shape)}")
        if mask.shape != tokens.shape[:2]:
            raise ValueError(f"UNet.forward: text.mask must be bool {tuple(tokens.shape[:2])}, "
                             f"got {tuple(mask.shape)}")
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(b) if t.dim() == 0 else t
        if t.shape != (b,):
            raise ValueError(f"UNet.forward: t must be [B] = [{b}], got {tuple(t.shape)}")
        return t

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: TextBatch) -> torch.Tensor:
        """x: float [B, C, H, W] (H = W = image_size); t: int or float [B] (or a scalar);
        text: TextBatch(tokens float [B, L, context_dim], mask bool [B, L]).
        Returns float [B, C, H, W]."""
        t = self._check_inputs(x, t, text)
        tokens, mask, attn_mask, has_text, count = text_masks(text, x.dtype)
        tokens = self.text_context(tokens, mask, attn_mask)

        emb = self.time_mlp(timestep_embedding(t, self.time_dim).to(x.dtype))
        if self.text_pool is not None:
            emb = emb + self.text_pool(tokens.sum(1) / count.clamp(min=1).to(x.dtype))
        emb = F.silu(emb)

        h = self.conv_in(x if self.coords is None else self.coords(x))
        skips = [h]
        for block in self.down:
            h = block(h) if isinstance(block, Downsample) else block(h, emb, tokens, attn_mask, has_text)
            skips.append(h)
        for block in self.mid:
            h = block(h, emb, tokens, attn_mask, has_text)
        for block in self.up:
            if isinstance(block, Upsample):
                h = block(h)
            else:
                h = block(torch.cat([h, skips.pop()], dim=1), emb, tokens, attn_mask, has_text)
        return self.conv_out(F.silu(self.norm_out(h)))
