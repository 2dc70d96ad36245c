"""DDP on CPU (gloo) under torchrun: 2 ranks x batch B match 1 rank x batch 2B and 1 rank x 2
accumulated micro-batches of B, replicas stay identical after every step, inner accumulation
steps skip the all-reduce, only rank 0 writes, local rank 0 alone writes the text store that
both ranks map, a worker killed mid-run is restarted by `torchrun --max-restarts` and the run
ends bitwise where an uninterrupted one ends.

How equivalence is made testable: by default every rank draws its diffusion timesteps and
noise from its own RNG stream (seed + rank), so 2 x B and 1 x 2B see different noise and
cannot agree. These runs replace `Diffusion.loss` by a wrapper that runs the real loss one
sample at a time, with the global RNG seeded from a hash of that sample's pixels: the noise
then depends on the sample alone, not on which rank or micro-batch holds it. Caption dropout
(keyed by rank) is off. Everything else (sampler sharding, DDP's gradient averaging,
no_sync accumulation, clipping, AdamW, EMA, checkpoints) is the real training loop, so the
runs agree up to float summation order. This file is also the torchrun worker script: it
wraps tti.training.loop.train_step to compare the ranks' parameters after every step and, for the
elastic-restart test, to make one rank die mid-run.
"""
import glob
import json
import os
import random
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from processes import run_to_the_end

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, CKPT_EVERY, FAULT_AT = 4, 2, 3
# fp32: bf16 kernels block by batch size, so 2 x B and 1 x 2B would differ by rounding.
EQUIVALENCE = ["text.caption_dropout=0", "train.batch_size=16", f"train.steps={STEPS}",
               f"train.ckpt_every={CKPT_EVERY}", "train.ema_decay=0.9", "train.precision=fp32",
               f"train.sample_every={STEPS}"]


def keyed_noise(loss_fn):
    """Diffusion.loss with each sample's timestep and noise drawn from a hash of its pixels."""
    def loss(self, images, text):
        per_sample = []
        for b in range(images.shape[0]):
            key = zlib.crc32(images[b].detach().cpu().numpy().tobytes())
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(key)
                per_sample.append(loss_fn(self, images[b:b + 1], text.index(slice(b, b + 1))))
        return torch.stack(per_sample).mean()
    return loss


def train_args(root, results, *extra):
    from test_train import TINY

    args = ["--config", "configs/shapes32.yaml", "--device", "cpu",
            "--set", f"data.root={root}", "--set", f"run.results_dir={results}"]
    for item in TINY + EQUIVALENCE + list(extra):
        args += ["--set", item]
    return args


# ---------------------------------------------------------------- the torchrun worker


class ReplicaMismatchError(AssertionError):
    """Ranks hold different parameters: DDP's all-reduce or a rank-local update went wrong."""


@torch.no_grad()
def assert_replicas_equal(module: torch.nn.Module, step: int) -> None:
    """Raise ReplicaMismatchError unless every rank holds the same parameters.

    Compares a float64 sum and a position-weighted sum per parameter, all-gathered: cheap,
    and any real divergence (even one ulp in one weight) changes them.
    """
    from tti.infra import distributed

    names, sums = [], []
    for name, p in module.named_parameters():
        flat = p.detach().reshape(-1).double()
        weights = torch.linspace(1.0, 2.0, flat.numel(), dtype=torch.float64, device=flat.device)
        names.append(name)
        sums.append(torch.stack([flat.sum(), (flat * weights).sum()]))
    local = torch.stack(sums).cpu()
    for rank, other in enumerate(distributed.all_gather_object(local)):
        if not torch.equal(other, local):
            bad = next(i for i in range(len(names)) if not torch.equal(other[i], local[i]))
            raise ReplicaMismatchError(
                f"after step {step}: rank {rank} and rank {torch.distributed.get_rank()} hold "
                f"different values of {names[bad]} (checksums {other[bad].tolist()} vs "
                f"{local[bad].tolist()})")


def wrap_train_step(record, fault_at, marker):
    """Make tti.training.loop.train_step check that all ranks hold the same parameters after
    every step; with fault_at = k, the last rank also exits with status 1 as it starts step
    k + 1 (after step k's checkpoint), once per test (the marker file), as a crashed worker
    would."""
    from tti.training import loop

    step_fn = loop.train_step

    def checked_step(state, *args, **kwargs):
        last_rank = torch.distributed.get_world_size() - 1
        if (state.step == fault_at and torch.distributed.get_rank() == last_rank
                and not os.path.exists(marker)):
            open(marker, "w").close()
            print(f"rank {last_rank} exits after step {fault_at}", file=sys.stderr, flush=True)
            os._exit(1)
        out = step_fn(state, *args, **kwargs)
        assert_replicas_equal(state.model, state.step)
        record["replica_checks"] += 1
        return out
    loop.train_step = checked_step


def record_text_store(record):
    """Record how often this rank builds the text store, and which file it then maps."""
    from tti.training import setup

    build, open_store = setup.build_store, setup.open_text_store
    record["store_builds"] = 0

    def counted_build(*args, **kwargs):
        record["store_builds"] += 1
        return build(*args, **kwargs)

    def recorded_open(encoder, *args, **kwargs):
        open_store(encoder, *args, **kwargs)
        tokens = os.path.realpath(os.path.join(encoder.store_dir, "tokens.npy"))
        with open("/proc/self/maps") as f:
            record["store_mapped"] = any(line.rstrip().endswith(tokens) for line in f)
        record["store_file"] = [tokens, os.stat(tokens).st_ino]
    setup.build_store, setup.open_text_store = counted_build, recorded_open


def worker(record_dir, args):
    """One rank: check that a replica mismatch is caught, then train with keyed noise while
    recording what this rank wrote and how often it skipped the all-reduce."""
    from torch.nn.parallel import DistributedDataParallel

    from tti import train
    from tti.infra import checkpoints as checkpoint
    from tti.infra import distributed
    from tti.training import sample_monitor as in_loop
    from tti.models.diffusion import Diffusion

    info = distributed.setup("cpu")
    record = {"rank": info.rank, "local_rank": info.local_rank, "world_size": info.world_size,
              "saves": [], "sample_grids": 0, "no_sync": 0, "replica_checks": 0}
    torch.manual_seed(0)
    probe = torch.nn.Linear(4, 4)
    if info.rank == 1:  # one ulp in one weight on one rank must be found
        with torch.no_grad():
            probe.weight[2, 3] = torch.nextafter(probe.weight[2, 3], torch.tensor(9.0))
    try:
        assert_replicas_equal(probe, step=0)
    except ReplicaMismatchError as e:
        record["mismatch_message"] = str(e)

    Diffusion.loss = keyed_noise(Diffusion.loss)
    save, grid, no_sync = checkpoint.atomic_save, in_loop.SampleMonitor.run, DistributedDataParallel.no_sync

    def counted(key, fn):
        def wrapper(*a, **k):
            record[key] += 1
            return fn(*a, **k)
        return wrapper

    def recorded_save(obj, path):
        record["saves"].append(path)
        return save(obj, path)
    checkpoint.atomic_save = recorded_save
    in_loop.SampleMonitor.run = counted("sample_grids", grid)
    DistributedDataParallel.no_sync = counted("no_sync", no_sync)
    record_text_store(record)
    fault_at = int(os.environ.get("TEST_FAULT_AT_STEP", "-1"))
    wrap_train_step(record, fault_at, os.path.join(record_dir, f"fault_at_step_{fault_at}"))
    run_dir = train.main(args)
    record["rng"] = [torch.get_rng_state().tolist(), random.getstate()[1][:8],
                     np.random.get_state()[1][:8].tolist()]
    with open(os.path.join(record_dir, f"rank{info.rank}.json"), "w") as f:
        json.dump(dict(record, run_dir=run_dir), f)


if __name__ == "__main__":
    import faulthandler
    faulthandler.dump_traceback_later(float(os.environ.get("TTI_TEST_HANG_S", "240")), exit=True)
    worker(sys.argv[1], sys.argv[2:])
    sys.exit(0)


# ---------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    from tti.data.shapes import write_coco

    root = tmp_path_factory.mktemp("shapes")
    write_coco(str(root), n_train=96, n_val=16, image_size=32, seed=0)
    return str(root)


def torchrun(tmp, shapes_root, max_restarts=0, env=None, *extra):
    """Two CPU ranks of this file's worker; returns (run_dir, [rank records], output)."""
    record_dir = tmp / "records"
    record_dir.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           f"--max-restarts={max_restarts}", "--monitor-interval=0.2", __file__, str(record_dir)]
    cmd += train_args(shapes_root, tmp / "results", "train.grad_accum=2", *extra)
    # A worker stuck longer than TTI_TEST_HANG_S prints its stack and exits (no orphans).
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, TTI_TEST_HANG_S="150",
                    **(env or {}))
    output = run_to_the_end(cmd, 200, cwd=REPO, env=full_env)
    records = [json.load(open(record_dir / f"rank{r}.json")) for r in range(2)]
    return records[0]["run_dir"], records, output


@pytest.fixture(scope="module")
def two_ranks(shapes_root, tmp_path_factory):
    """2 ranks x 2 accumulated micro-batches of 4 = global batch 16."""
    return torchrun(tmp_path_factory.mktemp("ddp"), shapes_root)


@pytest.fixture(scope="module")
def one_rank(shapes_root, tmp_path_factory):
    """1 rank x 16, and 1 rank x 2 accumulated micro-batches of 8, in this process."""
    from tti import train
    from tti.models.diffusion import Diffusion

    results = tmp_path_factory.mktemp("one_rank")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Diffusion, "loss", keyed_noise(Diffusion.loss))
        big = train.main(train_args(shapes_root, results / "big"))
        accum = train.main(train_args(shapes_root, results / "accum", "train.grad_accum=2"))
    return big, accum


def final_state(run_dir):
    return torch.load(os.path.join(run_dir, "checkpoints", "latest.pt"), weights_only=True)


def weight_difference(a, b):
    """Largest |a - b| over the model weights and over the EMA weights."""
    model = max((a["model"][k].float() - b["model"][k].float()).abs().max().item()
                for k in a["model"] if a["model"][k].is_floating_point())
    ema = max((a["ema"]["shadow"][k] - b["ema"]["shadow"][k]).abs().max().item()
              for k in a["ema"]["shadow"])
    return model, ema


def moment_difference(a, b):
    """Largest |a - b| of AdamW's gradient moments (exp_avg, exp_avg_sq), each relative to
    its largest value: these record the gradients themselves, including their scale."""
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    out = []
    for key in ("exp_avg", "exp_avg_sq"):
        scale = max(sb[i][key].abs().max().item() for i in sb)
        out.append(max((sa[i][key] - sb[i][key]).abs().max().item() for i in sb) / scale)
    return max(out)


def assert_same_training(a, b):
    assert a["step"] == b["step"] == STEPS
    # The gradients agree to float summation order (~1e-7 measured; a step apart: ~0.4).
    assert moment_difference(a, b) < 1e-5
    # AdamW divides by sqrt(exp_avg_sq), so weights whose gradient is ~0 turn summation-order
    # noise into ~5e-5 (measured); the last two steps moved weights by ~2e-3.
    model, ema = weight_difference(a, b)
    assert model < 3e-4 and ema < 3e-4, (model, ema)


def test_two_ranks_match_one_rank_with_the_global_batch(two_ranks, one_rank):
    ddp, big = final_state(two_ranks[0]), final_state(one_rank[0])
    assert_same_training(ddp, big)
    halfway = torch.load(os.path.join(two_ranks[0], "checkpoints", f"{CKPT_EVERY:07d}.pt"),
                         weights_only=True)
    assert moment_difference(ddp, halfway) > 0.1 and weight_difference(ddp, halfway)[0] > 1e-3


def test_accumulation_matches_the_large_batch(one_rank):
    assert_same_training(final_state(one_rank[1]), final_state(one_rank[0]))


def test_replicas_identical_after_every_step(two_ranks):
    _, records, _ = two_ranks
    for rec in records:
        assert rec["replica_checks"] == STEPS, rec  # checked after every optimizer step
        # The checker itself: one ulp of difference on rank 1 is reported on every rank.
        assert "after step 0" in rec["mismatch_message"] and "weight" in rec["mismatch_message"]


def test_inner_accumulation_steps_skip_the_all_reduce(two_ranks):
    for rec in two_ranks[1]:
        assert rec["no_sync"] == STEPS * (2 - 1), rec  # grad_accum=2: one silent micro-step


def test_only_rank_zero_writes(two_ranks):
    run_dir, (rank0, rank1), _ = two_ranks
    assert (rank0["local_rank"], rank1["local_rank"]) == (0, 1)
    steps = [os.path.basename(p) for p in rank0["saves"]]
    assert steps == [f"{s:07d}.pt" for s in range(CKPT_EVERY, STEPS + 1, CKPT_EVERY)]
    assert rank1["saves"] == [] and rank1["sample_grids"] == 0 and rank0["sample_grids"] == 1
    log = open(os.path.join(run_dir, "log.txt")).read()
    assert log.count("run directory:") == 1 and log.count(f"step {STEPS} loss=") == 1
    assert "world size 2" in log
    assert len(glob.glob(os.path.join(run_dir, "tb", "events.*"))) == 1


def test_one_text_store_per_node_mapped_by_every_rank(two_ranks):
    rank0, rank1 = two_ranks[1]
    assert (rank0["store_builds"], rank1["store_builds"]) == (1, 0)  # local rank 0 writes it
    assert rank0["store_file"] == rank1["store_file"]  # one file (same path and inode)...
    assert rank0["store_mapped"] and rank1["store_mapped"]  # ...that each rank maps, not copies


def test_elastic_restart_after_a_worker_dies_ends_like_an_uninterrupted_run(
        two_ranks, shapes_root, tmp_path):
    run_dir, records, output = torchrun(tmp_path, shapes_root, max_restarts=1,
                                        env={"TEST_FAULT_AT_STEP": str(FAULT_AT)})
    assert f"rank 1 exits after step {FAULT_AT}" in output
    assert os.path.exists(tmp_path / "records" / f"fault_at_step_{FAULT_AT}")
    log = open(os.path.join(run_dir, "log.txt")).read()
    last_ckpt = FAULT_AT - FAULT_AT % CKPT_EVERY
    assert f"resumed from {run_dir}/checkpoints/latest.pt at step {last_ckpt}" in log
    restarted, clean = final_state(run_dir), final_state(two_ranks[0])
    assert restarted["step"] == STEPS
    for key in ("model", "ema"):
        a, b = restarted[key], clean[key]
        a, b = (a["shadow"], b["shadow"]) if key == "ema" else (a, b)
        for name in a:
            assert torch.equal(a[name], b[name]), (key, name)
    for rec, ref in zip(records, two_ranks[1]):  # each rank got its own RNG streams back
        assert rec["rng"] == ref["rng"], rec["rank"]


# ---------------------------------------------------------------- pieces, without processes


def test_sampler_shards_and_reshuffles_every_epoch():
    from tti.data.order import ResumableSampler

    data = list(range(50))
    shards = [ResumableSampler(data, num_replicas=2, rank=r, seed=3) for r in range(2)]
    orders = {}
    for epoch in (0, 1):
        for s in shards:
            s.set_epoch(epoch)
        a, b = (list(s) for s in shards)
        assert len(a) == len(b) == 25 and not set(a) & set(b)  # disjoint, equal shares
        orders[epoch] = [x for pair in zip(a, b) for x in pair]
    assert sorted(orders[0]) == sorted(orders[1]) == data
    assert orders[0] != orders[1]  # a new permutation each epoch
    shards[0].set_epoch(1, start=10)
    assert list(shards[0]) == orders[1][0::2][10:]  # resume mid-epoch


def test_device_is_chosen_by_local_rank(monkeypatch):
    """Rank 11 of a 16-process, 2-node job runs on its node's GPU 3, not GPU 11."""
    from tti.infra import distributed

    monkeypatch.setenv("RANK", "11")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "16")
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed, "_join_group", lambda backend, *_: chosen.append(backend))
    info = distributed.setup("cuda")
    assert info.device == torch.device("cuda", 3) and chosen == [torch.device("cuda", 3), "nccl"]
    assert (info.rank, info.local_rank, info.world_size, info.is_main) == (11, 3, 16, False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(RuntimeError, match="LOCAL_RANK 3 but only 2 visible GPU"):
        distributed.setup("cuda")


@pytest.mark.parametrize("gpu_ids, restarts, expected", [
    ("0,1,2", "2", "torchrun --standalone --nproc_per_node=3 --max-restarts=2 cuda"),
    ("4,5", "", "torchrun --standalone --nproc_per_node=2 --max-restarts=0 cuda"),
    ("cpu", "", "python cpu"),
    ("cpu:2", "", "torchrun --standalone --nproc_per_node=2 --max-restarts=0 cpu"),
    ("0", "1", "torchrun --standalone --nproc_per_node=1 --max-restarts=1 cuda"),
])
def test_launchers_start_one_process_per_listed_gpu(tmp_path, gpu_ids, restarts, expected):
    script = (f'source {REPO}/scripts/launch_common.sh "$1"; '
              'echo "${LAUNCH[@]} $DEVICE" "$CUDA_VISIBLE_DEVICES"')
    env = dict(os.environ, TTI_MAX_RESTARTS=restarts) if restarts else \
        {k: v for k, v in os.environ.items() if k != "TTI_MAX_RESTARTS"}
    out = subprocess.run(["bash", "-c", script, "bash", gpu_ids], cwd=tmp_path, env=env,
                         capture_output=True, text=True, check=True).stdout.split()
    assert " ".join(out[:len(expected.split())]) == expected
    assert out[len(expected.split()):] == ([] if gpu_ids.startswith("cpu") else [gpu_ids])


@pytest.mark.parametrize("gpu_ids", ["cpu:0", "cpu:two", "0,a", "gpu0"])
def test_launchers_refuse_gpu_ids_they_cannot_read(tmp_path, gpu_ids):
    script = f'source {REPO}/scripts/launch_common.sh "$1"; echo started'
    result = subprocess.run(["bash", "-c", script, "bash", gpu_ids], cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stdout == ""
    assert f"$gpu_ids '{gpu_ids}': expected GPU ids (0,1,2,3), cpu, or cpu:N" in result.stderr


def test_launcher_multi_node_switches(tmp_path):
    script = (f'source {REPO}/scripts/launch_common.sh "$1"; echo "${{LAUNCH[@]}}"')
    env = dict(os.environ, TTI_NNODES="2", TTI_RDZV_ENDPOINT="node0:29500", TTI_RDZV_ID="job7")
    out = subprocess.run(["bash", "-c", script, "bash", "0,1,2,3"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["torchrun", "--nnodes=2", "--nproc_per_node=4", "--rdzv-backend=c10d",
                   "--rdzv-endpoint=node0:29500", "--rdzv-id=job7", "--max-restarts=0"]
    env.pop("TTI_RDZV_ENDPOINT")
    bad = subprocess.run(["bash", "-c", script, "bash", "0"], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "TTI_RDZV_ENDPOINT" in bad.stderr
