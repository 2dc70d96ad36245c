"""Process-group setup for `python -m tti.train` (one process) and `torchrun` (N processes,
RANK, LOCAL_RANK and WORLD_SIZE set). Each process takes the GPU of its LOCAL_RANK (its rank
within the node), never of its global rank, so multi-node runs use each node's GPUs."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from tti.infra.cli import UserError
from tti.infra.gpus import GPUError, check_device


@dataclass
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or dist.is_initialized()


def world_size_from_env() -> int:
    """The processes torchrun started (WORLD_SIZE), or 1 without torchrun; known before setup."""
    return int(os.environ["WORLD_SIZE"]) if "RANK" in os.environ else 1


def local_world_size() -> int:
    """The processes torchrun started on this node (1 without torchrun)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def setup(device: str | None = None) -> DistInfo:
    """Initialise the process group when launched by torchrun (NCCL on CUDA, gloo on CPU)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    check_device(device)
    if "RANK" not in os.environ:
        dev = torch.device("cuda", 0) if device == "cuda" else torch.device(device)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return DistInfo(0, 0, 1, dev)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = world_size_from_env()
    if device == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise GPUError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} "
                           f"visible GPU(s): --nproc_per_node must not exceed the GPUs per node")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        dev, backend = torch.device(device), "gloo"
    if not dist.is_initialized():
        _join_group(backend, rank, world_size)
    return DistInfo(rank, local_rank, world_size, dev)


class SharedStoreRestartError(UserError, RuntimeError):
    """Several torchrun agents with restarts, sharing the agent's store: a restart could hang."""


def _join_group(backend: str, rank: int, world_size: int) -> None:
    """init_process_group from torchrun's environment, in a key space no earlier attempt used:
    torchrun's workers share the agent's key-value store by default, which outlives elastic
    restarts, so a restarted rank could read a dead peer's address and wait for it forever.
    With one agent (one node) its restart count names the attempt. Several agents count
    restarts apart (one restarted for a peer node's failure does not count it), so they need
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (the launchers set it): rank 0 then serves a new store,
    on a new port, for every attempt."""
    timeout = timedelta(minutes=30)
    shared = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    agents = int(os.environ.get("GROUP_WORLD_SIZE", "1"))
    if shared and agents > 1 and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0:
        raise SharedStoreRestartError(
            f"{agents} torchrun agents with --max-restarts > 0 share the agent's store, where a "
            f"restarted group can wait forever for a dead peer: launch torchrun with "
            f"TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 set on every node (the launchers do)")
    store, _, _ = next(dist.rendezvous("env://", rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") if shared else "new_store"
    store = dist.PrefixStore(f"tti/attempt_{attempt}/default_pg", store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                            timeout=timeout)
    global _STORE
    _STORE = store


# ---------------------------------------------------------------- a rank that stops alone

_STORE = None  # the key-value store this process's group was made through (_join_group)
_STOP_KEY = "tti/stopped"


class PeerStoppedError(UserError, RuntimeError):
    """Another rank stopped the run (its own error line says why) while this one waited for
    it in a collective: exit with status 1 and print nothing more (`quiet`, tti.infra.cli)."""
    quiet = True


def tell_peers_stopping(note: str) -> None:
    """Leave `note` (why this rank stops) in the group's store. Ranks waiting for this one in a
    gloo collective see it fail ("Connection closed by peer") and, finding the note, exit
    quietly (peer_stopped) rather than each print that traceback; NCCL's wait for torchrun."""
    if _STORE is not None:
        with contextlib.suppress(Exception):  # a store that is gone: nobody to tell
            _STORE.set(_STOP_KEY, note)


def peer_stopped() -> str | None:
    """The note another rank left with tell_peers_stopping, or None."""
    if _STORE is None:
        return None
    try:
        return _STORE.get(_STOP_KEY).decode() if _STORE.check([_STOP_KEY]) else None
    except Exception:  # the store went with the rank that served it
        return None


def cleanup() -> None:
    """Leave together: a rank that tears its group down while rank 0 still samples or
    saves can abort in gloo's destructor ("terminate called without an active exception")."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_gather_object(obj) -> list:
    """Every rank's `obj`, in rank order (a one-element list without a process group)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_ranks_true(flag, device: torch.device) -> bool:
    """Whether `flag` (bool or bool tensor) is True on every rank, so all ranks take the same
    branch. One small all-reduce; a tensor flag stays on its device until then."""
    t = torch.as_tensor(flag, dtype=torch.float32, device=device).reshape(1)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0)


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s `obj` on every rank (`obj` itself without a process group)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def mean_over_ranks(value: torch.Tensor) -> float:
    """The average of a scalar tensor over all ranks, as a float."""
    value = value.detach().float().reshape(1).clone()
    if dist.is_initialized():
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return float(value.item())
