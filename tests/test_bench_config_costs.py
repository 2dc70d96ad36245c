"""bench/config_costs.py: a row per config; a cached encoder's states come from a text store,
so its text FLOPs are zero, as in training after the store is built."""
import pytest

from bench import config_costs


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_a_cached_encoder_costs_no_text_flops_and_the_unet_is_counted():
    row = config_costs.costs("configs/shapes32.yaml")
    assert row["config"] == "shapes32.yaml"
    assert row["text_gflops"] == 0.0
    assert 0.5 < row["gflops"] < 2.0  # a 2M-parameter UNet at 32px: about a GFLOP per image
    assert row["frozen"] > row["trainable"] > 1e6  # the frozen MiniLM outweighs the lean UNet


def test_a_live_encoder_counts_its_forward():
    row = config_costs.costs("configs/coco32_cpu.yaml")
    assert 0.0 < row["text_gflops"] < row["gflops"]
