"""The Triton backend (CUDA): one fused shrink and one expand launch per base projection.

Each projection (q/k/v, o, gate/up, down) runs `triton_sgmv.apply_lora_fused` on the pool's rank rows
and page table at the step's rank, x read once for all its targets; the kernel mode (SGMV for long
adapter segments, BGMV for decode-like ones, `triton_sgmv.pick_mode`) is chosen once per step. A
grouping of targets the model does not run takes the same kernels one target at a time.
Importing this module imports triton: `server/lora/factory.py` does so only when triton is wanted.
"""
from __future__ import annotations

import torch

from server.lora import triton_sgmv
from server.lora.backend import LoraBackend, LoraStep, StepRows, target_columns
from server.lora.pool import AdapterPool
from server.model.config import Projection


class TritonBackend(LoraBackend):
    name = "triton"

    def __init__(self, pool: AdapterPool):
        super().__init__(pool)
        config = pool.config
        self.fused: list[dict[Projection, triton_sgmv.FusedLora]] = []
        for layer in pool.stacks.projections:
            fused = {config.projection(targets): triton_sgmv.FusedLora.of(stacks) for targets, stacks in layer.items()}
            for targets, stacks in layer.items():  # each target alone, for groupings the model does not run
                for g, t in enumerate(targets):
                    fused.setdefault(config.projection((t,)), triton_sgmv.FusedLora.of(stacks.select(g)))
            self.fused.append(fused)

    def prepare_rows(self, rows: StepRows) -> "TritonStep":
        return TritonStep(self, rows)


class TritonStep(LoraStep):
    def __init__(self, backend: TritonBackend, rows: StepRows):
        self.backend, self.segments, self.rank = backend, rows.segments, rows.rank
        self.mode = triton_sgmv.pick_mode(rows.segments)

    def apply(self, y: torch.Tensor, x: torch.Tensor, layer: int, projection: Projection) -> torch.Tensor:
        fused = self.backend.fused[layer]
        whole = fused.get(projection)
        if whole is not None:
            return triton_sgmv.apply_lora_fused(y, x, whole, self.segments, rank=self.rank, mode=self.mode)
        for target, cols in target_columns(y, projection):
            one = fused[self.backend.pool.config.projection((target,))]
            triton_sgmv.apply_lora_fused(cols, x, one, self.segments, rank=self.rank, mode=self.mode)
        return y
