"""The latent store: one pass of the frozen VAE over the packed training images, memory-mapped,
keyed by the VAE's identity and the image size; it holds what the VAE gives (to fp16
rounding), is reused, resumes a SIGKILLed build where its last save was, and a latent-space
run trains from it without running the encoder, resuming bit for bit."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tti import train
from tti.data.coco import load_split
from tti.data.latent_store import (LatentCaptions, LatentStoreError, build_latent_store,
                                   store_folder)
from tti.models.autoencoder import FrozenAutoencoder, load_autoencoder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPLIT, SIZE = "train2014", 256


@pytest.fixture(scope="module")
def packed(coco_fixture, tmp_path_factory):
    """The fixture's training split packed at 256 px (23 captioned images)."""
    return load_split(coco_fixture.root, SPLIT, SIZE, cache_dir=tmp_path_factory.mktemp("cache"),
                      num_workers=0)


@pytest.fixture(scope="module")
def vae(tiny_vae):
    return load_autoencoder(tiny_vae)


@pytest.fixture(scope="module")
def clean(packed, vae, tmp_path_factory):
    """A store built in one go, with the chunking the kill test uses."""
    folder = store_folder(str(tmp_path_factory.mktemp("clean")), SPLIT, SIZE, vae.identity())
    assert build_latent_store(vae, packed, folder, chunk=2) == len(packed)
    return folder


def test_the_store_holds_what_the_vae_gives(packed, vae, clean):
    moments = np.load(os.path.join(clean, "moments.npy"))
    assert moments.shape == (len(packed), 8, 32, 32) and moments.dtype == np.float16
    images = torch.from_numpy(np.load(packed.images_path)[:5]).float() / 127.5 - 1
    live = vae.moments(images)
    torch.testing.assert_close(torch.from_numpy(moments[:5]).float(), live, rtol=2 ** -10,
                               atol=1e-4)
    meta = json.load(open(os.path.join(clean, "meta.json")))
    assert (meta["split"], meta["image_size"], meta["rows"]) == (SPLIT, SIZE, len(packed))
    assert meta["data"] == packed.fingerprint() and meta["weights"] == vae.identity()["weights"]
    assert build_latent_store(vae, packed, clean) == 0  # reused, not encoded again


def test_items_are_the_moments_with_the_datasets_caption_draw(packed, vae, clean):
    latents = LatentCaptions(packed)
    latents.use_store(clean, vae.identity())
    latents.set_epoch(3)
    for i in (0, 7, len(packed) - 1):
        moments, caption = latents[i]
        assert moments.dtype == torch.float16 and moments.shape == (8, 32, 32)
        assert caption == packed[i][1]  # the epoch's caption draw, as for pixels
    assert latents.fingerprint() == packed.fingerprint() and len(latents) == len(packed)


def test_a_store_is_keyed_by_the_vae_and_the_image_size(packed, vae, clean, tmp_path):
    torch.manual_seed(1)  # weights of its own (the tiny VAE was drawn from seed 0)
    other = FrozenAutoencoder("other", type(vae.vae).from_config(vae.vae.config))
    here = str(tmp_path)
    folders = {store_folder(here, SPLIT, SIZE, vae.identity()),
               store_folder(here, SPLIT, 128, vae.identity()),
               store_folder(here, SPLIT, SIZE, other.identity())}
    assert len(folders) == 3
    assert os.path.basename(clean).startswith(f"latents_{SPLIT}_{SIZE}px_")
    with pytest.raises(LatentStoreError, match="another autoencoder.*delete the folder"):
        build_latent_store(other, packed, clean)
    with pytest.raises(LatentStoreError, match="differ in .*weights"):
        LatentCaptions(packed).use_store(clean, other.identity())


def test_a_sigkilled_build_resumes_where_it_stopped(packed, vae, clean, tiny_vae, tmp_path):
    folder = store_folder(str(tmp_path), SPLIT, SIZE, vae.identity())
    # A hard kill: no finally block runs, only the periodic progress saves survive.
    script = f"""
import os, signal
import tti.data.latent_store as store
from tti.data.coco import CaptionDataset
from tti.models.autoencoder import FrozenAutoencoder, load_autoencoder
store.SAVE_EVERY_CHUNKS = 2
real, calls = FrozenAutoencoder.moments, []
def moments_then_die(self, images):
    if len(calls) == 5:
        os.kill(os.getpid(), signal.SIGKILL)
    calls.append(len(images))
    return real(self, images)
FrozenAutoencoder.moments = moments_then_die
store.build_latent_store(load_autoencoder({tiny_vae!r}),
                         CaptionDataset({str(packed.images_path)!r}), {folder!r}, chunk=2)
"""
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert not os.path.exists(folder)  # nothing half-written where readers look
    assert json.load(open(f"{folder}.partial/progress.json"))["done"] == 8  # 4 chunks of 2
    encoded = []
    real = FrozenAutoencoder.moments
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FrozenAutoencoder, "moments",
                      lambda self, images: encoded.append(len(images)) or real(self, images))
        assert build_latent_store(vae, packed, folder, chunk=2) == len(packed) - 8
    assert sum(encoded) == len(packed) - 8  # only what the killed build had not saved
    assert not os.path.exists(f"{folder}.partial")
    for name in ("moments.npy", "meta.json"):
        with open(os.path.join(folder, name), "rb") as a, open(os.path.join(clean, name), "rb") as b:
            assert a.read() == b.read()


def latent_run(coco_fixture, tiny_vae, results, steps: int, *extra) -> str:
    args = ["--config", os.path.join(REPO, "configs", "coco256_latent_frozen_roberta.yaml"),
            "--device", "cpu"]
    for item in [f"data.root={coco_fixture.root}", f"run.results_dir={results}",
                 f"model.autoencoder={tiny_vae}", "text.name=packaged-minilm",
                 "model.unet.channels=[16, 32]", "model.unet.attn_resolutions=[16]",
                 "model.unet.head_dim=16", "model.unet.num_res_blocks=1", "data.num_workers=0",
                 "train.batch_size=4", f"train.steps={steps}", "train.ckpt_every=2",
                 "train.deterministic=true", *extra]:
        args += ["--set", item]
    return train.main(args)


def test_training_reads_latents_and_resumes_exactly(coco_fixture, tiny_vae, tmp_path, monkeypatch):
    encoded = []
    real = FrozenAutoencoder.moments
    monkeypatch.setattr(FrozenAutoencoder, "moments",
                        lambda self, images: encoded.append(len(images)) or real(self, images))
    cache = f"data.cache_dir={tmp_path / 'cache'}"  # a store of its own, built here
    straight = latent_run(coco_fixture, tiny_vae, tmp_path / "straight", 3, cache)
    index = tmp_path / "cache" / f"{SPLIT}_{SIZE}px.json"
    rows = json.loads(index.read_text())["num_images"]
    assert sum(encoded) == rows  # the store's one pass; no training step ran the encoder
    log = open(os.path.join(straight, "log.txt")).read()
    assert f"{rows} images encoded" in log and "training FLOPs per image" in log
    latent_run(coco_fixture, tiny_vae, tmp_path / "resumed", 2, cache)
    resumed = latent_run(coco_fixture, tiny_vae, tmp_path / "resumed", 3, cache)
    assert sum(encoded) == rows  # the second and third runs reused the store
    a, b = (torch.load(os.path.join(run, "checkpoints", "latest.pt"), weights_only=False)
            for run in (straight, resumed))
    assert b["step"] == 3 and set(a["model"]) == set(b["model"])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
