"""Bad runs: a NaN loss stops training naming the step and keeps the last good checkpoint,
train.max_bad_steps skips a bounded number of bad steps, a step the fp16 loss scaler skips
leaves the EMA alone, unreadable images are counted in the training log, and a bad config
fails before any file or data is touched."""
import os
import re

import pytest
import torch
from test_train import TINY

from tti import train
from tti.training import loop, setup
from tti.infra import distributed
from tti.infra.checkpoints import load_checkpoint
from tti.config.errors import ConfigError
from tti.config.load import load_config
from tti.data.shapes import write_coco
from tti.models.text_to_image import TextToImage, build
from tti.training.run_log import RunLog
from tti.training.state import make_train_state

NAN_AT_STEP = 4  # 1-based, as the log counts steps


@pytest.fixture(scope="module")
def shapes_with_a_bad_image(tmp_path_factory):
    """The tiny shapes set with one training PNG cut in half."""
    root = tmp_path_factory.mktemp("shapes_bad")
    write_coco(str(root), n_train=96, n_val=16, image_size=32, seed=0)
    victim = sorted((root / "train2014").iterdir())[5]
    victim.write_bytes(victim.read_bytes()[:200])
    return str(root), str(victim)


def inject_nan(monkeypatch, at_step):
    """The training loss becomes NaN (and so do its gradients) at optimizer step `at_step`."""
    calls = {"n": 0}
    forward = TextToImage.forward

    def nan_once(self, images, captions):
        calls["n"] += 1
        loss = forward(self, images, captions)
        return loss * float("nan") if calls["n"] == at_step else loss
    monkeypatch.setattr(TextToImage, "forward", nan_once)


def run(root, results, *extra):
    args = ["--config", "configs/shapes32.yaml", "--device", "cpu", "--set", f"data.root={root}",
            "--set", f"run.results_dir={results}", "--set", "data.max_bad_fraction=0.05"]
    for item in TINY + list(extra):
        args += ["--set", item]
    return train.main(args)


def finite(weights: dict) -> bool:
    return all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def test_nan_loss_stops_with_the_step_and_keeps_last_good_checkpoint(
        shapes_with_a_bad_image, tmp_path, monkeypatch):
    inject_nan(monkeypatch, NAN_AT_STEP)
    with pytest.raises(loop.NonFiniteLossError, match=f"at step {NAN_AT_STEP}") as info:
        run(shapes_with_a_bad_image[0], tmp_path, "train.steps=6", "train.ckpt_every=3")
    run_dir = os.path.join(tmp_path, "shapes32_diffusion", "0")
    latest = os.path.join(run_dir, "checkpoints", "latest.pt")
    assert latest in str(info.value)
    state = load_checkpoint(latest)
    assert state["step"] == 3 and finite(state["model"]) and finite(state["ema"]["shadow"])
    assert sorted(os.listdir(os.path.dirname(latest))) == ["0000003.pt", "latest.pt"]
    log = open(os.path.join(run_dir, "log.txt")).read()
    assert f"step {NAN_AT_STEP}: non-finite loss" in log


@pytest.fixture(scope="module")
def run_skipping_one_bad_step(shapes_with_a_bad_image, tmp_path_factory):
    with pytest.MonkeyPatch.context() as monkeypatch:
        inject_nan(monkeypatch, NAN_AT_STEP)
        return run(shapes_with_a_bad_image[0], tmp_path_factory.mktemp("skip"), "train.steps=6",
                   "train.ckpt_every=6", "train.max_bad_steps=1")


def test_max_bad_steps_skips_the_step_and_completes(run_skipping_one_bad_step):
    state = load_checkpoint(run_skipping_one_bad_step)
    assert state["step"] == 6 and state["bad_steps"] == 1
    assert state["ema"]["updates"] == 5  # the bad step changed nothing
    assert finite(state["model"]) and finite(state["ema"]["shadow"])
    log = open(os.path.join(run_skipping_one_bad_step, "log.txt")).read()
    assert f"step {NAN_AT_STEP}: non-finite loss or gradient, step skipped" in log
    losses = dict(re.findall(r"^step (\d+) loss=(\S+)", log, re.M))
    assert losses[str(NAN_AT_STEP)] == "nan" and losses["6"] != "nan"


def test_a_step_the_fp16_scaler_skips_leaves_the_ema_alone(tmp_path):
    """An inf gradient under fp16 (loss finite): the scaler skips the optimizer step and
    halves its scale; the EMA must not count or average that step either."""
    cfg = load_config("configs/shapes32.yaml", TINY + ["train.precision=fp16",
                                                       f"data.root={tmp_path}"])
    model = build(cfg, train_captions=[])
    info = distributed.DistInfo(0, 0, 1, torch.device("cpu"))
    state = make_train_state(cfg, model, info.device, RunLog(str(tmp_path), is_main=False))
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    batch = [(images, ["a large red circle"] * 4)]
    loop.train_step(state, model, batch, cfg, info)  # one ordinary step first
    scale, updates = state.scaler.get_scale(), state.ema.updates
    shadow = {k: v.clone() for k, v in state.ema.shadow.items()}
    weights = {k: v.clone() for k, v in model.image_model.state_dict().items()}

    first = next(p for p in model.image_model.parameters() if p.requires_grad)
    hook = first.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    loss, grad_norm, updated = loop.train_step(state, model, batch, cfg, info)
    hook.remove()
    assert torch.isfinite(loss) and not torch.isfinite(grad_norm)
    assert updated  # the scaler's own skip, not a bad step (fp16 scales are calibrated so)
    assert state.scaler.get_scale() == scale / 2  # the skip, as the scaler records it
    for k, v in model.image_model.state_dict().items():
        assert torch.equal(v, weights[k]), k  # the optimizer step was skipped...
    assert state.ema.updates == updates  # ...and so was the EMA's
    for k, v in state.ema.shadow.items():
        assert torch.equal(v, shadow[k]), k
    loop.train_step(state, model, batch, cfg, info)
    assert state.ema.updates == updates + 1  # the next good step updates it again


def test_unreadable_images_are_counted_in_the_training_log(shapes_with_a_bad_image,
                                                            run_skipping_one_bad_step):
    log = open(os.path.join(run_skipping_one_bad_step, "log.txt")).read()
    assert "data train2014: 95 images at 32px, skipped 1 unreadable images" in log
    assert f"unreadable: {shapes_with_a_bad_image[1]}" in log
    assert "data val2014: 16 images at 32px, nothing skipped" in log


@pytest.mark.parametrize("override, world_size, words", [
    ("train.bogus=1", 1, "unknown config key 'train.bogus'"),
    ("train.steps=ten", 1, "train.steps: expected an integer"),
    ("model.unet.channels=[8, 8, 8, 8, 8, 8, 8]", 1, "not divisible by the UNet's downsampling"),
    ("sample.guidance=-1", 1, "sample.guidance: must be >= 0"),
    ("train.batch_size=16", 3, "16 is not divisible by 3 processes x 1 grad_accum: use 15 or 18"),
])
def test_bad_config_fails_before_any_work(tmp_path, monkeypatch, override, world_size, words):
    if world_size > 1:  # as torchrun tells rank 0 of `world_size` processes
        for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": str(world_size)}.items():
            monkeypatch.setenv(key, value)

    def no_work(*args, **kwargs):
        raise AssertionError("the process group was joined before the config was checked")
    monkeypatch.setattr(distributed, "setup", no_work)
    root, results = tmp_path / "data", tmp_path / "results"
    with pytest.raises(ConfigError, match=re.escape(words)):
        train.main(["--config", "configs/shapes32.yaml", "--device", "cpu",
                    "--set", f"data.root={root}", "--set", f"run.results_dir={results}",
                    "--set", override])
    assert not results.exists() and not root.exists()  # no run directory, no dataset written


def test_batch_larger_than_the_training_set_fails_before_the_model_is_built(
        shapes_with_a_bad_image, tmp_path, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the batch size was checked")
    monkeypatch.setattr(setup, "build", no_model)
    with pytest.raises(ConfigError, match=re.escape("train.batch_size 128 is larger than the "
                                                    "training set (95 images)")):
        run(shapes_with_a_bad_image[0], tmp_path, "train.batch_size=128")


def test_text_encoder_truncates_a_10000_character_caption():
    from tti.text.encoder import TextEncoder

    encoder = TextEncoder("packaged-minilm", max_length=16)
    long_caption = ("a very long caption " * 500)[:9_999] + "."
    assert len(encoder.tokenizer(long_caption)["input_ids"]) > 2000  # what it would be
    text = encoder([long_caption, "a red circle", "Ein Hund läuft über die Straße — 犬 🐕 café"])
    assert tuple(text.tokens.shape) == (3, 16, encoder.dim) and text.tokens.dtype == torch.float32
    assert text.mask.sum(1).tolist()[0] == 16 and 2 < text.mask.sum(1).tolist()[1] < 16
    assert torch.isfinite(text.tokens).all()
