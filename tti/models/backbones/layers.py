"""Layers the backbones share: time embedding, attention, the text adapter, text masking."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from tti.text.batch import TextBatch


def group_count(channels: int) -> int:
    """Largest group count <= 32 that divides `channels` (GroupNorm needs a divisor)."""
    return next(g for g in range(min(32, channels), 0, -1) if channels % g == 0)


def zero_init(module: nn.Module) -> nn.Module:
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
    [B, heads, N, L] (True = attend; every query row needs one True, as `text_masks`
    guarantees). Returns [B, heads, N, d].
    Training on CPU in bf16/fp16 writes it out as matmul, masked softmax, matmul: for these
    short sequences the CPU flash kernel's backward, and the math backend's guards for fully
    masked rows (impossible here), cost more than the attention itself (docs/design_notes.md);
    the softmax accumulates in fp32. In fp32, and for sampling (no grad), SDPA picks its kernel.
    """
    if (q.device.type == "cpu" and q.dtype != torch.float32 and torch.is_grad_enabled()
            and q.requires_grad):
        scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)  # [B, heads, N, L]
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        return scores.softmax(dim=-1) @ v
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


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
    """A projection to `width`, then `layers` trainable transformer layers over a frozen
    encoder's tokens: they can learn to regroup words per object ("small blue square" vs
    "large yellow circle"), the attribute binding that cross-attention alone gets wrong."""

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


def text_masks(text: TextBatch, dtype: torch.dtype):
    """What attention to a caption's tokens needs: (tokens float [B, L, D] in `dtype` with
    padding zeroed, mask bool [B, L], attn_mask bool [B, 1, 1, L] (True = attend), has_text
    bool [B, 1, 1] (False for a caption with no real token), count [B, 1] real tokens).
    A caption with no real token may attend to its padding (so no row is all masked); its
    attention output is then multiplied by has_text = False."""
    mask = text.mask.bool()
    tokens = text.tokens.to(dtype).masked_fill(~mask[..., None], 0.0)  # padding can hold anything
    count = mask.sum(1, keepdim=True)
    # Bool, so multiplying by it keeps autocast's dtype (a float32 factor would promote
    # every transformer block's residual stream to float32 under bf16 autocast).
    has_text = (count > 0)[:, :, None]
    attn_mask = mask[:, None, None, :] | (count == 0)[:, None, None, :]
    return tokens, mask, attn_mask, has_text, count
