"""The CPU this process runs on: its name and the ISA extensions that change which kernels are fast.

One reader of /proc/cpuinfo for the benchmarks (results record the flags, so AVX2 and AVX-512
runs are never compared), the OpenVINO backend (bf16 only where the CPU computes it natively)
and its accuracy gate (which CPU a verdict was measured on).
"""

from __future__ import annotations

import functools
import platform

ISA_FLAGS = {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8"}


@functools.lru_cache(maxsize=1)
def cpu_info() -> dict:
    """{"cpu": model name, "isa": sorted ISA flags of interest} (isa empty where /proc/cpuinfo is absent)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
        name = next(ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name"))
        flags = set(next(ln for ln in lines if ln.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return {"cpu": platform.processor(), "isa": []}
    return {"cpu": name, "isa": sorted(flags & ISA_FLAGS)}


def has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX: elsewhere a bf16 precision hint runs in f32 (or is emulated)."""
    return bool({"avx512_bf16", "amx_bf16"} & set(cpu_info()["isa"]))
