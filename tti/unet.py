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

from tti.text import TextBatch


def _groups(channels: int) -> int:
    """Largest group count <= 32 that divides `channels` (GroupNorm needs a divisor)."""
    return next(g for g in range(min(32, channels), 0, -1) if channels % g == 0)


def _zero(module: nn.Module) -> nn.Module:
    """Zero a layer's weights so its residual branch starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def sinusoidal_positions(size: int, channels: int) -> torch.Tensor:
    """2-D sinusoidal position code for a size x size map -> float [1, size*size, channels].

    Half the channels encode the column, half the row, each as sin/cos pairs at geometric
    frequencies from half a period across the map (cos is then monotonic: left differs from
    right) up to one period per two pixels; amplitude 1, like the normalised features it is
    added to (a learned embedding initialised near zero takes long to matter)."""
    quarter = max(channels // 4, 1)
    freqs = math.pi * 2.0 ** torch.linspace(0, math.log2(size), quarter)  # rad per unit side
    coord = (torch.arange(size) + 0.5) / size  # pixel centres in (0, 1)
    angles = coord[:, None] * freqs[None]  # [size, quarter]
    per_axis = torch.cat([angles.sin(), angles.cos()], dim=1)  # [size, 2 * quarter]
    rows = per_axis[:, None, :].expand(size, size, -1)
    cols = per_axis[None, :, :].expand(size, size, -1)
    code = torch.cat([cols, rows], dim=-1).reshape(1, size * size, -1)
    return F.pad(code, (0, channels - code.shape[-1]))[..., :channels]


def coordinate_channels(size: int) -> torch.Tensor:
    """float [1, 2, size, size]: each pixel centre's x then y, in (-1, 1)."""
    coord = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    return torch.stack([coord[None, :].expand(size, size), coord[:, None].expand(size, size)])[None]


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding. t: int or float [B] -> float [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


# Module switch so bench/train_throughput.py can time the explicit path against SDPA's kernel.
EXPLICIT_ATTENTION_FOR_CPU_TRAINING = True


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled dot-product attention, with an explicit path for CPU training in bf16/fp16.

    q: [B, heads, N, d]; k, v: [B, heads, L, d]; attn_mask: bool broadcastable to
    [B, heads, N, L] (True = attend; every query row must have at least one True, which
    UNet.forward guarantees). Returns [B, heads, N, d].
    When training on CPU in bf16/fp16 (autograd recording), attention is written out as
    matmul, masked softmax, matmul: for these short sequences (<= 256 queries, <= 64 keys)
    the CPU flash kernel's bf16 backward was 19% of a shapes32 training step, and SDPA's
    math backend spends ~4% of the step on its guards for fully masked rows (the `all` /
    `where` over every score), which cannot occur here. The scores stay in the autocast
    dtype (mean error 8e-4 against fp64 on unit-variance inputs, SDPA's math backend 5e-4;
    the softmax itself accumulates in fp32). In fp32, and for sampling (no grad), SDPA
    picks its kernel (the flash kernel was ~12% faster at batch 200 for sampling).
    bench/train_throughput.py times the training step both ways.
    """
    if (EXPLICIT_ATTENTION_FOR_CPU_TRAINING and q.device.type == "cpu"
            and q.dtype != torch.float32 and torch.is_grad_enabled() and q.requires_grad):
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
    Self-attention costs O((HW)^2): at 16x16 it is ~15% of a 32px training step on CPU,
    while cross-attention to ~14 text tokens is cheap, hence `self_attention` can be off.
    """

    def __init__(self, channels: int, context_dim: int, head_dim: int, ff_mult: int = 2,
                 self_attention: bool = True, positions: int = 0, position_init: str = "random"):
        super().__init__()
        self.heads = channels // head_dim
        self.norm_in = nn.GroupNorm(_groups(channels), channels)
        # A learned embedding per pixel position (positions = H*W; 0 = none). Attention is
        # otherwise blind to where a pixel is, and "A to the left of B" needs exactly that.
        self.pos = None
        if positions:
            side = math.isqrt(positions)
            init = (sinusoidal_positions(side, channels) if position_init == "sinusoidal"
                    else 0.02 * torch.randn(1, positions, channels))
            self.pos = nn.Parameter(init)
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

    image_channels: channels of x (3 for RGB).
    channels: width of each resolution level; level i works at image_size / 2**i.
    num_res_blocks: residual blocks per level on the way down (one more on the way up).
    attn_resolutions: feature-map sizes (e.g. 16, 8) that get a transformer block
        (cross-attention to the text, feed-forward, and self-attention where asked).
    self_attn_resolutions: the subset of attn_resolutions whose block also has
        self-attention over pixels; None means all of them.
    context_dim: width D of the text token embeddings.
    head_dim: channels per attention head (every attended level's width must divide by it).
    pooled_text: add a masked mean of the text tokens to the time embedding.
    text_layers: trainable transformer layers over the text tokens before the UNet uses them
        (TextAdapter, at width text_width); 0 = use the encoder's tokens as they are.
    position_embedding: a learned embedding of each pixel's position in every transformer
        block (tied to image_size: the model then only runs at that size).
    position_init: "random" (N(0, 0.02)) or "sinusoidal" (a 2-D sin/cos code of amplitude 1).
    coord_channels: feed each pixel's (x, y) as two extra input channels (CoordConv), so the
        convolutions, not only attention, know where they are.
    text_skip: cross-attention (and the pooled text) read the text layers' output and the
        encoder's own tokens side by side (width text_width + context_dim). The text layers
        are trained only through the diffusion loss and drop what the UNet does not use yet
        (e.g. which object a caption puts on the left: linearly readable from MiniLM's
        layer-3 tokens, not from the trained layers' output; bench/text_probe.py). The skip
        makes the encoder's tokens readable again; measured, the keys still lose that role
        in training (README, relation study), so it is off by default.

    add_full_res_skips: at the full-resolution level the way up *adds* each skip to the
        features instead of concatenating them (the upsample into that level maps to its
        width). The full-resolution convolutions then run at channels[0] in and out, with no
        1x1 skip projections: 12% fewer FLOPs, 2% fewer parameters, steps 1.09x (bf16) to
        1.18x (fp32) faster at 32x32 (bench/train_throughput.py); the lower levels keep
        concatenation. Measured, it learnt less within the quickstart's budget (seen
        all-correct 0.432 against 0.582; README, Benchmarks), so it is off by default.
    narrow_upsample: each upsampling conv maps to the width of the level it enters
        (channels[i-1]) instead of keeping its input's width, so the first block of each
        level on the way up reads channels[i-1] + its skip rather than channels[i] + its
        skip; skips are still concatenated everywhere. The widest full-resolution conv of
        the default shapes model goes from 96 to 64 input channels (3% fewer parameters).
    """

    def __init__(self, image_channels: int = 3, channels: tuple[int, ...] = (32, 64, 96),
                 num_res_blocks: int = 1, attn_resolutions: tuple[int, ...] = (16, 8),
                 image_size: int = 32, context_dim: int = 384, head_dim: int = 32,
                 dropout: float = 0.0, pooled_text: bool = True,
                 self_attn_resolutions: tuple[int, ...] | None = None,
                 position_embedding: bool = False, text_layers: int = 0, text_width: int = 128,
                 position_init: str = "random", coord_channels: bool = False,
                 text_skip: bool = False, add_full_res_skips: bool = False,
                 narrow_upsample: bool = False):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        attn_resolutions = tuple(int(r) for r in attn_resolutions)
        self_attn_resolutions = (attn_resolutions if self_attn_resolutions is None
                                 else tuple(int(r) for r in self_attn_resolutions))
        if not set(self_attn_resolutions) <= set(attn_resolutions):
            raise ValueError(f"UNet: self_attn_resolutions {self_attn_resolutions} must be a subset "
                             f"of attn_resolutions {attn_resolutions}")
        levels = len(channels)
        sizes = [image_size // 2 ** i for i in range(levels)]
        self._validate(image_channels, channels, num_res_blocks, attn_resolutions, image_size,
                       context_dim, head_dim, dropout, sizes)
        self.image_channels = image_channels
        self.image_size = image_size
        self.context_dim = context_dim
        self.channels = channels

        emb_dim = 4 * channels[0]
        self.time_dim = channels[0]
        self.time_mlp = nn.Sequential(nn.Linear(channels[0], emb_dim), nn.SiLU(),
                                      nn.Linear(emb_dim, emb_dim))
        if text_layers < 0 or (text_layers and text_width % head_dim):
            raise ValueError(f"UNet: text_layers must be >= 0 and text_width ({text_width}) "
                             f"divisible by head_dim ({head_dim})")
        if text_skip and not text_layers:
            raise ValueError("UNet: text_skip needs text_layers > 0 (without text layers the "
                             "encoder's tokens are what cross-attention reads anyway)")
        self.text_adapter = (TextAdapter(context_dim, text_width, text_layers, head_dim)
                             if text_layers else None)
        self.text_skip = text_skip
        # What cross-attention reads: the encoder's tokens, the text layers' output, or both.
        cross_dim = (text_width + context_dim * text_skip) if text_layers else context_dim
        self.text_pool = nn.Linear(cross_dim, emb_dim) if pooled_text else None

        def stage(in_ch: int, out_ch: int, size: int) -> Stage:
            attn = (TextTransformerBlock(out_ch, cross_dim, head_dim,
                                         self_attention=size in self_attn_resolutions,
                                         positions=size * size if position_embedding else 0,
                                         position_init=position_init)
                    if size in attn_resolutions else None)
            return Stage(ResBlock(in_ch, out_ch, emb_dim, dropout), attn)

        if position_init not in ("random", "sinusoidal"):
            raise ValueError(f"UNet: position_init must be 'random' or 'sinusoidal', got {position_init!r}")
        self.register_buffer("coords", coordinate_channels(image_size) if coord_channels else None,
                             persistent=False)
        self.conv_in = nn.Conv2d(image_channels + 2 * coord_channels, channels[0], 3, padding=1)
        self.down = nn.ModuleList()
        skip_channels = [channels[0]]
        ch = channels[0]
        for i, out_ch in enumerate(channels):
            for _ in range(num_res_blocks):
                self.down.append(stage(ch, out_ch, sizes[i]))
                ch = out_ch
                skip_channels.append(ch)
            if i < levels - 1:
                self.down.append(Downsample(ch))
                skip_channels.append(ch)

        self.mid = nn.ModuleList([stage(ch, ch, sizes[-1]),
                                  Stage(ResBlock(ch, ch, emb_dim, dropout), None)])

        self.up = nn.ModuleList()
        self.up_adds_skip: list[bool] = []  # per up block: add its skip (True) or concatenate
        for i, out_ch in reversed(list(enumerate(channels))):
            for _ in range(num_res_blocks + 1):
                # Every skip at level 0 has channels[0] channels (conv_in, the level's blocks).
                adding = add_full_res_skips and i == 0
                skip_ch = skip_channels.pop()
                self.up.append(stage(ch if adding else ch + skip_ch, out_ch, sizes[i]))
                self.up_adds_skip.append(adding)
                ch = out_ch
            if i > 0:
                reduce = narrow_upsample or (add_full_res_skips and i == 1)
                self.up.append(Upsample(ch, channels[i - 1] if reduce else None))
                self.up_adds_skip.append(False)
                ch = channels[i - 1] if reduce else ch

        self.norm_out = nn.GroupNorm(_groups(ch), ch)
        self.conv_out = _zero(nn.Conv2d(ch, image_channels, 3, padding=1))

    @staticmethod
    def _validate(image_channels, channels, num_res_blocks, attn_resolutions, image_size,
                  context_dim, head_dim, dropout, sizes):
        if image_channels < 1:
            raise ValueError(f"UNet: image_channels must be >= 1, got {image_channels}")
        if not channels or min(channels) < 1:
            raise ValueError(f"UNet: channels must be a non-empty list of positive ints, got {channels}")
        if num_res_blocks < 1:
            raise ValueError(f"UNet: num_res_blocks must be >= 1, got {num_res_blocks}")
        if image_size < 1 or image_size % 2 ** (len(channels) - 1):
            raise ValueError(
                f"UNet: image_size {image_size} must be divisible by 2**(len(channels)-1) = "
                f"{2 ** (len(channels) - 1)} for {len(channels)} levels")
        if context_dim < 1 or head_dim < 1:
            raise ValueError(f"UNet: context_dim and head_dim must be >= 1, got {context_dim}, {head_dim}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"UNet: dropout must be in [0, 1), got {dropout}")
        for r in attn_resolutions:
            if r not in sizes:
                raise ValueError(f"UNet: attention resolution {r} never occurs; the levels work at "
                                 f"{sizes} for image_size {image_size}")
            ch = channels[sizes.index(r)]
            if ch % head_dim:
                raise ValueError(f"UNet: level width {ch} at resolution {r} is not divisible by "
                                 f"head_dim {head_dim}")

    def text_context(self, tokens: torch.Tensor, mask: torch.Tensor,
                     attn_mask: torch.Tensor) -> torch.Tensor:
        """What cross-attention and the pooled text read: the encoder's tokens, the text
        layers' output, or (text_skip) both side by side, the text layers' channels first.
        tokens: float [B, L, context_dim] (padding zeroed); mask: bool [B, L];
        attn_mask: bool [B, 1, 1, L] -> float [B, L, cross_dim], padding zeroed."""
        if self.text_adapter is None:
            return tokens
        adapted = self.text_adapter(tokens, attn_mask).masked_fill(~mask[..., None], 0.0)
        return torch.cat([adapted, tokens], dim=-1) if self.text_skip else adapted

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: TextBatch) -> torch.Tensor:
        """x: float [B, C, H, W] (H = W = image_size); t: int or float [B] (or a scalar);
        text: TextBatch(tokens float [B, L, context_dim], mask bool [B, L]).
        Returns float [B, C, H, W]."""
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

        mask = mask.bool()
        tokens = tokens.to(x.dtype).masked_fill(~mask[..., None], 0.0)  # padding can hold anything
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

        if self.coords is not None:
            x = torch.cat([x, self.coords.to(x.dtype).expand(b, -1, -1, -1)], dim=1)
        h = self.conv_in(x)
        skips = [h]
        for block in self.down:
            h = block(h) if isinstance(block, Downsample) else block(h, emb, tokens, attn_mask, has_text)
            skips.append(h)
        for block in self.mid:
            h = block(h, emb, tokens, attn_mask, has_text)
        for block, adds_skip in zip(self.up, self.up_adds_skip):
            if isinstance(block, Upsample):
                h = block(h)
            elif adds_skip:
                h = block(h + skips.pop(), emb, tokens, attn_mask, has_text)
            else:
                h = block(torch.cat([h, skips.pop()], dim=1), emb, tokens, attn_mask, has_text)
        return self.conv_out(F.silu(self.norm_out(h)))
