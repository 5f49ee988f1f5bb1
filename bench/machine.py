"""What a benchmark ran on: processor model, vector extensions, vCPUs.

Processors differ between machines (AVX-512 on some, AVX2 only on others),
so every benchmark prints this beside its figures."""
from __future__ import annotations

import os

VECTOR_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "amx_tile")


def machine() -> dict:
    """Processor model, vector extensions, vCPUs (from /proc/cpuinfo)."""
    from accel_core.estimate import cpu_model

    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return {"cpu": cpu_model(), "vector": [v for v in VECTOR_FLAGS if v in flags], "vcpus": os.cpu_count()}


def header(m: dict | None = None) -> str:
    """One comment line for a benchmark's report."""
    m = m or machine()
    return f"# machine: {m['cpu']}; {m['vcpus']} vCPUs; vector extensions: {' '.join(m['vector']) or 'none'}"
