"""FID during training (tti/training/fid_monitor.py): a 2-rank torchrun run with train.fid_every=1
logs an FID per step to history.jsonl and keeps best.pt equal to the best step's checkpoint;
one process measuring the same checkpoint gets the same FID as the two ranks did (sharding
changes nothing); a relaunch keeps the best across the restart and reuses the cached
reference; the SVD form of the Fréchet distance equals pytorch-fid's sqrtm form."""
import json
import os
import sys

import numpy as np
import pytest
import torch
from processes import run_to_the_end

from tti.eval.metrics import fid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, FID_SAMPLES = 2, 6
FID_RUN = [f"train.steps={STEPS}", "train.fid_every=1", f"train.fid_samples={FID_SAMPLES}",
           "train.ckpt_every=1", "train.keep_last=10", "train.precision=fp32"]


def train_args(root, results, *extra):
    from test_train import tiny_args

    return tiny_args(root, results, *FID_RUN, *extra)


def fid_rows(run_dir):
    with open(os.path.join(run_dir, "history.jsonl")) as f:
        return [row for row in map(json.loads, f) if row.get("event") == "fid"]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    """2 CPU ranks (gloo) train STEPS steps with an FID at every step; the run directory."""
    from tti.data.shapes import write_coco

    root = tmp_path_factory.mktemp("shapes")
    write_coco(str(root), n_train=96, n_val=16, image_size=32, seed=0)
    results = tmp_path_factory.mktemp("results")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "tti.train", *train_args(root, results)]
    run_to_the_end(cmd, 300, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO))
    return str(root), str(results), os.path.join(str(results), "shapes32_diffusion", "0")


def test_two_ranks_log_fid_every_step_and_keep_the_best_checkpoint(two_rank_run):
    _, _, run_dir = two_rank_run
    rows = fid_rows(run_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(np.isfinite(r["fid"]) and r["fid"] > 0 for r in rows)
    assert all(r["protocol"]["samples"] == FID_SAMPLES for r in rows)
    assert all("judge/all" in r for r in rows)  # the shapes judge read the same images
    log = open(os.path.join(run_dir, "log.txt")).read()
    assert log.count("FID reference:") == 1 and log.count(": FID ") == STEPS  # rank 0 alone
    assert log.count("fid_judge on the 6 FID images") == STEPS
    best_row = min(rows, key=lambda r: r["fid"])
    best = load(os.path.join(run_dir, "checkpoints", "best.pt"))
    assert best["fid"]["step"] == best_row["step"] and best["fid"]["fid"] == best_row["fid"]
    same_step = load(os.path.join(run_dir, "checkpoints", f"{best_row['step']:07d}.pt"))
    assert set(best) - {"fid"} == set(same_step)
    for key in ("model", "ema", "optimizer", "rng", "step", "scheduler"):
        assert_equal(best[key], same_step[key], key)


def assert_equal(a, b, where):
    """Nested dicts/lists/tensors/arrays equal exactly."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), where
    else:
        assert a == b, where


def test_one_process_measures_the_same_fid_as_two_ranks(two_rank_run):
    """The last step's EMA weights, measured here in one process (its own reference features
    too), give exactly the FID the two ranks logged: every image comes from its own seed,
    and the features are put back in item order."""
    from tti.data.coco import load_split
    from tti.infra.distributed import DistInfo
    from tti.training.fid_monitor import FIDMonitor
    from tti.models.text_to_image import load_for_inference
    from tti.training.run_log import RunLog

    root, _, run_dir = two_rank_run
    model, cfg = load_for_inference(os.path.join(run_dir, "checkpoints", "latest.pt"),
                                    precision="fp32")
    val_set = load_split(root, cfg.data.val_split, cfg.data.image_size, seed=cfg.train.seed)
    log = RunLog(run_dir, is_main=False)  # writes nothing
    monitor = FIDMonitor(cfg, val_set, DistInfo(0, 0, 1, torch.device("cpu")), log)
    reference = monitor._shard_features(lambda items: torch.stack([val_set[it.row][0] for it in items]))
    assert np.array_equal(reference, np.load(monitor.reference_path())["features"])
    features, verdicts = monitor.generated_features(model)
    assert len(features) == len(verdicts) == FID_SAMPLES
    assert fid.fid_from_features(features, reference) == fid_rows(run_dir)[-1]["fid"]


def test_a_relaunch_keeps_the_best_and_the_cached_reference(two_rank_run):
    """One more step in one process: its FID is compared with best.pt's, the reference
    features come from the cache, and best.pt stays the lowest FID's checkpoint."""
    from tti import train

    root, results, run_dir = two_rank_run
    before = load(os.path.join(run_dir, "checkpoints", "best.pt"))["fid"]
    log_size = os.path.getsize(os.path.join(run_dir, "log.txt"))
    train.main(train_args(root, results, f"train.steps={STEPS + 1}"))
    rows = fid_rows(run_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 2))
    assert rows[-1]["best"] == (rows[-1]["fid"] < before["fid"])
    best = load(os.path.join(run_dir, "checkpoints", "best.pt"))["fid"]
    assert best["fid"] == min(r["fid"] for r in rows)
    new_log = open(os.path.join(run_dir, "log.txt")).read()[log_size:]
    assert "FID reference:" not in new_log and f"step {STEPS + 1}: FID " in new_log


def test_fid_checks_leave_training_as_it_was(two_rank_run, tmp_path):
    """The same 2 steps with and without an FID after each end with equal weights, EMA and
    random streams: sampling swaps the EMA weights back and draws from its own generators."""
    from tti import train

    root = two_rank_run[0]
    with_fid = train.main(train_args(root, tmp_path / "with", "train.fid_samples=2"))
    without = train.main(train_args(root, tmp_path / "without", "train.fid_every=0"))
    assert len(fid_rows(with_fid)) == STEPS
    a, b = (load(os.path.join(d, "checkpoints", "latest.pt")) for d in (with_fid, without))
    for key in ("model", "ema", "optimizer", "rng"):
        assert_equal(a[key], b[key], key)


# ---------------------------------------------------------------- pieces, without processes


def test_gather_in_item_order_undoes_the_rank_sharding(monkeypatch):
    from tti.infra import distributed
    from tti.training.fid_monitor import gather_in_item_order

    items, world = list(range(7)), 3
    shards = [items[r::world] for r in range(world)]
    monkeypatch.setattr(distributed, "all_gather_object", lambda shard: shards)
    assert gather_in_item_order(shards[0], world) == items
    arrays = [np.asarray(s, dtype=np.float32)[:, None] for s in shards]
    monkeypatch.setattr(distributed, "all_gather_object", lambda shard: arrays)
    assert gather_in_item_order(arrays[0], world)[:, 0].tolist() == items


@pytest.mark.parametrize("n1, n2", [(400, 300), (20, 30), (300, 10)])
def test_fid_from_features_equals_the_sqrtm_form(n1, n2):
    """Full-rank covariances (N > D) agree to rounding; rank-deficient ones (N <= D, as 2,000
    images against 2,048 features are) within what the zero eigenvalues allow: each of the
    D square roots of an eigenvalue that is 0 in exact arithmetic can come out as up to
    sqrt(eps * |sigma1 sigma2|) instead."""
    rng = np.random.default_rng(0)
    d = 64
    a = rng.normal(size=(n1, d)) @ rng.normal(size=(d, d)) + rng.normal(size=d)
    b = rng.normal(size=(n2, d)) @ (0.5 * rng.normal(size=(d, d)))
    (mu1, s1), (mu2, s2) = fid.stats(a), fid.stats(b)
    expected = fid.frechet_distance(mu1, s1, mu2, s2)
    tolerance = 2 * d * np.sqrt(np.finfo(float).eps * np.linalg.norm(s1 @ s2, 2))
    if min(n1, n2) > d:
        tolerance = 1e-9 * expected
    assert fid.fid_from_features(a, b) == pytest.approx(expected, abs=tolerance)
    assert fid.fid_from_features(a, a) == pytest.approx(0, abs=tolerance)


@pytest.mark.parametrize("override, message", [
    ("train.fid_every=-1", "train.fid_every: must be >= 0"),
    ("train.fid_samples=1", "train.fid_samples: must be >= 2"),
])
def test_bad_fid_settings_name_the_key(override, message):
    from tti.config.errors import ConfigError
    from tti.config.load import load_config

    with pytest.raises(ConfigError, match=message):
        load_config(os.path.join(REPO, "configs", "shapes32.yaml"), [override])
