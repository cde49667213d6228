"""What a system's timed runs yield: per-run timings and the per-system result built from them."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from benchmarks.common import median


@dataclass
class RunTiming:
    wall_s: float
    tokens: int
    latency_s: list[float]          # per request, submit to last token
    ttft_s: list[float] = field(default_factory=list)  # per request, submit to first token (engine only)


@dataclass
class SystemResult:
    system: str
    description: str
    adapters: str                   # "8 distinct", "1 shared", "none"
    dtype: str
    quantize: str
    runs: list[RunTiming]
    outputs: list[list[int]]        # generated ids of the last timed run, per request
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def wall_s(self) -> float:
        return median([r.wall_s for r in self.runs])

    @property
    def tokens(self) -> int:
        return self.runs[0].tokens

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall_s

    @property
    def latency_s(self) -> float:
        """Median over runs of the mean per-request latency."""
        return median([sum(r.latency_s) / len(r.latency_s) for r in self.runs])

    @property
    def ttft_s(self) -> Optional[float]:
        if not all(r.ttft_s for r in self.runs):
            return None
        return median([sum(r.ttft_s) / len(r.ttft_s) for r in self.runs])

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "SystemResult":
        """The inverse of `asdict` after a JSON round trip (a child process hands results back so)."""
        return cls(**{**d, "runs": [RunTiming(**r) for r in d["runs"]]})
