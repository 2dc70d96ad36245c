"""alignDRAW through the shared train/sample stack (model.kind: aligndraw) on a tiny shapes set:
the logged loss is the negative bound and falls, resume is exact, two-process DDP runs,
the sample CLI writes a grid and a T-frame GIF, and a checkpoint alone rebuilds the model."""
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

from tti import sample, train
from tti.models.aligndraw.model import AlignDraw
from tti.config.errors import ConfigError
from tti.config.load import load_config
from tti.data.coco import load_split
from tti.data.shapes import write_coco
from tti.models.text_to_image import build, load_for_inference, to_model_range
from tti.text.vocab import WordVocab, WordVocabEncoder

CONFIG = "configs/aligndraw_shapes32.yaml"
DRAW_STEPS = 4
TINY_MODEL = (f"model.aligndraw.overrides={{draw_steps: {DRAW_STEPS}, read_n: 3, write_n: 4, "
              "word_dim: 8, lang_dim: 8, align_dim: 16, latent_dim: 8, enc_dim: 32, dec_dim: 32}")
TINY = [
    "data.shapes_train=96", "data.shapes_val=16", "data.num_workers=0", TINY_MODEL,
    "train.batch_size=16", "train.log_every=1", "train.sample_every=1000",
    "train.eval_samples=0", "train.deterministic=true",
    "sample.captions=['a large red circle', 'a small blue square']",
]


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny recurrent ops: a second thread only spin-waits on the shared 2-core machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    write_coco(str(root), n_train=96, n_val=16, image_size=32, seed=0)
    return str(root)


def overrides(shapes_root, results, *extra):
    return [f"data.root={shapes_root}", f"run.results_dir={results}", *TINY, *extra]


def run(shapes_root, results, *extra):
    args = ["--config", CONFIG, "--device", "cpu"]
    for item in overrides(shapes_root, results, *extra):
        args += ["--set", item]
    return train.main(args)


def logged_losses(run_dir):
    with open(os.path.join(run_dir, "log.txt")) as f:
        return [float(m.group(1)) for m in re.finditer(r"^step \d+ loss=([0-9.eE+-]+)", f.read(), re.M)]


def latest(run_dir):
    return torch.load(os.path.join(run_dir, "checkpoints", "latest.pt"), weights_only=True)


def test_config_builds_aligndraw_and_bad_overrides_name_the_key(shapes_root, tmp_path):
    cfg = load_config(CONFIG, overrides(shapes_root, tmp_path))
    model = build(cfg, train_captions=["a large red circle", "a small blue square"])
    assert isinstance(model.image_model, AlignDraw) and isinstance(model.text, WordVocabEncoder)
    assert model.image_model.draw_steps == DRAW_STEPS
    assert cfg.text.caption_dropout == 0.0  # no guidance in alignDRAW: never drop a caption
    for bad in ("model.aligndraw.overrides.latent=8", "model.aligndraw.overrides.image_size=16"):
        with pytest.raises(ConfigError, match="model.aligndraw.overrides"):
            build(load_config(CONFIG, [bad]), train_captions=["a red circle"])


def test_training_loss_is_the_negative_bound_in_nats_per_image(shapes_root, tmp_path):
    """With no writes (canvas 0 -> every pixel p = 1/2) and q = p = N(0, I) at every step,
    -bound = 3 * 32 * 32 * ln 2 nats per image exactly, whatever the images and batch size."""
    cfg = load_config(CONFIG, overrides(shapes_root, tmp_path))
    train_set = load_split(shapes_root, "train2014", 32)
    captions = [train_set.captions(i)[0] for i in range(5)]
    model = build(cfg, train_captions=captions)
    g = model.image_model
    with torch.no_grad():
        for layer in (g.write_patch, g.posterior, g.prior_mu, g.prior_logsigma):
            layer.weight.zero_()
            layer.bias.zero_()
    images = to_model_range(torch.stack([train_set[i][0] for i in range(5)]))
    loss = model(images, captions)  # what tti.train logs as `loss` (grad_accum 1)
    torch.testing.assert_close(loss, torch.tensor(3 * 32 * 32 * math.log(2)))
    torch.testing.assert_close(g.last_terms["kl"], torch.tensor(0.0))
    torch.testing.assert_close(loss, g.last_terms["recon"] + g.last_terms["kl"])


def test_loss_falls(shapes_root, tmp_path):
    run_dir = run(shapes_root, tmp_path, "train.steps=40", "train.lr=1e-2", "train.ckpt_every=40")
    losses = logged_losses(run_dir)
    assert len(losses) == 40 and all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.6 * first, (first, last)  # ~0.4 seen: it learns the black background first


def test_resume_continues_identically(shapes_root, tmp_path):
    straight = run(shapes_root, tmp_path / "a", "train.steps=6", "train.ckpt_every=3")
    # Same run, stopped after its step-3 checkpoint, then restarted to step 6.
    run(shapes_root, tmp_path / "b", "train.steps=3", "train.ckpt_every=3")
    resumed = run(shapes_root, tmp_path / "b", "train.steps=6", "train.ckpt_every=3")
    a, b = latest(straight), latest(resumed)
    assert a["step"] == b["step"] == 6
    assert a["text_vocab"] == b["text_vocab"]
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in a["ema"]["shadow"]:
        assert torch.equal(a["ema"]["shadow"][k], b["ema"]["shadow"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    assert logged_losses(straight)[3:] == logged_losses(resumed)[3:]
    assert "resumed from" in open(os.path.join(resumed, "log.txt")).read()


def test_ddp_two_processes(shapes_root, tmp_path):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("this torch build has no torch.distributed gloo backend, so no CPU DDP")
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun is not on PATH (install torch's console scripts to run CPU DDP)")
    steps = 3
    cmd = ["torchrun", "--standalone", "--nproc_per_node=2", "-m", "tti.train",
           "--config", CONFIG, "--device", "cpu"]
    for item in overrides(shapes_root, tmp_path, f"train.steps={steps}", "train.ckpt_every=3"):
        cmd += ["--set", item]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=os.getcwd())
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = os.path.join(str(tmp_path), "shapes32_aligndraw", "0")
    state = latest(run_dir)
    assert state["step"] == steps and state["world_size"] == 2
    assert len(state["rng"]) == 2  # each rank's RNG, for exact resume
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])  # own z streams
    losses = logged_losses(run_dir)
    assert len(losses) == steps and all(math.isfinite(x) for x in losses)
    assert "world size 2" in open(os.path.join(run_dir, "log.txt")).read()
    model, _ = load_for_inference(run_dir)
    assert model.sample(["a large red circle"], torch.Generator().manual_seed(0)).shape == (1, 3, 32, 32)


def test_sample_cli_gif_has_t_frames_and_checkpoint_alone_rebuilds(tmp_path):
    # Private data, deleted before sampling: the checkpoint must carry everything.
    root = str(tmp_path / "data")
    write_coco(root, n_train=96, n_val=16, image_size=32, seed=0)
    train_captions = [c for i in range(96) for c in load_split(root, "train2014", 32).captions(i)]
    run_dir = run(root, tmp_path / "runs", "train.steps=2", "train.ckpt_every=2")
    shutil.rmtree(root)
    model, cfg = load_for_inference(run_dir)
    assert cfg.model.kind == "aligndraw"
    assert model.text.vocab == WordVocab.build(train_captions)
    assert model.text.vocab.encode("a large red circle")[0] != model.text.vocab.unk_id
    state = latest(run_dir)
    for name, p in model.named_parameters():  # EMA weights by default
        assert torch.equal(p, state["ema"]["shadow"][name]), name

    out, gif = tmp_path / "grid.png", tmp_path / "canvas.gif"
    argv = ["--checkpoint", run_dir, "--caption", "a large green triangle",
            "--caption", "a small red circle above a large blue square", "--n", "3",
            "--steps", "4", "--guidance", "2", "--device", "cpu"]  # diffusion options: ignored
    sample.main(argv + ["--out", str(out), "--gif", str(gif)])
    grid = Image.open(out)
    assert grid.size[0] > 3 * 64 and grid.size[1] >= 2 * 64
    assert Image.open(gif).n_frames == DRAW_STEPS  # one frame per canvas update
    out2 = tmp_path / "grid2.png"
    sample.main(argv + ["--out", str(out2)])
    assert list(Image.open(out2).getdata()) == list(grid.getdata())  # same seed, same pixels
