"""The LoRA backend interface: how an engine multiplies each step's rows by their adapters' weights.

An engine has one backend, chosen once from its config by `server/lora/factory.py`:
    torch   the reference (`torch_ref.py`) on the pool's stacks, any device and dtype
            (server/lora/torch_backend.py); the specification the other two are tested against
    cpu     the bf16 C kernels (`cpu_kernel.py`) on bf16 copies of the stacks, on CPU where the
            base is quantized (server/lora/cpu_backend.py)
    triton  the Triton SGMV/BGMV kernels (`triton_sgmv.py`), CUDA (server/lora/triton_backend.py)
The pool (`pool.py`) only allocates and loads slots; a backend reads its stacks. Each step the runner
calls `prepare` once (the per-step work: segments, the step's rank, the path the kernels take), and
the model calls the returned step's `apply` once per base projection (q/k/v, o, gate/up, down): one
entry point for a projection and its targets' output columns, so a backend can read x once for all.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from server.lora.pool import AdapterPool
from server.lora.segments import LoraSegments
from server.model.config import Projection
from server.model.fused_decode import NativeLora


@dataclass(frozen=True)
class StepRows:
    """A step's rows as LoRA sees them: row i uses adapter slot adapter_slots[i] (0: none); the first
    num_decode rows are decode tokens, then prompt tokens, each kind sorted by slot (the runner's order)."""

    adapter_slots: list[int]
    num_decode: int
    segments: LoraSegments
    rank: int  # the largest rank among the step's adapters


class LoraStep(ABC):
    """One step's LoRA, what the model calls (`server.model.llama.LoraDeltas`)."""

    @abstractmethod
    def apply(self, y: torch.Tensor, x: torch.Tensor, layer: int, projection: Projection) -> torch.Tensor:
        """y += each row's adapter delta for the targets of `projection` (their outputs side by side in
        y, as it lists them), x the projection's input; in place, returns y."""

    def native(self) -> Optional[NativeLora]:
        """The step as C calls for the model's fused step driver (server/model/fused_decode.py), where the
        backend has them; None otherwise (the model then calls `apply`)."""
        return None


class LoraBackend(ABC):
    name: ClassVar[str]

    def __init__(self, pool: AdapterPool):
        self.pool = pool
        self.description = self.name  # what runs, in words (the factory says why; logs and benchmark files)

    def prepare(self, adapter_slots: list[int], num_decode: int) -> Optional[LoraStep]:
        """The LoRA of one step (see `StepRows`); None when no row has an adapter."""
        rank = self.pool.max_rank_of(adapter_slots)
        if rank == 0:
            return None
        segments = LoraSegments.from_token_slots(adapter_slots, self.pool.device)
        return self.prepare_rows(StepRows(adapter_slots, num_decode, segments, rank))

    @abstractmethod
    def prepare_rows(self, rows: StepRows) -> LoraStep:
        """The backend's per-step work, done once before the model runs."""


def target_columns(y: torch.Tensor, projection: Projection) -> list[tuple[str, torch.Tensor]]:
    """(target, its column slice of y) for each target of a projection."""
    out, lo = [], 0
    for target, width in projection:
        out.append((target, y[:, lo:lo + width]))
        lo += width
    return out
