"""The torch reference as a backend: `torch_ref` on per-slot stacks of the step's adapters, at the step's rank.

Any device and dtype. It is also what the other backends fall back to for a projection their
kernels have no plan for. `torch_ref` takes stacks of slots ([slots, R, in]); the pool keeps rank rows
found through a page table (`server/lora/stacks.py`), so a step either views them or gathers them:
  - view: when the step's adapter rows form a contiguous run of slots (`torch_ref.contiguous_run`: every
    decode step of distinct adapters) whose rows lie in slot order, adjacent, each at the step's rank
    (adapters of one rank loaded one after another: the allocator keeps their rows adjacent), each target
    takes four ops on weight views prepared once per (slots, rows, rank) and kept: no copy. On the 2-core
    CPU the per-linear Python and slicing overhead was worth as much as the LoRA math itself;
  - gather: otherwise each target's rows of the step's adapters are gathered once per step and
    projection use into small stacks ([adapters + 1, R, in], slot 0 zero), zero past each adapter's rank
    as the page table says, and `torch_ref` runs on those with the step's slots renumbered 1..m.
A step's decode rows and prompt rows are taken apart, each choosing its way and its `torch_ref` path.
"""
from __future__ import annotations

from typing import Optional

import torch

from server.lora import torch_ref
from server.lora.backend import LoraBackend, LoraStep, StepRows, target_columns
from server.lora.pool import AdapterPool
from server.lora.segments import LoraSegments
from server.model.config import TARGETS, Projection

_Views = list[dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]


class TorchBackend(LoraBackend):
    name = "torch"

    def __init__(self, pool: AdapterPool):
        super().__init__(pool)
        self._run_views: dict[tuple[int, int, int, int], _Views] = {}

    def prepare_rows(self, rows: StepRows) -> "TorchStep":
        return TorchStep(self, rows)

    def run_views(self, lo: int, m: int, row0: int, rank: int) -> _Views:
        """Per layer and target, `torch_ref.run_views`-shaped (A^T [m, in, R], B^T [m, R, out], scale [m, 1, 1])
        of slots lo..lo+m-1 whose ranks are rows row0 .. row0 + m * rank - 1 in order; cached (views of the
        rows, so they stay right for as long as `adjacent_rows` says those slots sit there)."""
        key = (lo, m, row0, rank)
        views = self._run_views.get(key)
        if views is None:
            if len(self._run_views) >= 64:
                self._run_views.clear()
            st, end = self.pool.stacks, row0 + m * rank
            views = [{t: (st.a[i][t][row0:end].view(m, rank, -1).transpose(1, 2),
                          st.bt[i][t][row0:end].view(m, rank, -1), st.scale[i][t][lo:lo + m].view(m, 1, 1))
                      for t in TARGETS}
                     for i in range(self.pool.config.num_layers)]
            self._run_views[key] = views
        return views

    def adjacent_rows(self, lo: int, m: int, rank: int) -> Optional[int]:
        """The first row when slots lo..lo+m-1 each hold exactly `rank` adjacent rows, one slot after the other."""
        first = self.pool.rows_of(lo)
        if not first:
            return None
        row0 = first[0]
        for i in range(m):
            rows = self.pool.rows_of(lo + i)
            if len(rows) != rank or rows[0] != row0 + i * rank or rows[-1] != rows[0] + rank - 1:
                return None
        return row0


class TorchStep(LoraStep):
    """Decode rows and prompt rows (each kind sorted by slot, `StepRows`) are two parts, each taking its own
    path: a mixed step's decode rows still form one run or one padded bmm beside a prompt's long segment."""

    def __init__(self, backend: TorchBackend, rows: StepRows):
        self.rank = rows.rank
        slots, nd = rows.adapter_slots, rows.num_decode
        bounds = [(0, nd), (nd, len(slots))] if 0 < nd < len(slots) else [(0, len(slots))]
        self.parts = [_Part(backend, slots[lo:hi], lo, rows.rank) for lo, hi in bounds if any(slots[lo:hi])]

    @property
    def views(self) -> Optional[_Views]:
        """The weight views of a step of one part read in place (None when its rows are gathered)."""
        return self.parts[0].views if len(self.parts) == 1 else None

    def apply(self, y: torch.Tensor, x: torch.Tensor, layer: int, projection: Projection) -> torch.Tensor:
        for part in self.parts:
            part.apply(y[part.lo:part.hi], x[part.lo:part.hi], layer, projection)
        return y


class _Part:
    """Rows lo..hi of a step: viewed in place when they form a run of slots over adjacent rows, else gathered."""

    def __init__(self, backend: TorchBackend, slots: list[int], lo: int, rank: int):
        pool = backend.pool
        self.lo, self.hi, self.stacks, self.rank = lo, lo + len(slots), pool.stacks, rank
        segments = LoraSegments.from_token_slots(slots, pool.device)
        self.run = torch_ref.contiguous_run(segments)
        self.views: Optional[_Views] = None
        if self.run is not None:
            first, m = self.run[1], self.run[2]
            row0 = backend.adjacent_rows(first, m, rank)
            if row0 is not None:
                self.views = backend.run_views(first, m, row0, rank)
        if self.views is None:  # gather: the part's slots renumbered 1..m, slot 0 stays the bare base
            used = sorted({s for s in slots if s})
            local = {s: i + 1 for i, s in enumerate(used)}
            self.segments = LoraSegments.from_token_slots([local.get(s, 0) for s in slots], pool.device)
            self.path = torch_ref.choose_path(self.segments)
            self.slots = torch.tensor([0, *used], dtype=torch.long, device=pool.device)
            self.rows = pool.pages.index_select(0, self.slots)[:, :rank].reshape(-1).long()

    def apply(self, y: torch.Tensor, x: torch.Tensor, layer: int, projection: Projection) -> None:
        for target, cols in target_columns(y, projection):
            if self.views is not None:
                assert self.run is not None
                torch_ref.apply_run(cols, x, *self.views[layer][target], self.run)
                continue
            st, n, r = self.stacks, self.slots.shape[0], self.rank
            a = st.a[layer][target].index_select(0, self.rows).view(n, r, -1)
            b = st.bt[layer][target].index_select(0, self.rows).view(n, r, -1).transpose(1, 2)
            torch_ref.apply_lora(cols, x, a, b, st.scale[layer][target].index_select(0, self.slots),
                                 self.segments, self.path)
