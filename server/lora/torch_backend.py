"""The torch reference as a backend: `torch_ref` on the pool's stacks, sliced to each step's rank.

Any device and dtype. It is also what the other backends fall back to for a projection their
kernels have no plan for. When a step's adapter rows form a contiguous run of slots
(`torch_ref.contiguous_run`: every decode step of distinct adapters), each target takes four ops
on weight views prepared once per (slots, rank) and kept: on the 2-core CPU the per-linear Python
and slicing overhead was worth as much as the LoRA math itself.
"""
from __future__ import annotations

from typing import Optional

import torch

from server.lora import torch_ref
from server.lora.backend import LoraBackend, LoraStep, StepRows, target_columns
from server.lora.pool import AdapterPool
from server.model.config import TARGETS, Projection

_Views = list[dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]


class TorchBackend(LoraBackend):
    name = "torch"

    def __init__(self, pool: AdapterPool):
        super().__init__(pool)
        self._run_views: dict[tuple[int, int, int], _Views] = {}

    def prepare_rows(self, rows: StepRows) -> "TorchStep":
        return TorchStep(self, rows)

    def run_views(self, lo: int, m: int, rank: int) -> _Views:
        """Per layer and target, `torch_ref.run_views` of slots lo..lo+m-1 at `rank`; cached (views
        of the stacks, so loads into those slots show through)."""
        key = (lo, m, rank)
        views = self._run_views.get(key)
        if views is None:
            if len(self._run_views) >= 64:
                self._run_views.clear()
            st = self.pool.stacks
            views = [{t: torch_ref.run_views(st.a[i][t][:, :rank], st.b[i][t][:, :, :rank], st.scale[i][t], lo, m)
                      for t in TARGETS}
                     for i in range(self.pool.config.num_layers)]
            self._run_views[key] = views
        return views


class TorchStep(LoraStep):
    def __init__(self, backend: TorchBackend, rows: StepRows):
        self.stacks, self.segments, self.rank = backend.pool.stacks, rows.segments, rows.rank
        self.path = torch_ref.choose_path(rows.segments)
        self.run = torch_ref.contiguous_run(rows.segments)
        self.views: Optional[_Views] = (backend.run_views(self.run[1], self.run[2], rows.rank)
                                        if self.run is not None else None)

    def apply(self, y: torch.Tensor, x: torch.Tensor, layer: int, projection: Projection) -> torch.Tensor:
        for target, cols in target_columns(y, projection):
            if self.views is not None:
                torch_ref.apply_run(cols, x, *self.views[layer][target], self.run)
                continue
            st, r = self.stacks, self.rank
            torch_ref.apply_lora(cols, x, st.a[layer][target][:, :r], st.b[layer][target][:, :, :r],
                                 st.scale[layer][target], self.segments, self.path)
        return y
