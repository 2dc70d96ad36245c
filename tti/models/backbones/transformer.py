"""A transformer over image patches (DiT) behind the backbone contract (x, t, text) -> output.

Each patch_size x patch_size patch is a token of `width` with a 2-D sin/cos or a learned
position. Blocks are pre-LayerNorm and residual; time (and the pooled text) sets each
block's shift, scale and gate (adaLN-zero: gates start at 0, so blocks start as the identity).
The text enters by cross-attention (`text: cross`, PixArt-alpha) or by one attention over
patches and text tokens together (`text: joint`, SD3's MMDiT); `skips` adds U-ViT's long
skips. Text padding never changes the output.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from tti.config.registry import Entry
from tti.config.rules import bounds, check, one_of
from tti.models.backbones.layers import (TextAdapter, attention, text_masks, timestep_embedding,
                                         zero_init)
from tti.models.backbones.positions import position_embedding
from tti.text.batch import TextBatch

TEXT_MODES = ("cross", "joint")


@dataclass
class TransformerConfig:
    patch_size: int = 2
    width: int = 128
    depth: int = 6
    head_dim: int = 32
    ff_mult: int = 4                 # MLP hidden width / width
    text: str = "cross"              # cross (PixArt-alpha) | joint (MMDiT)
    skips: bool = False              # U-ViT long skips between block i and depth - 1 - i
    positions: str = "sinusoidal"    # sinusoidal (2-D sin/cos, learned on top) | learned (N(0, 0.02))
    text_layers: int = 0             # trainable transformer layers over the text tokens
    text_width: int = 128            # their width (the encoder's tokens are projected to it)
    pooled_text: bool = True         # the masked mean of the text tokens joins the time embedding


def validate(cfg) -> None:
    m, size = cfg.model.transformer, cfg.grid().size  # pixels, or a latent space's grid
    bounds(m, "model.transformer", {"patch_size": ">= 1", "width": ">= 1", "depth": ">= 1",
                                    "head_dim": ">= 1", "ff_mult": ">= 1", "text_layers": ">= 0"})
    check(size % m.patch_size == 0, "model.transformer.patch_size",
          f"{m.patch_size} must divide the image side {size}", "data.image_size")
    check(m.width % m.head_dim == 0, "model.transformer.head_dim",
          f"{m.head_dim} must divide model.transformer.width {m.width}", "model.transformer.width")
    check(not m.text_layers or m.text_width % m.head_dim == 0, "model.transformer.text_width",
          f"{m.text_width} must be a multiple of model.transformer.head_dim {m.head_dim}",
          "model.transformer.head_dim")
    one_of(m.text, TEXT_MODES, "model.transformer.text")
    one_of(m.positions, ("sinusoidal", "learned"), "model.transformer.positions")


def build(cfg, image_channels: int, context_dim: int) -> "Transformer":
    return Transformer(cfg.model.transformer, cfg.grid().size, context_dim, image_channels)


def label(cfg) -> str:
    m = cfg.model.transformer
    return (f"{'MMDiT' if m.text == 'joint' else 'DiT'}{' + skips' if m.skips else ''} "
            f"{m.width}x{m.depth}, patch {m.patch_size}")


ENTRY = Entry("transformer", build, TransformerConfig, validate, label=label)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x: [B, N, W]; shift, scale: [B, W] -> x (1 + scale) + shift."""
    return torch.addcmul(shift[:, None], x, 1 + scale[:, None])


class Stream(nn.Module):
    """One stream's half of a block: norms, qkv, output, MLP, and the adaLN-zero map from the
    conditioning vector to its 6 shifts, scales and gates."""

    def __init__(self, width: int, ff_mult: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, ff_mult * width), nn.GELU(approximate="tanh"),
                                 nn.Linear(ff_mult * width, width))
        self.ada = zero_init(nn.Linear(width, 6 * width))

    def qkv_heads(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor):
        """[B, N, W] -> q, k, v, each [B, heads, N, W / heads]."""
        qkv = self.qkv(modulate(self.norm1(x), shift, scale))
        return qkv.unflatten(-1, (3 * self.heads, -1)).transpose(1, 2).chunk(3, dim=1)

    def finish(self, x, a, gate1, shift2, scale2, gate2):
        """Add the attention output a [B, heads, N, d] and the MLP, both gated."""
        x = x + gate1[:, None] * self.out(a.transpose(1, 2).flatten(2))
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class CrossBlock(nn.Module):
    """Self-attention over the patches, cross-attention to the text, MLP (PixArt-alpha)."""

    def __init__(self, width: int, context_dim: int, heads: int, ff_mult: int):
        super().__init__()
        self.image = Stream(width, ff_mult, heads)
        self.norm_cross = nn.LayerNorm(width)
        self.q_cross = nn.Linear(width, width)
        self.kv_cross = nn.Linear(context_dim, 2 * width)
        self.out_cross = zero_init(nn.Linear(width, width))

    def forward(self, x, text, c, masks):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.image.ada(c).chunk(6, dim=-1)
        q, k, v = self.image.qkv_heads(x, shift1, scale1)
        x = x + gate1[:, None] * self.image.out(attention(q, k, v).transpose(1, 2).flatten(2))
        heads = self.image.heads
        q = self.q_cross(self.norm_cross(x)).unflatten(-1, (heads, -1)).transpose(1, 2)
        k, v = self.kv_cross(text).unflatten(-1, (2 * heads, -1)).transpose(1, 2).chunk(2, dim=1)
        a = attention(q, k, v, masks["cross"]).transpose(1, 2).flatten(2)
        x = x + self.out_cross(a) * masks["has_text"]
        x = x + gate2[:, None] * self.image.mlp(modulate(self.image.norm2(x), shift2, scale2))
        return x, text


class JointBlock(nn.Module):
    """One attention over patches and text tokens, each with its own weights (MMDiT). The
    last block leaves the text stream as it is (its output would be read by nothing)."""

    def __init__(self, width: int, heads: int, ff_mult: int, last: bool):
        super().__init__()
        self.image = Stream(width, ff_mult, heads)
        self.text = Stream(width, ff_mult, heads)
        self.last = last
        if last:  # only the text's keys and values are used: no output, MLP or gates
            self.text.out = self.text.mlp = self.text.norm2 = None
            self.text.ada = zero_init(nn.Linear(width, 2 * width))

    def forward(self, x, text, c, masks):
        image_mod = self.image.ada(c).chunk(6, dim=-1)
        text_mod = self.text.ada(c).chunk(6 if not self.last else 2, dim=-1)
        qi, ki, vi = self.image.qkv_heads(x, *image_mod[:2])
        qt, kt, vt = self.text.qkv_heads(text, *text_mod[:2])
        n = x.shape[1]
        k, v = torch.cat([ki, kt], dim=2), torch.cat([vi, vt], dim=2)
        if self.last:
            return self.image.finish(x, attention(qi, k, v, masks["joint"]), *image_mod[2:]), text
        a = attention(torch.cat([qi, qt], dim=2), k, v, masks["joint"])
        x = self.image.finish(x, a[:, :, :n], *image_mod[2:])
        text = self.text.finish(text, a[:, :, n:], *text_mod[2:])
        return x, text


class Transformer(nn.Module):
    """(x float [B, C, S, S], t float [B] in [0, 1000], text) -> float [B, C, S, S].
    cfg: model.transformer (TransformerConfig); context_dim: the text tokens' width D."""

    def __init__(self, cfg: TransformerConfig, image_size: int, context_dim: int,
                 image_channels: int = 3):
        super().__init__()
        self.cfg, self.image_size, self.image_channels = cfg, image_size, image_channels
        self.context_dim, w, p = context_dim, cfg.width, cfg.patch_size
        self.grid = image_size // p
        self.patch_in = nn.Conv2d(image_channels, w, p, stride=p)
        self.pos = position_embedding(self.grid, w, cfg.positions)
        self.time_mlp = nn.Sequential(nn.Linear(256, w), nn.SiLU(), nn.Linear(w, w))
        self.text_adapter = (TextAdapter(context_dim, cfg.text_width, cfg.text_layers, cfg.head_dim)
                             if cfg.text_layers else None)
        text_dim = cfg.text_width if cfg.text_layers else context_dim
        self.text_pool = nn.Linear(text_dim, w) if cfg.pooled_text else None
        heads = w // cfg.head_dim
        if cfg.text == "joint":
            self.text_in = nn.Linear(text_dim, w)
            self.blocks = nn.ModuleList(JointBlock(w, heads, cfg.ff_mult, i == cfg.depth - 1)
                                        for i in range(cfg.depth))
        else:
            self.blocks = nn.ModuleList(CrossBlock(w, text_dim, heads, cfg.ff_mult)
                                        for _ in range(cfg.depth))
        self.skip_in = nn.ModuleList(nn.Linear(2 * w, w) for _ in range(cfg.depth // 2)) \
            if cfg.skips else None
        self.norm_out = nn.LayerNorm(w, elementwise_affine=False, eps=1e-6)
        self.ada_out = zero_init(nn.Linear(w, 2 * w))
        self.patch_out = zero_init(nn.Linear(w, p * p * image_channels))

    def conditioning(self, t: torch.Tensor, text: TextBatch, dtype: torch.dtype):
        """(c float [B, W]: time (+ pooled text), through SiLU; the text tokens as the blocks
        read them; the attention masks)."""
        tokens, mask, attn_mask, has_text, count = text_masks(text, dtype)
        if self.text_adapter is not None:
            tokens = self.text_adapter(tokens, attn_mask).masked_fill(~mask[..., None], 0.0)
        c = self.time_mlp(timestep_embedding(t, 256).to(dtype))
        if self.text_pool is not None:
            c = c + self.text_pool(tokens.sum(1) / count.clamp(min=1).to(dtype))
        b, n = mask.shape[0], self.grid ** 2
        image_keys = torch.ones(b, 1, 1, n, dtype=torch.bool, device=mask.device)
        masks = {"cross": attn_mask, "has_text": has_text,
                 "joint": torch.cat([image_keys, mask[:, None, None, :]], dim=-1)}
        if self.cfg.text == "joint":
            tokens = self.text_in(tokens)
        return F.silu(c), tokens, masks

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: TextBatch) -> torch.Tensor:
        b, p = x.shape[0], self.cfg.patch_size
        if x.shape[1:] != (self.image_channels, self.image_size, self.image_size):
            raise ValueError(f"Transformer.forward: x must be [B, {self.image_channels}, "
                             f"{self.image_size}, {self.image_size}], got {tuple(x.shape)}")
        t = torch.as_tensor(t, device=x.device).float().expand(b)
        c, tokens, masks = self.conditioning(t, text, x.dtype)
        h = self.patch_in(x).flatten(2).transpose(1, 2) + self.pos.to(x.dtype)  # [B, N, W]
        skips = []
        for i, block in enumerate(self.blocks):
            if self.skip_in is not None and i >= len(self.blocks) - len(self.skip_in):
                h = self.skip_in[len(self.blocks) - 1 - i](torch.cat([h, skips.pop()], dim=-1))
            h, tokens = block(h, tokens, c, masks)
            if self.skip_in is not None and i < len(self.skip_in):
                skips.append(h)
        shift, scale = self.ada_out(c).chunk(2, dim=-1)
        out = self.patch_out(modulate(self.norm_out(h), shift, scale))  # [B, N, p*p*C]
        out = out.view(b, self.grid, self.grid, self.image_channels, p, p)
        return out.permute(0, 3, 1, 4, 2, 5).reshape(x.shape)
