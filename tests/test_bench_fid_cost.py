"""bench/fid_cost.py's FLOP accounting on a tiny config: a sampled image costs sample.steps
UNet forwards (two images' worth under guidance) plus one encoder forward, and a frozen
encoder run every step adds that forward to each training image."""
import os

import pytest

from bench.fid_cost import rows_for, text_encoder
from tti.config.load import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["model.unet.channels=[16, 32]", "model.unet.attn_resolutions=[16]",
        "model.unet.self_attn_resolutions=[16]", "model.unet.head_dim=16", "model.unet.text_layers=0",
        "train.fid_every=10", "train.fid_samples=20", "train.batch_size=8"]


def tiny_rows(encoder, *extra):
    cfg = load_config(os.path.join(REPO, "configs", "shapes32.yaml"), TINY + list(extra))
    return {r["encoder"]: r for r in rows_for(cfg, [8], inception=0.0, encoder=encoder)}


def test_sampling_flops_follow_steps_and_guidance_and_training_pays_the_encoder():
    encoder = text_encoder(load_config(os.path.join(REPO, "configs", "shapes32.yaml")).text)
    guided = tiny_rows(encoder, "sample.steps=4", "sample.guidance=2.0")
    plain = tiny_rows(encoder, "sample.steps=4", "sample.guidance=1.0")
    longer = tiny_rows(encoder, "sample.steps=8", "sample.guidance=1.0")
    stored, every_step = guided["frozen, text store"], guided["frozen, run every step"]
    encode = every_step["train_gflop"] - stored["train_gflop"]  # one encoder forward
    assert encode > 0
    unet_steps = plain["frozen, text store"]["sample_gflop"] - encode
    assert guided["frozen, text store"]["sample_gflop"] - encode == pytest.approx(2 * unet_steps)
    assert longer["frozen, text store"]["sample_gflop"] - encode == pytest.approx(2 * unet_steps)
    # A check of 20 images every 10 steps of 8 images: 20 x sample / (80 x train).
    assert stored["share"] == pytest.approx(20 * stored["sample_gflop"] / (80 * stored["train_gflop"]))
