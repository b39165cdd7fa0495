"""`dtype: auto` follows the hardware: bf16 where it is multiplied natively, fp32 elsewhere."""

import torch

from lorafit.hardware import auto_dtype, cpu_bf16_units


def test_cpu_with_bf16_matrix_units_gets_bf16():
    for flags in ({"avx512f", "avx512_bf16"}, {"amx_tile", "amx_bf16"}):
        dtype, why = auto_dtype(torch.device("cpu"), flags)
        assert dtype == torch.bfloat16 and sorted(flags & {"avx512_bf16", "amx_bf16"})[0] in why


def test_cpu_without_them_gets_fp32_and_says_why():
    dtype, why = auto_dtype(torch.device("cpu"), {"avx2", "avx512f", "fma"})
    assert dtype == torch.float32 and "emulated" in why


def test_this_cpu_is_read_from_the_kernel():
    with open("/proc/cpuinfo") as f:
        flags = set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
    assert cpu_bf16_units() == [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
