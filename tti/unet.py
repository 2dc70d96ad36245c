"""UNet denoiser conditioned on a timestep and on text token embeddings.

Residual blocks (GroupNorm, SiLU, timestep scale-shift) at each resolution level, with a
transformer block (self-attention, cross-attention to the text tokens, feed-forward; all
attention through `F.scaled_dot_product_attention`) at the resolutions in
`attn_resolutions`. The text padding mask is honoured everywhere: padding tokens never
change the output. A masked mean of the text tokens is also added to the time embedding
(cheap global conditioning).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from tti.config import UNetConfig
from tti.positions import CoordinateChannels, position_embedding
from tti.text import TextBatch


def _groups(channels: int) -> int:
    """Largest group count <= 32 that divides `channels` (GroupNorm needs a divisor)."""
    return next(g for g in range(min(32, channels), 0, -1) if channels % g == 0)


def _zero(module: nn.Module) -> nn.Module:
    """Zero a layer's weights so its residual branch starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding. t: int or float [B] -> float [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled dot-product attention, with an explicit path for CPU training in bf16/fp16.

    q: [B, heads, N, d]; k, v: [B, heads, L, d]; attn_mask: bool broadcastable to
    [B, heads, N, L] (True = attend; every query row must have at least one True, which
    UNet.forward guarantees). Returns [B, heads, N, d].
    When training on CPU in bf16/fp16 (autograd recording), attention is written out as
    matmul, masked softmax, matmul: for these short sequences the CPU flash kernel's
    backward, and the math backend's guards for fully masked rows (which cannot occur here),
    cost more than the attention itself. The scores stay in the autocast dtype; the softmax
    accumulates in fp32. In fp32, and for sampling (no grad), SDPA picks its kernel.
    docs/design_notes.md has the measurements; bench/train_throughput.py times both paths.
    """
    if (q.device.type == "cpu" and q.dtype != torch.float32 and torch.is_grad_enabled()
            and q.requires_grad):
        scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)  # [B, heads, N, L]
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        return scores.softmax(dim=-1) @ v
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the time embedding as a scale and shift (FiLM)."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(in_ch), in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = nn.GroupNorm(_groups(out_ch), out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
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

    The pixels of a [B, C, H, W] map are H*W tokens of width C; every sub-layer is
    pre-LayerNorm and residual, and the output projection is zero-initialised.
    Self-attention costs O((HW)^2) while cross-attention to a caption's few tokens is cheap,
    hence `self_attention` can be off. `position_init` (None = no position embedding):
    "random" or "sinusoidal", a learned embedding per pixel of the size x size map.
    """

    def __init__(self, channels: int, context_dim: int, head_dim: int, size: int,
                 ff_mult: int = 2, self_attention: bool = True, position_init: str | None = None):
        super().__init__()
        self.heads = channels // head_dim
        self.norm_in = nn.GroupNorm(_groups(channels), channels)
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
        self.proj_out = _zero(nn.Linear(channels, channels))

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        # [B, N, C] -> [B, heads, N, C / heads]
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


class TextLayer(nn.Module):
    """A pre-LayerNorm transformer layer over text tokens (self-attention + feed-forward)."""

    def __init__(self, width: int, head_dim: int, ff_mult: int = 2):
        super().__init__()
        self.heads = width // head_dim
        self.norm_attn = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.out = nn.Linear(width, width)
        self.norm_ff = nn.LayerNorm(width)
        self.ff = nn.Sequential(nn.Linear(width, ff_mult * width), nn.GELU(),
                                nn.Linear(ff_mult * width, width))

    def forward(self, h: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        """h: float [B, L, W]; attn_mask: bool [B, 1, 1, L] (True = attend)."""
        q, k, v = self.qkv(self.norm_attn(h)).unflatten(-1, (self.heads, -1)).transpose(1, 2).chunk(3, -1)
        a = attention(q, k, v, attn_mask)
        h = h + self.out(a.transpose(1, 2).flatten(2))
        return h + self.ff(self.norm_ff(h))


class TextAdapter(nn.Module):
    """Trainable layers between a frozen text encoder and the UNet: a projection to `width`,
    then `layers` transformer layers. A frozen encoder's tokens say which words are there;
    these layers can learn to regroup them per object ("small blue square" vs "large yellow
    circle"), the attribute binding that cross-attention alone gets wrong."""

    def __init__(self, in_dim: int, width: int, layers: int, head_dim: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, width)
        self.layers = nn.ModuleList(TextLayer(width, head_dim) for _ in range(layers))

    def forward(self, tokens: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        """tokens: float [B, L, in_dim]; attn_mask: bool [B, 1, 1, L] -> float [B, L, width]."""
        h = self.proj(tokens)
        for layer in self.layers:
            h = layer(h, attn_mask)
        return h


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

    cfg: model.unet (tti.config.UNetConfig, which describes each field; tti.config.validate
    checks them). Level i works at image_size / 2**i with cfg.channels[i] channels: on the
    way down cfg.num_res_blocks stages per level, one more on the way up, each a ResBlock
    plus, at cfg.attn_resolutions, a TextTransformerBlock. context_dim: the width D of the
    text tokens; image_channels: the channels of x (3 for RGB).
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
        self.norm_out = nn.GroupNorm(_groups(ch), ch)
        self.conv_out = _zero(nn.Conv2d(ch, image_channels, 3, padding=1))

    def _stage(self, in_ch: int, out_ch: int, size: int, emb_dim: int) -> Stage:
        """A ResBlock, and a transformer block if `size` is one of cfg.attn_resolutions."""
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
        then a 2x upsample (to the entered level's width if cfg.narrow_upsample); returns
        the output width."""
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
        """What cross-attention and the pooled text read: the encoder's tokens, or the text
        layers' output when there are text layers.
        tokens: float [B, L, context_dim] (padding zeroed); mask: bool [B, L];
        attn_mask: bool [B, 1, 1, L] -> float [B, L, cross_dim], padding zeroed."""
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
        mask = text.mask.bool()
        tokens = text.tokens.to(x.dtype).masked_fill(~mask[..., None], 0.0)  # padding can hold anything
        count = mask.sum(1, keepdim=True)
        # Bool, so multiplying by it keeps autocast's dtype (a float32 factor would promote
        # every transformer block's residual stream to float32 under bf16 autocast).
        has_text = (count > 0)[:, :, None]  # [B, 1, 1]
        attn_mask = mask[:, None, None, :] | (count == 0)[:, None, None, :]

        tokens = self.text_context(tokens, mask, attn_mask)

        emb = self.time_mlp(timestep_embedding(t, self.time_dim).to(x.dtype))
        if self.text_pool is not None:
            pooled = tokens.sum(1) / count.clamp(min=1).to(x.dtype)
            emb = emb + self.text_pool(pooled)
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
