"""Memory budgets as people write them: `256MiB`, `2GB`, `1073741824`, or `0.25` / `25%` of what is free.

Parsed once, when the configuration is built (`EngineConfig.__post_init__`); a fraction is turned into bytes
only when the engine sizes what it is for, against the memory free at that moment.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gib": 1 << 30,
          "t": 1 << 40, "tib": 1 << 40, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$")


@dataclass(frozen=True)
class MemoryBudget:
    """Exactly one of: a number of bytes, or a fraction of the memory free when it is resolved."""

    nbytes: Optional[int] = None
    fraction: Optional[float] = None

    def resolve(self, free_bytes: int) -> int:
        return self.nbytes if self.nbytes is not None else int(self.fraction * free_bytes)  # type: ignore[operator]


def parse_budget(text: str) -> MemoryBudget:
    """`256MiB` (KiB/MiB/GiB/TiB or K/M/G/T: powers of 1024; KB/MB/GB/TB: of 1000; a bare integer: bytes), or a
    fraction of free memory written with a decimal point (`0.25`) or as a percentage (`25%`). Raises ValueError
    saying what is accepted."""
    s = text.strip().lower()
    m = _SIZE.match(s[:-1] if s.endswith("%") else s)
    if m is None or m.group(2) not in _UNITS or (s.endswith("%") and m.group(2)):
        raise ValueError(f"{text!r}: expected a size (256MiB, 2GB, a number of bytes) or a fraction of free "
                         "memory (0.25 or 25%)")
    number, unit = m.group(1), m.group(2)
    if s.endswith("%") or (not unit and "." in number):
        frac = float(number) / (100 if s.endswith("%") else 1)
        if not 0 < frac <= 1:
            raise ValueError(f"{text!r}: a fraction of free memory must be in (0, 1] (0-100%)")
        return MemoryBudget(fraction=frac)
    nbytes = int(float(number) * _UNITS[unit])
    if nbytes < 1:
        raise ValueError(f"{text!r}: a size must be at least one byte")
    return MemoryBudget(nbytes=nbytes)


def available_host_memory() -> int:
    """Bytes the kernel says are available to new allocations (MemAvailable), 0 where it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def free_memory(device: Any) -> int:
    """Bytes free on `device` (a torch.device) now: free GPU memory on CUDA, MemAvailable elsewhere."""
    if device.type == "cuda":
        import torch

        return int(torch.cuda.mem_get_info(device)[0])
    return available_host_memory()


def human_bytes(n: float) -> str:
    """`n` bytes as an operator reads them: 1.5 GiB, 300 MiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def check_fits(what: str, nbytes: int, free_bytes: int, where: str) -> Optional[str]:
    """Why `nbytes` for `what` cannot be allocated out of `free_bytes` free on `where`, or None when it fits or
    the free memory is unknown (0). Asked before allocating: a CPU allocation larger than memory is not refused
    by Linux, it is killed later by the OOM killer with no message at all."""
    if free_bytes <= 0 or nbytes <= free_bytes:
        return None
    return f"{what} needs {human_bytes(nbytes)}, more than the {human_bytes(free_bytes)} free on {where}"
