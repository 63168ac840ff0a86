"""The CPU a number was measured on: its model name and the vector units that set its speed."""

from __future__ import annotations

import platform

CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_model() -> str:
    """E.g. "AMD EPYC 9R14 (avx2, avx512f, avx512_bf16)": /proc/cpuinfo's model name and which
    of CPU_FLAGS it has; platform.processor() where there is no /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return platform.processor() or "unknown"
    info = dict(line.split(":", 1) for line in lines if ":" in line)
    info = {k.strip(): v.strip() for k, v in info.items()}
    flags = set(info.get("flags", "").split())
    present = [f for f in CPU_FLAGS if f in flags]
    return f"{info.get('model name', 'unknown')} ({', '.join(present) or 'no AVX2'})"
