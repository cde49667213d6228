"""Adapter memory: every resident adapter's LoRA weights as rank rows, found through one page table.

A *rank row* holds one rank of one adapter for every targeted linear of every layer. For one projection of
one layer (q/k/v, o, gate/up or down: `server.model.config.PROJECTIONS`): G targets of output widths w_g
(W in all) reading in_features K, P rows (row 0 the zero row) and N slots:
    a      [G, P, K]     target g's A, one row per rank: a[g, p]
    bt     [P * W]       target g's B^T as one [P, w_g] block at P * o_g (o_g = w_0 + .. + w_{g-1})
    scale  [G, N] fp32   alpha / r (or alpha / sqrt(r)) per slot; 0 for slot 0 and untargeted modules
    a_scale, bt_scale [G, P] fp32  int8 stacks only (the CPU kernel's int8 copies): each row's scale, the row
                         holding round(values / scale) with scale = max |value| / 127
and, shared by every projection of every layer,
    pages  [N, R] int32  rank j of the adapter in slot s is row pages[s, j]; past its rank, and for slot 0,
                         row 0 (all zeros), so a step at rank R reads zeros there as it read zero padding
An adapter of rank r holds r rows, not R (S-LoRA's unified paging, at rank-row granularity); which rows are
free is `server/lora/rows.py`'s business. When an adapter's rows are adjacent (the allocator prefers it) each
target's A rows are one contiguous [r, K] block and its B^T rows one [r, w_g] block, the blocks the C kernel
streams. A projection's targets sharing one tensor is what lets the Triton backend run a whole projection as
one shrink and one expand (`triton_sgmv.apply_lora_fused`); the page table is what lets every backend read
any adapter in one call per projection wherever its rows are.

`ProjectionStacks.zeros` builds the plain per-slot layout too (N slots of R adjacent rows, slot s at rows
s*R .. s*R+R-1): what the kernel tests and benchmarks use without a pool.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch

from server.lora.rows import runs
from server.model.config import PROJECTIONS, ModelConfig


@dataclass(frozen=True)
class ProjectionStacks:
    targets: tuple[str, ...]
    widths: tuple[int, ...]
    a: torch.Tensor      # [G, P, K]
    bt: torch.Tensor     # [P * W]
    scale: torch.Tensor  # [G, N] float32
    pages: torch.Tensor  # [N, R] int32, shared with every other projection of the pool
    a_scale: Optional[torch.Tensor] = None   # [G, P] float32, int8 rows only
    bt_scale: Optional[torch.Tensor] = None  # [G, P] float32, int8 rows only

    @classmethod
    def empty(cls, targets: tuple[str, ...], widths: tuple[int, ...], in_features: int, num_rows: int,
              pages: torch.Tensor, dtype: torch.dtype, device: torch.device | str) -> "ProjectionStacks":
        """All-zero rows 0..num_rows-1 (row 0 included) read through `pages`."""
        g = len(targets)
        row_scales = ((torch.zeros((g, num_rows), dtype=torch.float32, device=device),
                       torch.zeros((g, num_rows), dtype=torch.float32, device=device))
                      if dtype == torch.int8 else (None, None))
        return cls(tuple(targets), tuple(widths),
                   torch.zeros((g, num_rows, in_features), dtype=dtype, device=device),
                   torch.zeros((num_rows * sum(widths),), dtype=dtype, device=device),
                   torch.zeros((g, pages.shape[0]), dtype=torch.float32, device=device), pages, *row_scales)

    @classmethod
    def zeros(cls, targets: tuple[str, ...], widths: tuple[int, ...], in_features: int, num_slots: int,
              max_rank: int, dtype: torch.dtype, device: torch.device | str) -> "ProjectionStacks":
        """The per-slot layout: `num_slots` slots (slot 0 included, all zero) of `max_rank` adjacent rows each."""
        pages = torch.arange(num_slots * max_rank, dtype=torch.int32).view(num_slots, max_rank)
        pages[0] = 0
        return cls.empty(targets, widths, in_features, num_slots * max_rank, pages.to(device), dtype, device)

    @property
    def max_rank(self) -> int:
        return int(self.pages.shape[1])

    @property
    def num_rows(self) -> int:
        """Rows in all, the zero row included."""
        return int(self.a.shape[1])

    @property
    def num_slots(self) -> int:
        return int(self.pages.shape[0])

    @property
    def offsets(self) -> tuple[int, ...]:
        """First output column of each target, and the total width last."""
        out = [0]
        for w in self.widths:
            out.append(out[-1] + w)
        return tuple(out)

    def a_of(self, g: int) -> torch.Tensor:
        """Target g's A rows, [P, K] (a view)."""
        return self.a[g]

    def bt_of(self, g: int) -> torch.Tensor:
        """Target g's B^T rows, [P, w_g] (a view)."""
        p, lo = self.num_rows, self.offsets[g]
        return self.bt[p * lo:p * (lo + self.widths[g])].view(p, self.widths[g])

    def select(self, g: int) -> "ProjectionStacks":
        """Target g alone, as a projection of one target (views of the same rows, scales and page table)."""
        return ProjectionStacks((self.targets[g],), (self.widths[g],), self.a[g:g + 1],
                                self.bt_of(g).reshape(-1), self.scale[g:g + 1], self.pages,
                                None if self.a_scale is None else self.a_scale[g:g + 1],
                                None if self.bt_scale is None else self.bt_scale[g:g + 1])

    def row_scales(self, targets: list[int]) -> Optional[list[tuple[torch.Tensor, torch.Tensor]]]:
        """Per target g in `targets`, the scales of its A rows and of its B^T rows ([P] views); None for rows
        that are not int8 (they need none)."""
        if self.a_scale is None or self.bt_scale is None:
            return None
        return [(self.a_scale[g], self.bt_scale[g]) for g in targets]

    def slot_a(self, g: int) -> torch.Tensor:
        """Target g's A of every slot, [N, R, K], zero past each adapter's rank (a gathered copy)."""
        n, r = self.pages.shape
        return self.a_of(g).index_select(0, self.pages.reshape(-1)).view(n, r, -1)

    def slot_bt(self, g: int) -> torch.Tensor:
        """Target g's B^T of every slot, [N, R, w_g] (a gathered copy)."""
        n, r = self.pages.shape
        return self.bt_of(g).index_select(0, self.pages.reshape(-1)).view(n, r, -1)

    def write_rows(self, rows: list[int], g: int, a: torch.Tensor, b: torch.Tensor,
                   non_blocking: bool = False) -> None:
        """Target g's A [r, K] and B [w_g, r] into the first r of `rows` (r <= len(rows))."""
        r = a.shape[0]
        a_rows, bt_rows, b_t = self.a_of(g), self.bt_of(g), b.t()
        if self.a_scale is not None and self.bt_scale is not None:
            (a, a_sc), (b_t, bt_sc) = quantize_rows(a), quantize_rows(b_t)
            for first, at, n in runs(rows[:r]):
                self.a_scale[g, first:first + n].copy_(a_sc[at:at + n])
                self.bt_scale[g, first:first + n].copy_(bt_sc[at:at + n])
        for first, at, n in runs(rows[:r]):
            a_rows[first:first + n].copy_(a[at:at + n], non_blocking=non_blocking)
            bt_rows[first:first + n].copy_(b_t[at:at + n], non_blocking=non_blocking)

    def clear_rows(self, rows: list[int]) -> None:
        for first, _, n in runs(rows):
            self.a[:, first:first + n].zero_()
            for g in range(len(self.targets)):
                self.bt_of(g)[first:first + n].zero_()
            for sc in (self.a_scale, self.bt_scale):
                if sc is not None:
                    sc[:, first:first + n].zero_()

    def write(self, slot: int, g: int, a: torch.Tensor, b: torch.Tensor, scale: float,
              non_blocking: bool = False) -> None:
        """Target g of `slot` := A [r, K], B [w_g, r] (r <= R) and its scale, into the rows its page table names."""
        self.write_rows(self.pages[slot, :a.shape[0]].tolist(), g, a, b, non_blocking)
        self.scale[g, slot] = scale

    @property
    def nbytes(self) -> int:
        scales = sum(t.numel() * 4 for t in (self.a_scale, self.bt_scale) if t is not None)
        return self.a.numel() * self.a.element_size() + self.bt.numel() * self.bt.element_size() + scales


def quantize_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 rows [n, k] -> (int8 [n, k], fp32 [n]): symmetric, one scale a row (max |value| / 127), so
    rows * scale[:, None] is the row to within half a step; an all-zero row has scale 0."""
    rows = rows.float()
    scale = rows.abs().amax(dim=1) / 127.0
    q = torch.round(rows / scale.clamp(min=torch.finfo(torch.float32).tiny)[:, None]).clamp_(-127, 127)
    return q.to(torch.int8), scale


class RowStacks:
    """Every layer's projection rows in one dtype on one device, read through one page table.

    projections[layer][targets]  the ProjectionStacks of one projection (keyed by its target names)
    a, bt, scale[layer][t]       views of target t: rows [P, K], rows [P, w], per slot [N]
    """

    def __init__(self, config: ModelConfig, num_rows: int, pages: torch.Tensor, dtype: torch.dtype,
                 device: torch.device | str):
        """`num_rows` rows in all (row 0, the zero row, included); `pages` [N, R] int32 on `device`."""
        self.dtype, self.pages = dtype, pages
        self.max_rank = int(pages.shape[1])
        self.projections: list[dict[tuple[str, ...], ProjectionStacks]] = []
        self.a: list[dict[str, torch.Tensor]] = []
        self.bt: list[dict[str, torch.Tensor]] = []
        self.scale: list[dict[str, torch.Tensor]] = []
        self._where: dict[str, tuple[tuple[str, ...], int]] = {}  # target -> (its projection, index in it)
        for _ in range(config.num_layers):
            projections, a, bt, scale = {}, {}, {}, {}
            for targets in PROJECTIONS:
                widths = tuple(config.target_shape(t)[0] for t in targets)
                stacks = ProjectionStacks.empty(targets, widths, config.target_shape(targets[0])[1], num_rows,
                                                pages, dtype, device)
                projections[targets] = stacks
                for g, t in enumerate(targets):
                    a[t], bt[t], scale[t] = stacks.a_of(g), stacks.bt_of(g), stacks.scale[g]
                    self._where[t] = (targets, g)
            self.projections.append(projections)
            self.a.append(a)
            self.bt.append(bt)
            self.scale.append(scale)

    @staticmethod
    def bytes_per_row(config: ModelConfig, dtype: torch.dtype) -> int:
        """What one rank row costs: A and B^T of every target of every layer."""
        per_layer = sum(config.target_shape(t)[1] + config.target_shape(t)[0] for targets in PROJECTIONS
                        for t in targets)
        scales = 2 * 4 * sum(len(targets) for targets in PROJECTIONS) if dtype == torch.int8 else 0
        return (per_layer * torch.empty((), dtype=dtype).element_size() + scales) * config.num_layers

    def clear(self, slot: int, rows: list[int]) -> None:
        """Zero `rows` of every target and the slot's scales (before an adapter is written there)."""
        for layer in self.projections:
            for stacks in layer.values():
                stacks.clear_rows(rows)
                stacks.scale[:, slot] = 0.0

    def write_adapter(self, slot: int, rows: list[int], modules: Mapping[tuple[int, str], Any],
                      pinned: bool = False) -> None:
        """One adapter into `rows` of every target of every layer (float stacks): `modules[(layer, target)]`
        has A [r, K], B [w, r] and its scale (r <= len(rows)); rows past a module's rank, and every row of a
        target it lacks, become zero, as do those targets' scales. What `clear` then `write` per module do, in
        a few bulk operations instead of hundreds of small ones: the rows are staged into one host buffer in the
        stacks' dtype (pinned when `pinned`, so the copy to the device is one asynchronous DMA), then one
        multi-tensor copy puts them in place and one multi-tensor zeroing clears the rest. On a GPU a cold load
        from host memory is otherwise hundreds of kernel launches and staged copies, each a few microseconds."""
        if self.dtype == torch.int8:
            raise ValueError("int8 stacks quantize each row as it is written: use clear and write")
        dst, shapes, srcs, zeros = [], [], [], []
        scale_dst, scale_src = [], []
        for layer, projections in enumerate(self.projections):
            for targets, stacks in projections.items():
                scale_dst.append(stacks.scale[:, slot])
                scale_src.append([0.0] * len(targets))
                for g, t in enumerate(targets):
                    m = modules.get((layer, t))
                    r = 0 if m is None else int(m.a.shape[0])
                    a_rows, bt_rows = stacks.a_of(g), stacks.bt_of(g)
                    if m is not None:
                        scale_src[-1][g] = float(m.scale)
                        b_t = m.b.t()
                        for first, at, n in runs(rows[:r]):
                            for rows_of, src in ((a_rows, m.a), (bt_rows, b_t)):
                                dst.append(rows_of[first:first + n])
                                srcs.append(src[at:at + n])
                                shapes.append(dst[-1].shape)
                    for first, _, n in runs(rows[r:]):
                        zeros += [a_rows[first:first + n], bt_rows[first:first + n]]
        device, pin = self.pages.device, pinned and torch.cuda.is_available()
        offsets = [0]
        for shape in shapes:
            offsets.append(offsets[-1] + shape.numel())

        def views(buf: torch.Tensor) -> list[torch.Tensor]:
            return [buf[o:o + s.numel()].view(s) for o, s in zip(offsets, shapes)]

        if dst:
            flat = torch.empty(offsets[-1], dtype=self.dtype, pin_memory=pin)
            torch._foreach_copy_(views(flat), srcs)  # host: converts to the stacks' dtype, B^T made contiguous
            torch._foreach_copy_(dst, views(flat.to(device, non_blocking=pinned)))  # .to: a no-op on the same device
        if zeros:
            torch._foreach_zero_(zeros)
        scales = torch.tensor([v for vals in scale_src for v in vals], dtype=torch.float32, pin_memory=pin)
        scales = scales.to(device, non_blocking=pinned)
        at = 0
        for d in scale_dst:
            d.copy_(scales[at:at + d.numel()])
            at += d.numel()

    def write(self, slot: int, rows: list[int], layer: int, target: str, a: torch.Tensor, b: torch.Tensor,
              scale: float, non_blocking: bool = False) -> None:
        targets, g = self._where[target]
        stacks = self.projections[layer][targets]
        stacks.write_rows(rows, g, a, b, non_blocking)
        stacks.scale[g, slot] = scale

    def slot_a(self, layer: int, target: str, slot: int) -> torch.Tensor:
        """The A of target t in `slot`, [R, K], zero past its rank (a gathered copy)."""
        return self.a[layer][target].index_select(0, self.pages[slot])

    def slot_bt(self, layer: int, target: str, slot: int) -> torch.Tensor:
        """The B^T of target t in `slot`, [R, w] (a gathered copy)."""
        return self.bt[layer][target].index_select(0, self.pages[slot])

    @property
    def nbytes(self) -> int:
        """Bytes of the A and B rows (page table and scales are a few KB)."""
        return sum(s.nbytes for layer in self.projections for s in layer.values())
