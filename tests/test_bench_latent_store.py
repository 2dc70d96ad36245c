"""bench/latent_store.py end to end with the tiny VAE: the store's bytes per image are the fp16
moments of a 4 x 32 x 32 latent (plus its small header and meta), and both ways of getting a
step's latents are timed inside the step."""
import re

from bench import latent_store


def test_the_bench_measures_the_store_and_both_ways(capsys):
    latent_store.main(["--vae", "tiny", "--images", "10", "--batch", "4", "--steps", "1",
                       "--warmup", "0", "--skip-flops"])
    out = capsys.readouterr().out
    per_image = int(re.search(r"bytes per image: (\d+)", out).group(1))
    assert 2 * 4 * 32 * 32 * 2 < per_image < 2 * 4 * 32 * 32 * 2 + 100  # fp16 mean and std
    assert "COCO 2014 train (82783 images)" in out
    for way in ("latent store", "live encoder"):
        assert re.search(rf"{way} +[\d.]+ ms/step  getting z +[\d.]+ ms = +[\d.]+% of the step", out)
