"""What CPU benchmarks share: a description of the machine, timing statistics, output.

Ratios between systems measured in one run are what hold on shared machines, so
every result file states the machine it came from: CPU model, core count, the
instruction-set flags that decide which kernels are fast (bf16 and int8 paths),
library versions and the date. JSON writing and the table printer are the GPU
benchmarks' (`benchmarks.gpu_common`), reused so all result files look alike.
"""
from __future__ import annotations

import os
import statistics
from pathlib import Path
from typing import Any, Sequence

import torch

from benchmarks.gpu_common import machine_info, print_table, write_json
from server.core.native import cpu_flag_set, cpu_info

__all__ = ["cpu_machine_info", "cpu_seconds", "machine_line", "median", "percentile", "print_table", "write_json"]

# Flags that change which CPU kernels torch picks (and how fast they are).
INTERESTING_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16",
                     "amx_bf16", "amx_int8", "amx_tile")


def cpu_machine_info() -> dict[str, Any]:
    """The machine a CPU benchmark ran on, as JSON-ready values."""
    info = machine_info(torch.device("cpu"))
    model, flags = cpu_info()[0], cpu_flag_set()
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = os.cpu_count()
    info.update(cpu_model=model, cpu_cores_usable=affinity, torch_threads=torch.get_num_threads(),
                cpu_flags={f: f in flags for f in INTERESTING_FLAGS})
    return info


def machine_line(info: dict[str, Any]) -> str:
    """One human line for tables and the README: CPU, cores, the bf16 flags, versions."""
    fl = info.get("cpu_flags", {})
    simd = "avx512" if fl.get("avx512f") else ("avx2" if fl.get("avx2") else "no-avx2")
    bf16 = "native bf16" if (fl.get("avx512_bf16") or fl.get("amx_bf16")) else "no native bf16"
    return (f"{info.get('cpu_model')} ({info.get('cpu_cores_usable')} cores usable, {simd}, {bf16}), "
            f"torch {info.get('torch')} ({info.get('torch_threads')} threads), "
            f"transformers {info.get('transformers')}, peft {info.get('peft')}, {info.get('date')}")


def median(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("median of no values")
    return float(statistics.median(values))


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank q-th percentile (what `loraserve bench` reports), q in [0, 100]."""
    if not values:
        raise ValueError("percentile of no values")
    xs = sorted(values)
    return float(xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))])


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far, all its threads (from /proc; 0 where it cannot be read)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0
