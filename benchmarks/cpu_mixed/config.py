"""What one `make bench` run is asked to do: the systems it can compare, the goals, the settings."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PEFT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ENGINE_SYSTEMS = ("loraserve", "loraserve-base", "loraserve-none", "loraserve-none-base")
HF_SYSTEMS = ("hf-base", "peft-mixed", "peft-single")
ALL_SYSTEMS = ENGINE_SYSTEMS + HF_SYSTEMS
REFERENCE = "peft-mixed"
GOAL_SPEEDUP = 6.0        # loraserve tok/s at least 6x PEFT mixed (issue 16; was 3x)
GOAL_LORA_OVERHEAD = 0.15  # LoRA at most 15% slower than our own no-adapter engine
GOAL_DECODE_OF_FLOOR = 0.5  # the no-adapter decode step at 50% or more of its roofline floor (issue 16)
DEFAULT_OUT = "benchmarks/results/cpu_mixed.json"


@dataclass
class BenchConfig:
    model: str = "default"          # "default" (SmolLM2-135M-Instruct), a .gguf or an HF directory
    requests: int = 8               # concurrent requests
    adapters: int = 8               # distinct adapters; request i uses adapter i % adapters
    rank: int = 16
    prompt_len: int = 64
    new_tokens: int = 32
    repeats: int = 5                # timed runs per system (after one warm-up)
    seed: int = 0
    quantize: str = "int8"          # loraserve's default (EngineConfig.quantize)
    systems: tuple[str, ...] = ALL_SYSTEMS
    out: str = DEFAULT_OUT
    workdir: str = ""               # where adapters are written; a temporary directory when empty
    home: str = ""                  # loraserve's model cache ($LORASERVE_HOME when empty)
    worker_timeout_s: float = 1800.0  # a child's set-up, round or finish taking longer kills it (and the run)

    def validate(self) -> None:
        unknown = [s for s in self.systems if s not in ALL_SYSTEMS]
        if unknown:
            raise ValueError(f"unknown systems {unknown}; choose from {', '.join(ALL_SYSTEMS)}")
        for name in ("requests", "adapters", "rank", "prompt_len", "new_tokens", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} is {getattr(self, name)}; need at least 1")
        if self.adapters > self.requests:
            raise ValueError(f"{self.adapters} adapters for {self.requests} requests: some would go unused")
        if self.worker_timeout_s <= 0:
            raise ValueError(f"worker_timeout_s is {self.worker_timeout_s}; need more than 0")

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "BenchConfig":
        """The inverse of `asdict` after a JSON round trip (systems come back as a list)."""
        return cls(**{**d, "systems": tuple(d["systems"])})

    def adapter_of(self, request: int) -> int:
        """The adapter request `request` uses."""
        return request % self.adapters
