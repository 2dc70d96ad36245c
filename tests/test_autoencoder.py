"""The latent space behind the one model interface: a frozen AutoencoderKL (the tiny random
stand-in for the SD VAE, tests/conftest.py) encodes before the objective and decodes after
sampling, so TextToImage still takes and returns RGB images in [-1, 1]; the backbone is built
for the 4 x S/8 x S/8 grid; the VAE is neither trained nor checkpointed; a config names it."""
import pytest
import torch

from tti.config.errors import ConfigError
from tti.config.load import load_config
from tti.models.autoencoder import AutoencoderError, check_autoencoder, load_autoencoder
from tti.models.text_to_image import build, load_trainable_state, trainable_state

SMALL = ["model.unet.channels=[16, 32]", "model.unet.attn_resolutions=[16]",
         "model.unet.head_dim=16", "model.unet.num_res_blocks=1", "text.name=packaged-minilm",
         "model.gaussian.timesteps=100"]
CAPTIONS = ["a red circle to the left of a blue square", "a green triangle"]


def latent_config(vae, *extra):
    return load_config("configs/coco256_latent_frozen_roberta.yaml",
                       SMALL + [f"model.autoencoder={vae}", *extra])


def test_encode_decode_shapes(tiny_vae):
    vae = load_autoencoder(tiny_vae)
    images = torch.rand(3, 3, 256, 256) * 2 - 1
    moments = vae.moments(images)
    assert moments.shape == (3, 8, 32, 32) and moments.dtype == torch.float32
    assert (moments[:, 4:] > 0).all()  # the second half is a standard deviation
    decoded = vae.decode(moments[:, :4] * vae.scale)
    assert decoded.shape == (3, 3, 256, 256) and decoded.dtype == torch.float32
    assert vae.scale == pytest.approx(0.18215)
    assert not any(p.requires_grad for p in vae.parameters())
    assert not vae.train().training  # frozen in eval mode whatever its parent's mode


def test_a_config_names_the_autoencoder_and_the_grid_follows(tiny_vae):
    cfg = latent_config(tiny_vae)
    assert tuple(cfg.grid()) == (4, 32)
    assert cfg.model.to_dict()["autoencoder"] == tiny_vae
    pixels = load_config("configs/coco32_frozen_roberta.yaml")
    assert tuple(pixels.grid()) == (3, 32) and "autoencoder" not in pixels.model.to_dict()
    model = build(cfg)
    assert (model.image_model.image_channels, model.image_model.image_size) == (4, 32)


def test_loss_from_pixels_equals_loss_from_their_moments(tiny_vae):
    """Training from a latent store's moments is training on the images: the same draws give
    the same loss (up to the store's fp16 rounding)."""
    model = build(latent_config(tiny_vae, "model.unet.dropout=0.0"))
    images = torch.rand(2, 3, 256, 256) * 2 - 1
    moments = model.autoencoder.moments(images)
    torch.manual_seed(1)
    from_pixels = model(images, CAPTIONS)
    torch.manual_seed(1)
    from_moments = model(moments, CAPTIONS)
    torch.testing.assert_close(from_pixels, from_moments)
    torch.manual_seed(1)
    from_store = model(moments.half().float(), CAPTIONS)
    torch.testing.assert_close(from_store, from_pixels, rtol=1e-2, atol=1e-3)
    with pytest.raises(ValueError, match="RGB images .* or moments"):
        model(torch.zeros(2, 5, 32, 32), CAPTIONS)


def test_sampling_returns_decoded_rgb_images(tiny_vae):
    model = build(latent_config(tiny_vae))
    gen = torch.Generator().manual_seed(0)
    images = model.sample(CAPTIONS, gen, steps=2, guidance=2.0)
    assert images.shape == (2, 3, 256, 256) and images.dtype == torch.float32
    images, frames = model.sample(CAPTIONS[:1], torch.Generator().manual_seed(0), steps=2,
                                  return_trajectory=True)
    assert len(frames) == 2 and all(f.shape == (1, 3, 256, 256) for f in frames)


def test_the_autoencoder_is_neither_trained_nor_checkpointed(tiny_vae):
    cfg = latent_config(tiny_vae)
    model = build(cfg)
    model(torch.rand(2, 3, 256, 256) * 2 - 1, CAPTIONS).backward()
    assert all(p.grad is None for p in model.autoencoder.parameters())
    state = trainable_state(model)
    assert state and not any(k.startswith("autoencoder.") for k in state)
    load_trainable_state(build(cfg), state)  # a checkpoint's weights fit a rebuilt model


def test_a_pixel_kind_of_its_own_refuses_a_latent_space(tiny_vae):
    with pytest.raises(ConfigError, match="model.autoencoder.*models pixels itself"):
        load_config("configs/aligndraw_coco32.yaml", [f"model.autoencoder={tiny_vae}"])


def test_an_unreachable_or_misshapen_autoencoder_fails_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(AutoencoderError, match="--set model.autoencoder=/path/to/sd-vae-ft-ema"):
        check_autoencoder("stabilityai/sd-vae-ft-ema")
    with pytest.raises(AutoencoderError, match="no such folder"):
        check_autoencoder(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(AutoencoderError, match="without config.json"):
        check_autoencoder(str(tmp_path / "empty"))
    from tti.models.tiny_vae import TINY_VAE, build_tiny_vae

    three_levels = build_tiny_vae(tmp_path / "vae4x", shape=dict(
        TINY_VAE, block_out_channels=(8, 8, 16)))
    with pytest.raises(AutoencoderError, match="4x smaller"):
        load_autoencoder(three_levels)
