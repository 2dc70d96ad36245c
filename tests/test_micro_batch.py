"""train.micro_batch: the config rules, the search against a memory oracle (a fake device
that "fits up to N"), and a run under `auto` that trains bit for bit like the explicit
micro-batch it picked, at the same global batch.

What "the same" can mean: a run at micro-batch 4 x 4 accumulation and one at 16 x 1 see
the same images per step but cannot agree bit for bit: the loss draws each micro-batch's
timesteps and noise from the global stream in turn (t1, noise1, t2, noise2 is not t,
noise), and gradients summed over micro-batches round differently from one large batch.
tests/test_ddp.py shows those agree to float rounding once the noise is keyed to the
sample. What must hold exactly is that `auto` itself changes nothing: its search leaves
every random stream, gradient and buffer as it found them, so `auto` picking m trains
exactly as `micro_batch: m` does. That is tested here, bit for bit.
"""
import json
import os
import re

import pytest
import torch
from fake_gpu import FakeGPU
from test_train import run, shapes_root  # noqa: F401  (a module fixture: the 96/16-image shapes set)

from tti.config.errors import ConfigError
from tti.config.load import load_config
from tti.config.resume import APPLIED, FIXED, policy
from tti.config.rules import validate
from tti.training import loop
from tti.training.micro_batch_search import largest_fitting, search_micro_batch

COCO_GPU_CONFIGS = ["coco32_frozen_roberta", "coco32_ft_roberta", "coco64_frozen_roberta",
                    "coco64_ft_roberta"]


# ---------------------------------------------------------------- config


def test_coco_gpu_configs_ship_auto_and_the_others_keep_their_split():
    for name in COCO_GPU_CONFIGS:
        assert load_config(f"configs/{name}.yaml").train.micro_batch == "auto", name
    for name in ("shapes32", "shapes32_long", "coco32_cpu", "aligndraw_shapes32"):
        cfg = load_config(f"configs/{name}.yaml")
        assert cfg.train.micro_batch is None
        assert cfg.micro_batch(1) == cfg.train.batch_size // cfg.train.grad_accum
    assert policy("train.micro_batch")[0] == APPLIED and policy("train.batch_size")[0] == FIXED


@pytest.mark.parametrize("sets, world, micro", [
    (["train.micro_batch=8"], 2, 8),       # 32 / 2 processes = 16 = 2 x 8
    (["train.micro_batch=auto"], 4, 8),    # auto states the config's own split: 32 / 4
    (["train.micro_batch=null", "train.grad_accum=2"], 2, 8),
])
def test_a_micro_batch_sets_the_split(sets, world, micro):
    cfg = load_config("configs/shapes32.yaml", sets)
    validate(cfg, world_size=world)
    assert cfg.micro_batch(world) == micro


@pytest.mark.parametrize("sets, world, message", [
    (["train.micro_batch=6"], 1, "train.micro_batch: 6 does not divide 32, the images per "
     "process per step (train.batch_size 32 over 1 process): use 4 or 8, or auto"),
    (["train.micro_batch=32"], 2, "32 does not divide 16, the images per process per step "
     "(train.batch_size 32 over 2 processes): use 16, or auto"),
    (["train.micro_batch=auto", "train.batch_size=30"], 4,
     "train.batch_size: 30 is not divisible by 4 processes: use 28 or 32"),
    (["train.micro_batch=big"], 1, "must be auto, a number of images >= 1, or null, got 'big'"),
    (["train.micro_batch=0"], 1, "must be auto, a number of images >= 1, or null, got 0"),
    (["train.micro_batch=2.5"], 1, "train.micro_batch: expected an integer or a string, got 2.5"),
    (["train.micro_batch=auto", "train.grad_accum=2"], 1,
     "train.grad_accum: 2 and train.micro_batch=auto both set how the batch splits"),
])
def test_a_split_that_does_not_divide_names_the_valid_values(sets, world, message):
    with pytest.raises(ConfigError) as refused:
        validate(load_config("configs/shapes32.yaml", sets), world_size=world)
    assert message in str(refused.value) and "\n" not in str(refused.value)


# ---------------------------------------------------------------- the search


@pytest.mark.parametrize("per_process", [1, 12, 16, 96, 128])
def test_search_finds_the_largest_divisor_that_fits_in_few_probes(per_process):
    for fits_up_to in range(0, per_process + 3):
        probed = []
        found = largest_fitting(per_process, lambda m: probed.append(m) or m <= fits_up_to)
        assert found == max((d for d in range(1, per_process + 1)
                             if per_process % d == 0 and d <= fits_up_to), default=0)
        assert len(probed) == len(set(probed))  # no size probed twice
        assert len(probed) <= 2 * per_process.bit_length() + 1, probed


class Oracle:
    """A device of 100 units whose probe of m images peaks at 15 + 10 m."""
    def budget(self): return 100
    def total(self): return 110
    def measure(self, micro, probe): probe(); return 15 + 10 * micro
    def release(self): pass


def test_search_counts_the_memory_training_adds_after_the_probe():
    """With 20 more units to come (AdamW's moments), 6 images fit (15 + 60 + 20 = 95), 7 do
    not, and among the divisors of 12 that makes 6."""
    seen = []
    found = search_micro_batch(torch.nn.Linear(2, 2), 12, seen.append, Oracle(), pending=20,
                               device=torch.device("cpu"))
    assert found.micro == 6 and seen == [1, 2, 4, 12, 6]
    assert "fits 6" in found.describe() and "12 (too large)" in found.describe()


def test_search_leaves_random_streams_gradients_and_buffers_as_they_were():
    model = torch.nn.BatchNorm1d(4)  # buffers a forward pass in training mode changes
    running_mean = model.running_mean.clone()
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)

    def probe(micro):  # draws randomness, moves buffers, leaves gradients, then runs out
        model(torch.randn(micro + 1, 4)).sum().backward()
        if micro > 3:
            raise torch.OutOfMemoryError("fake")
    found = search_micro_batch(model, 8, probe, Oracle(), 0, torch.device("cpu"))
    assert found.micro == 2 and found.peaks == {1: 25, 2: 35, 4: None}
    assert torch.equal(torch.rand(3), expected)
    assert torch.equal(model.running_mean, running_mean)
    assert all(p.grad is None for p in model.parameters())


def test_the_cuda_oracle_budgets_free_memory_plus_its_own_cache_less_the_margin(monkeypatch):
    """What CudaMemory reads from a GPU (patched: no GPU here): 80 GiB, 50 free, 10 held in
    this process's cache -> a budget of 50 + 10 - 8 GiB; a probe's peak is the allocator's."""
    from tti.training.micro_batch_search import CudaMemory

    gib, calls = 2 ** 30, []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (50 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 10 * gib)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: calls.append("reset"))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device: calls.append("sync"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 33 * gib)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty"))
    oracle = CudaMemory(torch.device("cuda", 0), margin=0.1)
    assert oracle.budget() == 52 * gib and oracle.total() == 80 * gib
    assert oracle.measure(8, lambda: calls.append("probe")) == 33 * gib
    oracle.release()
    assert calls == ["reset", "probe", "sync", "empty"]


# ---------------------------------------------------------------- a run under auto


def recorded_losses(monkeypatch) -> list:
    """Every step's loss, as the exact float tti.train sums it, recorded from train_step."""
    losses, step = [], loop.train_step

    def recording(*args, **kwargs):
        out = step(*args, **kwargs)
        losses.append(out[0].item())
        return out
    monkeypatch.setattr(loop, "train_step", recording)
    return losses


def history(run_dir):
    with open(os.path.join(run_dir, "history.jsonl")) as f:
        return [json.loads(line) for line in f]


def final_weights(run_dir):
    state = torch.load(os.path.join(run_dir, "checkpoints", "latest.pt"), weights_only=False)
    return state["model"], state["ema"]["shadow"]


def test_auto_trains_bit_for_bit_like_the_micro_batch_it_picked(shapes_root, tmp_path,
                                                                monkeypatch):
    steps = ("train.steps=3", "train.ckpt_every=3")
    with monkeypatch.context() as patch:
        gpu = FakeGPU(fits_up_to=5).install(patch.setattr)
        auto_losses = recorded_losses(patch)
        auto = run(shapes_root, tmp_path / "auto", "train.micro_batch=auto", *steps)
    # global batch 16: divisors 1, 2, 4, 8 (out of memory), then bisection has nothing left
    assert gpu.probed == [1, 2, 4, 8] and gpu.releases == 1
    assert set(gpu.forwards[len(gpu.probed):]) == {4}  # every training forward pass: 4 images
    log = open(os.path.join(auto, "log.txt")).read()
    assert re.search(r"micro-batch search on cpu \(rank 0\): fits 4 \(.*8 \(too large\)", log)
    assert ("batch: micro-batch 4 x 4 accumulation steps x 1 process = global batch 16 "
            "(train.micro_batch=auto: the largest that fits every rank's GPU)") in log
    assert {k: history(auto)[0][k] for k in ("micro_batch", "grad_accum")} == {
        "micro_batch": 4, "grad_accum": 4}

    with monkeypatch.context() as patch:
        explicit_losses = recorded_losses(patch)
        explicit = run(shapes_root, tmp_path / "explicit", "train.micro_batch=4", *steps)
    assert len(auto_losses) == 3 and auto_losses == explicit_losses  # exact floats
    for a, b in zip(final_weights(auto), final_weights(explicit)):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "(train.micro_batch=4)" in open(os.path.join(explicit, "log.txt")).read()


def test_auto_on_a_cpu_takes_the_configs_split_and_says_so(shapes_root, tmp_path):
    run_dir = run(shapes_root, tmp_path, "train.micro_batch=auto", "train.steps=1",
                  "train.ckpt_every=1")
    log = open(os.path.join(run_dir, "log.txt")).read()
    assert ("batch: micro-batch 16 x 1 accumulation step x 1 process = global batch 16 "
            "(train.micro_batch=auto on cpu: no memory search off a GPU, the config's own "
            "split)") in log
    assert history(run_dir)[0]["micro_batch"] == 16
