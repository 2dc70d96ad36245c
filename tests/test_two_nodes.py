"""Two nodes on one machine, through the training launcher's multi-node switch: two torchrun
agents (TTI_NNODES=2, c10d rendezvous at 127.0.0.1:<free port>, one CPU process each, gloo)
train a tiny COCO run with a fine-tuned RoBERTa (`bash run_tti_64_coco_ft_roberta.sh cpu:1
...` on each). One node's worker (the python process under its agent, not the agent) is
SIGKILLed after the first checkpoint: with TTI_MAX_RESTARTS=1 both agents restart their
workers, every rank resumes from the last checkpoint, and the run ends bitwise where the same
run ends undisturbed on one node of two processes (`cpu:2`), launched at the same time.

The two "nodes" share this machine's disk, as nodes share the run directory in a real job
(train.py's docstring); each node's local rank 0 packs the data, into the same cache (the
cache's file lock makes that safe).
"""
import os
import signal
import socket
import subprocess
import time
import uuid

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, CKPT_EVERY = 8, 2
TINY = ["data.num_workers=0", "text.max_length=16", "model.unet.channels=[16, 32]",
        "model.unet.attn_resolutions=[16]", "model.unet.head_dim=16",
        "model.gaussian.timesteps=100", "sample.steps=2", "sample.captions=['a red circle']",
        "train.batch_size=8", "train.warmup_steps=2", "train.log_every=1",
        f"train.steps={STEPS}", f"train.ckpt_every={CKPT_EVERY}", f"train.keep_last={STEPS}",
        "train.sample_every=1000", "train.fid_every=0", "train.deterministic=true",
        "train.precision=fp32"]
RUN = os.path.join("coco32_ft_roberta_diffusion", "0")


@pytest.fixture(scope="module")
def coco(coco_fixture, tiny_roberta):
    """The COCO-like root and the tiny random RoBERTa built on its captions (conftest)."""
    return str(coco_fixture.root), tiny_roberta


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(coco, results, logs, nodes: int) -> list:
    """The training launcher as a user runs it: `nodes` = 2, the same command on each node
    (cpu:1, TTI_NNODES=2, c10d at 127.0.0.1:<free port>); `nodes` = 1, one node of two
    processes (cpu:2). Returns the launchers' Popens; their output goes to logs/node_*.log."""
    root, roberta = coco
    env = dict(os.environ, OMP_NUM_THREADS="1", TTI_MAX_RESTARTS="1",
               TTI_CONFIG="configs/coco32_ft_roberta.yaml")
    if nodes == 2:
        env.update(TTI_NNODES="2", TTI_RDZV_ENDPOINT=f"127.0.0.1:{free_port()}",
                   TTI_RDZV_ID=f"tti-test-{uuid.uuid4().hex[:8]}")
    sets = [f"run.results_dir={results}", f"text.name={roberta}", *TINY]
    cmd = ["bash", os.path.join(REPO, "run_tti_64_coco_ft_roberta.sh"), f"cpu:{3 - nodes}", "0",
           root] + [arg for item in sets for arg in ("--set", item)]
    popens = []
    for name in "ab"[:nodes]:
        out = open(logs / f"node_{name}.log", "w")
        popens.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out,
                                       stderr=subprocess.STDOUT, start_new_session=True))
    return popens


def wait(nodes, logs, timeout=240) -> None:
    """Wait for the launchers to exit 0 (the test fails showing their output otherwise)."""
    deadline = time.monotonic() + timeout
    try:
        for node in nodes:
            node.wait(timeout=max(1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pytest.fail(f"the nodes did not finish in {timeout} s:\n{node_output(logs)}")
    assert all(n.returncode == 0 for n in nodes), node_output(logs)


def stop(nodes) -> None:
    """SIGKILL the launchers still running and every process under them: torchrun starts its
    workers in sessions of their own, out of reach of a signal to the launcher's group."""
    running = [n for n in nodes if n.poll() is None]
    for pid in [d for n in running for d in descendants(n.pid)] + [n.pid for n in running]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def node_output(logs) -> str:
    return "\n".join(f"== {p.name}\n{p.read_text()[-3000:]}" for p in sorted(logs.glob("node_*.log")))


def descendants(pid: int) -> list:
    """Process ids under `pid` (from /proc)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def worker_of(node) -> tuple[int, int]:
    """(pid, RANK) of the training worker under a node's agent: the process below the
    launcher whose environment holds the LOCAL_RANK torchrun gives its workers."""
    for pid in descendants(node.pid):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
        except OSError:
            continue
        if b"LOCAL_RANK" in env:
            return pid, int(env[b"RANK"])
    raise AssertionError(f"no worker under node {node.pid}")


def final_state(results):
    return torch.load(os.path.join(results, RUN, "checkpoints", "latest.pt"), weights_only=True)


@pytest.fixture(scope="module")
def runs(coco, tmp_path_factory):
    """The run on two nodes, one of whose workers is SIGKILLed right after the first
    checkpoint, and, at the same time (the machine's cores are shared either way), the same
    run on one node with two processes, undisturbed: the reference. Returns {"killed",
    "clean": results folders, "killed_rank": RANK of the killed worker}."""
    dirs = {name: tmp_path_factory.mktemp(name) for name in ("clean", "killed")}
    clean = launch(coco, dirs["clean"] / "results", dirs["clean"], nodes=1)
    killed = launch(coco, dirs["killed"] / "results", dirs["killed"], nodes=2)
    # latest.pt, not the step file: the step file is written first and latest.pt linked to it
    # after, so a kill between the two would (rightly) restart from scratch.
    first_checkpoint = dirs["killed"] / "results" / RUN / "checkpoints" / "latest.pt"
    deadline = time.monotonic() + 180
    try:
        while not first_checkpoint.exists():
            if time.monotonic() > deadline or any(n.poll() is not None for n in killed):
                pytest.fail(f"no checkpoint {first_checkpoint}:\n{node_output(dirs['killed'])}")
            time.sleep(0.05)
        pid, rank = worker_of(killed[1])
        os.kill(pid, signal.SIGKILL)
        wait(clean, dirs["clean"])
        wait(killed, dirs["killed"])
    finally:
        stop(clean + killed)  # nothing left running, whatever happened
    return {"clean": dirs["clean"] / "results", "killed": dirs["killed"] / "results",
            "killed_rank": rank}


def test_two_nodes_restart_after_a_killed_worker_and_end_like_an_undisturbed_run(runs):
    results = runs["killed"]
    log = (results / RUN / "log.txt").read_text()
    # Two attempts, both of two processes (one per node); the second from the last checkpoint.
    assert log.count("run directory:") == 2 and log.count("(world size 2, device cpu)") == 2
    assert f"step {CKPT_EVERY}: checkpoint" in log
    resumed = [int(line.rsplit(" ", 1)[1]) for line in log.splitlines()
               if f"resumed from {results / RUN}/checkpoints/latest.pt at step" in line]
    assert len(resumed) == 1 and CKPT_EVERY <= resumed[0] < STEPS, (runs["killed_rank"], resumed)
    restarted, clean = final_state(results), final_state(runs["clean"])
    assert restarted["step"] == clean["step"] == STEPS
    for key in ("model", "ema"):
        a, b = restarted[key], clean[key]
        a, b = (a["shadow"], b["shadow"]) if key == "ema" else (a, b)
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), (key, name)
    for a, b in zip(restarted["rng"], clean["rng"], strict=True):  # every rank's streams
        assert torch.equal(a["torch"], b["torch"])

def test_shared_store_with_restarts_on_several_nodes_is_refused(monkeypatch):
    """Without TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, agents that restart apart would look for
    each other under different attempt numbers: refused before any rendezvous, naming the fix."""
    from tti.infra import distributed

    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "1")
    monkeypatch.setattr(torch.distributed, "rendezvous", lambda *a, **k: pytest.fail("joined"))
    with pytest.raises(distributed.SharedStoreRestartError, match="TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"):
        distributed._join_group("gloo", 0, 2)
