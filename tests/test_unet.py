"""UNet: shapes, text padding invariance, conditioning paths, gradients, argument errors."""
import pytest
import torch

from tti.models.backbones.unet import UNetConfig
from tti.models.backbones.positions import coordinate_channels, sinusoidal_positions
from tti.text.batch import TextBatch
from tti.models.backbones.layers import attention, timestep_embedding
from tti.models.backbones.unet import UNet


def tiny_unet(image_size: int = 16, image_channels: int = 3, **fields) -> UNet:
    """A UNet over 24-wide text tokens; `fields` override model.unet's (UNetConfig)."""
    cfg = dict(channels=[16, 32], attn_resolutions=[16, 8], head_dim=16)
    cfg.update(fields)
    return UNet(UNetConfig(**cfg), image_size, context_dim=24, image_channels=image_channels)


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Give every weight a random value: the zero-initialised layers would hide the inputs."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


def text_batch(b: int, length: int, dim: int, real: list[int]) -> TextBatch:
    """Random tokens with the first real[i] positions of row i marked as real."""
    tokens = torch.randn(b, length, dim)
    mask = torch.arange(length)[None] < torch.tensor(real)[:, None]
    return TextBatch(tokens, mask)


def assert_trains_end_to_end(model: UNet, size: int) -> None:
    """One forward + backward at size x size: the output is shaped like the input and finite,
    and every parameter gets a non-zero gradient."""
    x, t, text = torch.randn(2, 3, size, size), torch.tensor([3, 500]), text_batch(2, 5, 24, [5, 2])
    out = model(x, t, text)
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.square().mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []


def test_output_is_zero_at_init_and_shaped_like_input():
    model = tiny_unet()
    x = torch.randn(2, 3, 16, 16)
    out = model(x, torch.tensor([0, 999]), text_batch(2, 5, 24, [5, 3]))
    assert out.shape == x.shape
    # The output conv is zero-initialised, so a fresh model predicts exactly zero.
    assert torch.count_nonzero(out) == 0


@pytest.mark.parametrize("size,channels,attn", [(32, (16, 32, 32), (16, 8)),
                                                (64, (16, 32, 32, 32), (16, 8))])
def test_output_shape_for_32_and_64(size, channels, attn):
    model = randomize(tiny_unet(size, channels=list(channels), attn_resolutions=list(attn)))
    x = torch.randn(2, 3, size, size)
    out = model(x, torch.tensor([3, 500]), text_batch(2, 7, 24, [7, 2]))
    assert out.shape == (2, 3, size, size)
    assert torch.isfinite(out).all()


def test_default_model_shape_and_single_channel():
    model = UNet(UNetConfig(), image_size=32, context_dim=384)
    out = model(torch.randn(1, 3, 32, 32), torch.tensor([10]), text_batch(1, 4, 384, [4]))
    assert out.shape == (1, 3, 32, 32)
    gray = tiny_unet(image_channels=1)
    assert gray(torch.randn(2, 1, 16, 16), torch.tensor([1, 2]),
                text_batch(2, 3, 24, [3, 3])).shape == (2, 1, 16, 16)


@pytest.mark.parametrize("pooled_text,self_attn,pos,text_layers,narrow", [
    (True, None, False, 0, False), (False, None, False, 0, False), (True, [8], True, 0, False),
    (True, [8], True, 2, False), (True, [8], True, 2, True)])
def test_padding_tokens_never_change_the_output(pooled_text, self_attn, pos, text_layers, narrow):
    model = randomize(tiny_unet(pooled_text=pooled_text, self_attn_resolutions=self_attn,
                                position_embedding=pos, text_layers=text_layers,
                                text_width=32, narrow_upsample=narrow)).eval()
    real = torch.randn(2, 6, 24)
    short = TextBatch(torch.cat([real, torch.randn(2, 2, 24)], 1),
                      torch.arange(8)[None].expand(2, 8) < torch.tensor([[6], [4]]))
    # The same captions padded to 40 tokens, with large garbage in the padding.
    long_tokens = torch.cat([real, 1e3 * torch.randn(2, 34, 24)], 1)
    long = TextBatch(long_tokens, torch.arange(40)[None].expand(2, 40) < torch.tensor([[6], [4]]))
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 700])
    with torch.no_grad():
        a, b = model(x, t, short), model(x, t, long)
    assert a.abs().max() > 1e-2  # the randomised model really responds
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_text_and_timestep_both_change_the_output():
    model = randomize(tiny_unet()).eval()
    x = torch.randn(1, 3, 16, 16)
    text_a, text_b = text_batch(1, 4, 24, [4]), text_batch(1, 4, 24, [4])
    with torch.no_grad():
        base = model(x, torch.tensor([10]), text_a)
        assert (base - model(x, torch.tensor([10]), text_b)).abs().max() > 1e-3
        assert (base - model(x, torch.tensor([900]), text_a)).abs().max() > 1e-3
        # A float timestep equal to an int one gives the same result; a scalar t broadcasts.
        torch.testing.assert_close(base, model(x, torch.tensor([10.0]), text_a))
        torch.testing.assert_close(base, model(x, torch.tensor(10), text_a))


def test_batch_rows_are_independent():
    model = randomize(tiny_unet()).eval()
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([1, 50, 900])
    text = text_batch(3, 5, 24, [5, 2, 3])
    with torch.no_grad():
        full = model(x, t, text)
        one = model(x[1:2], t[1:2], TextBatch(text.tokens[1:2, :2], text.mask[1:2, :2]))
    torch.testing.assert_close(full[1:2], one, atol=1e-5, rtol=0)


def test_caption_with_no_real_token_is_finite_and_ignores_its_tokens():
    model = randomize(tiny_unet()).eval()
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([5])
    empty_a = TextBatch(torch.randn(1, 3, 24), torch.zeros(1, 3, dtype=torch.bool))
    empty_b = TextBatch(torch.randn(1, 3, 24), torch.zeros(1, 3, dtype=torch.bool))
    with torch.no_grad():
        a, b = model(x, t, empty_a), model(x, t, empty_b)
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_every_parameter_gets_a_gradient():
    model = randomize(tiny_unet())
    out = model(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]), text_batch(2, 4, 24, [4, 2]))
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


@pytest.mark.parametrize("size,channels,blocks", [(32, (16, 32, 48), 1), (32, (16, 32, 48), 2),
                                                  (64, (16, 32, 32, 48), 1)])
def test_narrow_upsample(size, channels, blocks):
    """narrow_upsample: every upsample maps to the width of the level it enters, so each
    level's first block on the way up reads that width plus its (concatenated) skip; the
    downward path is unchanged, and the net still trains end to end."""
    kwargs = dict(channels=list(channels), num_res_blocks=blocks)
    wide, narrow = tiny_unet(size, **kwargs), randomize(tiny_unet(size, narrow_upsample=True, **kwargs))
    ups = [b for b in narrow.up if type(b).__name__ == "Upsample"]
    assert [u.conv.out_channels for u in ups] == list(reversed(channels[:-1]))
    assert [u.conv.out_channels for u in wide.up if type(u).__name__ == "Upsample"] == \
        list(reversed(channels[1:]))
    after = [narrow.up[i + 1].res.conv1.in_channels for i, b in enumerate(narrow.up)
             if type(b).__name__ == "Upsample"]
    # The skip a level's first up block reads is the output of the downsample into the
    # level below, i.e. this level's width.
    assert after == [2 * c for c in reversed(channels[:-1])]
    assert sum(p.numel() for p in narrow.parameters()) < sum(p.numel() for p in wide.parameters())
    assert_trains_end_to_end(narrow, size)


def test_timestep_embedding_is_sinusoidal():
    emb = timestep_embedding(torch.tensor([0, 7]), 6)
    assert emb.shape == (2, 6)
    torch.testing.assert_close(emb[0], torch.tensor([1.0, 1, 1, 0, 0, 0]))
    freqs = torch.tensor([1.0, 10000 ** (-1 / 3), 10000 ** (-2 / 3)])
    torch.testing.assert_close(emb[1], torch.cat([torch.cos(7 * freqs), torch.sin(7 * freqs)]))


def test_bad_forward_inputs():
    model = tiny_unet()
    x, t, text = torch.randn(2, 3, 16, 16), torch.tensor([1, 2]), text_batch(2, 4, 24, [4, 4])
    with pytest.raises(ValueError, match="x must be"):
        model(torch.randn(2, 3, 32, 32), t, text)
    with pytest.raises(ValueError, match="text.tokens"):
        model(x, t, text_batch(2, 4, 25, [4, 4]))
    with pytest.raises(ValueError, match="text.tokens"):
        model(x, t, text_batch(3, 4, 24, [4, 4, 4]))
    with pytest.raises(ValueError, match="t must be"):
        model(x, torch.tensor([1, 2, 3]), text)


def test_self_attention_only_where_asked():
    """A cross-attention-only block has no self-attention weights and computes exactly what
    a full block computes when its self-attention's output projection is zero."""
    full = randomize(tiny_unet(self_attn_resolutions=None)).eval()
    cross_only = tiny_unet(self_attn_resolutions=[8]).eval()
    names = {n for n, _ in cross_only.named_parameters()}
    assert {n for n, _ in full.named_parameters()} - names  # the 16x16 blocks lost qkv/out_self
    assert any("qkv" in n for n in names)  # the 8x8 blocks kept theirs
    cross_only.load_state_dict({k: v for k, v in full.state_dict().items() if k in names})
    text = text_batch(2, 5, 24, [5, 2])
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([9, 400])
    with torch.no_grad():
        differs = (full(x, t, text) - cross_only(x, t, text)).abs().max()
        for name, p in full.named_parameters():
            if "out_self" in name and name not in names:
                p.zero_()
        torch.testing.assert_close(cross_only(x, t, text), full(x, t, text))
    assert differs > 1e-3  # the removed self-attention did matter before it was zeroed


def test_position_embedding_breaks_translation_symmetry():
    """Without position embeddings, a net of circular convs and attention is translation
    equivariant: rolling the input rolls the output. A learned per-pixel embedding is the
    only thing that can break that, so with one the rolled output differs."""
    def circular(model):
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d) and m.padding == (1, 1) and m.stride == (1, 1):
                m.padding_mode = "circular"
        return model

    # One level: no stride-2 downsampling, whose grid alignment would break equivariance.
    kwargs = dict(channels=[16], attn_resolutions=[16])
    plain = circular(randomize(tiny_unet(**kwargs))).eval()
    with_pos = circular(randomize(tiny_unet(position_embedding=True, **kwargs))).eval()
    with_coords = circular(randomize(tiny_unet(coord_channels=True, **kwargs))).eval()
    assert tuple(with_pos.down[0].attn.pos.shape) == (1, 16 * 16, 16)
    assert with_coords.conv_in.in_channels == 5
    x, t, text = torch.randn(1, 3, 16, 16), torch.tensor([50]), text_batch(1, 4, 24, [4])
    with torch.no_grad():
        for model, equivariant in ((plain, True), (with_pos, False), (with_coords, False)):
            rolled_out = model(x, t, text).roll(3, dims=-1)
            out_of_rolled = model(x.roll(3, dims=-1), t, text)
            assert torch.allclose(rolled_out, out_of_rolled, atol=1e-4) == equivariant


def test_coordinate_channels_are_pixel_centres():
    c = coordinate_channels(4)
    assert c.shape == (1, 2, 4, 4)
    torch.testing.assert_close(c[0, 0, 2], torch.tensor([-0.75, -0.25, 0.25, 0.75]))  # x along a row
    torch.testing.assert_close(c[0, 1, :, 3], torch.tensor([-0.75, -0.25, 0.25, 0.75]))  # y down a column
    assert not [k for k in tiny_unet(coord_channels=True).state_dict() if "coords" in k]  # never stored


def test_sinusoidal_positions_tell_every_pixel_apart():
    """Amplitude ~1 (like the normalised features it joins), every pixel a distinct code, and
    mirrored pixels (left/right, top/bottom) distinct too: "left of" must be readable."""
    size, channels = 8, 32
    code = sinusoidal_positions(size, channels)[0]  # [64, 32]
    assert code.shape == (size * size, channels)
    assert code.abs().max() <= 1.0 and 0.5 < code.std() < 1.0
    dist = torch.cdist(code, code) + torch.eye(size * size) * 1e3
    assert dist.min() > 0.1
    grid = code.reshape(size, size, channels)
    assert (grid[:, 0] - grid[:, -1]).abs().max() > 1.0  # left column vs right column
    assert (grid[0] - grid[-1]).abs().max() > 1.0  # top row vs bottom row
    model = tiny_unet(position_embedding=True, position_init="sinusoidal")
    torch.testing.assert_close(model.down[0].attn.pos.data, sinusoidal_positions(16, 16))
    assert model.down[0].attn.pos.requires_grad  # an initialisation, still learned


def test_training_attention_path_matches_the_flash_kernel():
    """attention() takes its explicit path when training on CPU in bf16: same values and
    gradients as the default kernel, with and without a padding mask."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 16, 8, generator=g).bfloat16().requires_grad_()
               for _ in range(3))
    mask = torch.ones(2, 1, 1, 16, dtype=torch.bool)
    mask[0, ..., 10:] = False
    for m in (None, mask):
        out = attention(q, k, v, m)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
        with torch.no_grad():  # no grad: the default (flash) kernel
            ref = attention(q, k, v, m)
        ref_grads = torch.autograd.grad(
            torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m).square().sum(),
            (q, k, v))
        torch.testing.assert_close(out.detach(), ref, rtol=2e-2, atol=2e-2)
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a.float(), b.float(), rtol=5e-2, atol=5e-2)
