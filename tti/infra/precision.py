"""Which autocast dtype a precision setting means on a device (train.precision, --precision).
torch is imported where it is used: the config layer reads PRECISIONS without loading it."""
from __future__ import annotations

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def amp_dtype(precision: str, device) -> "torch.dtype | None":
    """The autocast dtype for `precision` on `device` (None = plain fp32). "auto" is bf16 on
    CUDA and on CPUs with native bf16 (AVX512-BF16 or AMX), where it trains faster than fp32
    (bench/train_throughput.py); fp32 elsewhere, since emulated bf16 is slower."""
    import torch

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    device = torch.device(device)
    if precision == "auto":
        native_cpu_bf16 = (torch.cpu._is_avx512_bf16_supported()
                           or torch.cpu._is_amx_tile_supported())
        fast = device.type == "cuda" or (device.type == "cpu" and native_cpu_bf16)
        precision = "bf16" if fast else "fp32"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def precision_name(amp: "torch.dtype | None") -> str:
    """What amp_dtype returned, for logs and tables: "fp32", "bf16 autocast" or "fp16 autocast"."""
    import torch

    return {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}[amp]
