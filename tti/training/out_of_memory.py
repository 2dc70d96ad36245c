"""A training step that runs out of GPU memory ends the run in one line, nothing lost.

The rank that ran out raises `TrainingOutOfMemoryError` (a UserError: the CLI prints it,
tagged with the rank, and exits with status 1), naming the run, the micro-batch and its
split, the peak and total memory, and the settings that fix it; the relaunch resumes from
the last checkpoint. Nothing is half-written: the error comes from a training step, never
from a checkpoint write (atomic anyway), and tti/train.py releases the run lock on the way
out. Under torchrun the other ranks wait in a collective until torchrun stops them and
reports the failed group below the line.
"""
from __future__ import annotations

from tti.config.schema import Config
from tti.infra import distributed
from tti.infra.checkpoints import latest_checkpoint
from tti.infra.cli import UserError
from tti.training.run_log import RunLog
from tti.training.utilisation import peak_memory_gib, total_memory_gib


class TrainingOutOfMemoryError(UserError, RuntimeError):
    """A training step ran out of device memory; the message says which settings fix it."""


def _fixes(cfg: Config, micro: int, accum: int) -> str:
    """The two settings that make a step fit: a smaller micro-batch (the largest divisor of
    the per-process batch at most half of `micro`), and auto's search."""
    per_process = micro * accum
    smaller = max((d for d in range(1, micro // 2 + 1) if per_process % d == 0), default=0)
    if not smaller:
        return ("not even one image per micro-batch fits: use a GPU with more free memory"
                + (", or --set train.precision=bf16" if cfg.train.precision == "fp32" else ""))
    if cfg.train.micro_batch is None:
        first = f"--set train.grad_accum={per_process // smaller} (micro-batch {smaller})"
    else:
        first = f"--set train.micro_batch={smaller}"
    auto = ("" if cfg.train.micro_batch == "auto" else
            " or --set train.micro_batch=auto (the largest that fits, measured at start)")
    return f"relaunch with {first}{auto}: the same global batch in more accumulation steps"


def out_of_memory(cfg: Config, info: distributed.DistInfo, step: int, micro_batches: list,
                  log: RunLog) -> TrainingOutOfMemoryError:
    """The error for running out of memory in step `step` over `micro_batches` (the step's
    list of (images, captions)); on rank 0 also in log.txt and history.jsonl."""
    micro, accum = len(micro_batches[0][1]), len(micro_batches)
    latest = latest_checkpoint(cfg.run_dir())
    kept = (f"its checkpoints are untouched and it resumes from {latest}" if latest else
            "no checkpoint was written yet")
    error = TrainingOutOfMemoryError(
        f"out of memory in step {step} on {info.device}: {cfg.run_dir()} at micro-batch "
        f"{micro} (x {accum} accumulation x {info.world_size} process(es) = global batch "
        f"{cfg.train.batch_size}), peak {peak_memory_gib(info.device):.1f} GiB of "
        f"{total_memory_gib(info.device):.1f} GiB; {kept}: {_fixes(cfg, micro, accum)}")
    distributed.tell_peers_stopping(f"rank {info.rank} ran out of memory in step {step}")
    log.print(f"stopped: {error}")
    log.record({"event": "out_of_memory", "step": step, "micro_batch": micro,
                "grad_accum": accum})
    return error
