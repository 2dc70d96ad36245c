"""What a CUDA launch needs from the machine, asked before any work: a working driver, the
GPU ids it names, and each one's free memory. Every problem is a one-line `GPUError` saying
what was found and what to run instead, not torch's traceback from its first CUDA call.

Ids, as the launchers' `$gpu_ids` name them, are positions among the GPUs this process sees
(all of the machine's when CUDA_VISIBLE_DEVICES is unset).
"""
from __future__ import annotations

import torch

from tti.infra.cli import UserError

GIB = 2 ** 30
# What to run instead of a GPU that cannot: tti.train's words, then any CLI's.
TRAIN_CPU = "run with --device cpu"
DEVICE_CPU = f"{TRAIN_CPU} (or a launcher with $gpu_ids cpu)"


class GPUError(UserError, RuntimeError):
    """The GPUs a launch names cannot run it here (no driver, a missing id, too little memory)."""


def _first_line(error: BaseException) -> str:
    """The first sentence of an error's message ("Found no NVIDIA driver on your system")."""
    line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return line.split(". ")[0].rstrip(".")


def cuda_problem() -> str | None:
    """Why CUDA cannot be used in this process, in a few words, or None when it can."""
    if torch.cuda.is_available():
        return None
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is built without CUDA"
    try:
        torch.cuda.init()  # raises with the driver's own reason ("Found no NVIDIA driver ...")
    except Exception as e:  # RuntimeError or AssertionError, by torch version
        return _first_line(e)
    return "torch.cuda.is_available() is false"


def check_cuda(instead: str) -> None:
    """GPUError unless CUDA works here; `instead` ends the message (what to run instead)."""
    problem = cuda_problem()
    if problem is not None:
        raise GPUError(f"no usable CUDA GPU here ({problem}): {instead}")


def check_device(device: str | torch.device) -> None:
    """GPUError unless `device` ("cpu", "cuda", "cuda:1", ...) can be used here."""
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise UserError(f"--device {device}: expected cpu, cuda or cuda:N") from None
    if kind == "cuda":
        check_cuda(DEVICE_CPU)


def check_ids(ids: list[int], instead: str, what: str = "GPU id") -> None:
    """GPUError naming the ids in `ids` this process cannot see."""
    count = torch.cuda.device_count()
    missing = [i for i in ids if not 0 <= i < count]
    if missing:
        shown = f"ids 0-{count - 1}" if count > 1 else ("id 0" if count else "none")
        raise GPUError(f"{what}{'s' if len(missing) > 1 else ''} {','.join(map(str, missing))}: "
                       f"this machine shows {count} GPU(s) ({shown}): {instead}")


def free_memory(index: int) -> tuple[int, int]:
    """(free, total) bytes of GPU `index`, other processes' use included. GPUError when it
    cannot be opened (e.g. another job holds it in exclusive-process mode)."""
    try:
        return torch.cuda.mem_get_info(index)
    except RuntimeError as e:
        raise GPUError(f"GPU {index} cannot be opened ({_first_line(e)}): another job may hold "
                       f"it; pick other GPU ids") from None


def describe(index: int, free: int, total: int) -> str:
    """'GPU 2 (NVIDIA A10, 3.1 of 24.0 GiB free)'."""
    try:
        name = torch.cuda.get_device_name(index)
    except RuntimeError:
        name = "GPU"
    return f"GPU {index} ({name}, {free / GIB:.1f} of {total / GIB:.1f} GiB free)"


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is a device running out of memory: torch.OutOfMemoryError (CUDA's
    caching allocator), the RuntimeError cuBLAS/cuDNN raise when their own workspace cannot
    be allocated, or the CPU allocator's."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and any(sign in str(error) for sign in (
        "CUDA error: out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED",
        "DefaultCPUAllocator: can't allocate memory"))
