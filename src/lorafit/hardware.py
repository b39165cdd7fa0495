"""What the machine offers for mixed precision, detected at run time (never assumed).

bf16 pays off where the matrix units multiply it natively: CUDA devices with bf16 support, and
x86 CPUs with AMX-BF16 (Intel Sapphire Rapids and later) or AVX512-BF16 (Intel Cooper Lake, AMD
Zen 4 and later). Elsewhere a CPU emulates bf16 products, many times slower than fp32.
"""

from __future__ import annotations

import platform
from typing import Iterable, Optional

import torch

BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags() -> set[str]:
    """The CPU feature flags the kernel reports (Linux ``/proc/cpuinfo``); empty elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return set()
    return set(line.partition(":")[2].split())


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def cpu_bf16_units(flags: Optional[Iterable[str]] = None) -> list[str]:
    """Which bf16 matrix units the CPU has (of `BF16_CPU_FLAGS`); `flags` defaults to this CPU's."""
    have = set(cpu_flags() if flags is None else flags)
    return [flag for flag in BF16_CPU_FLAGS if flag in have]


def auto_dtype(device: torch.device, flags: Optional[Iterable[str]] = None) -> tuple[torch.dtype, str]:
    """The base-model dtype ``auto`` means on `device`, and why, in words.

    bf16 on a CUDA device that supports it and on a CPU with bf16 matrix units; fp32 elsewhere.
    (Adapters and the loss stay fp32 either way.)"""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, f"bf16: {torch.cuda.get_device_name(device)} supports bf16"
        return torch.float32, f"fp32: {torch.cuda.get_device_name(device)} has no bf16"
    if device.type == "cpu":
        units = cpu_bf16_units(flags)
        if units:
            return torch.bfloat16, f"bf16: the CPU has bf16 matrix units ({', '.join(units)})"
        return torch.float32, "fp32: the CPU has no bf16 matrix units (AMX-BF16 / AVX512-BF16), so bf16 would be emulated"
    return torch.float32, f"fp32: no bf16 detection for {device.type} devices"
