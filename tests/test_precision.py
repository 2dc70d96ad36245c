"""Mixed precision: which autocast dtype "auto" picks, and bf16 sampling through the model."""
import pytest
import torch

from tiny_run import train_tiny_run
from tti.infra.precision import amp_dtype
from tti.models.text_to_image import load_for_inference


def test_explicit_precisions_and_bad_value():
    assert amp_dtype("fp32", "cpu") is None
    assert amp_dtype("bf16", "cpu") is torch.bfloat16
    assert amp_dtype("fp16", "cuda") is torch.float16
    assert amp_dtype("auto", "cuda") is torch.bfloat16
    with pytest.raises(ValueError, match="precision must be one of"):
        amp_dtype("fp8", "cpu")


@pytest.mark.parametrize("avx512_bf16,amx,expected", [
    (True, False, torch.bfloat16), (False, True, torch.bfloat16), (False, False, None)])
def test_auto_on_cpu_uses_bf16_only_with_native_instructions(monkeypatch, avx512_bf16, amx,
                                                              expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert amp_dtype("auto", "cpu") is expected


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return train_tiny_run(tmp_path_factory)


def test_bf16_sampling_returns_fp32_images_close_to_fp32_sampling(tiny_run):
    images = {}
    for precision in ("fp32", "bf16"):
        model, cfg = load_for_inference(tiny_run, "cpu", precision=precision)
        torch.manual_seed(0)  # the same random weights for both: a 2-step model outputs ~0
        with torch.no_grad():
            for p in model.image_model.parameters():
                p.normal_(0.0, 0.05)
        gen = torch.Generator().manual_seed(1)
        images[precision] = model.sample(["a large red circle", "a small blue square"], gen,
                                         **model.sampler_options(cfg))
    fp32, bf16 = images["fp32"], images["bf16"]
    assert bf16.dtype == torch.float32 and bf16.shape == fp32.shape == (2, 3, 32, 32)
    assert bf16.abs().max() <= 1.0
    diff = (bf16 - fp32).abs()
    assert diff.max() > 0  # autocast really ran the network in bf16
    assert diff.mean() < 0.05  # ...and bf16 rounding stays small next to the [-1, 1] range
