"""The slot stacks: every adapter slot's LoRA weights side by side, laid out per fused base projection.

For one projection of one layer (q/k/v, o, gate/up or down: `server.model.config.PROJECTIONS`), G targets
of output widths w_g (W in all) reading in_features K, N slots and storage rank R:
    a      [N, G*R, K]   target g's A in rows g*R .. g*R+R
    bt     [N, R*W]      target g's B^T as one [R, w_g] block at columns R*o_g (o_g = w_0 + .. + w_{g-1})
    scale  [G, N] fp32   alpha / r (or alpha / sqrt(r)), 0 for slot 0 and untargeted modules
Each target's view is `[N, R, K]` (A), `[N, R, w_g]` (B^T) and `[N, w_g, R]` (B, what the torch reference
and the per-target kernels take), and within a slot each of them is one contiguous block: the per-slot
bmm of a decode step streams it (measured on CPU: 10 ms for a SmolLM2 step over 8 rank-16 slots, against
27 ms with rank-major stacks and their gathers). A projection's targets sharing one tensor is what lets
the Triton backend run a whole projection as one shrink and one expand (`triton_sgmv.apply_lora_fused`).
Ranks below R are zero-padded; slot 0 is all zeros, the bare base.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from server.model.config import PROJECTIONS, ModelConfig


@dataclass(frozen=True)
class ProjectionStacks:
    targets: tuple[str, ...]
    widths: tuple[int, ...]
    a: torch.Tensor      # [N, G*R, K]
    bt: torch.Tensor     # [N, R*W]
    scale: torch.Tensor  # [G, N] float32
    max_rank: int

    @classmethod
    def zeros(cls, targets: tuple[str, ...], widths: tuple[int, ...], in_features: int, num_slots: int,
              max_rank: int, dtype: torch.dtype, device: torch.device | str) -> "ProjectionStacks":
        """Empty stacks for `num_slots` slots, slot 0 included."""
        g, r = len(targets), max_rank
        return cls(tuple(targets), tuple(widths),
                   torch.zeros((num_slots, g * r, in_features), dtype=dtype, device=device),
                   torch.zeros((num_slots, r * sum(widths)), dtype=dtype, device=device),
                   torch.zeros((g, num_slots), dtype=torch.float32, device=device), max_rank)

    @property
    def offsets(self) -> tuple[int, ...]:
        """First output column of each target, and the total width last."""
        out = [0]
        for w in self.widths:
            out.append(out[-1] + w)
        return tuple(out)

    def a_of(self, g: int) -> torch.Tensor:
        """Target g's A, [N, R, K] (a view)."""
        r = self.max_rank
        return self.a[:, g * r:(g + 1) * r]

    def bt_of(self, g: int) -> torch.Tensor:
        """Target g's B^T, [N, R, w_g] (a view)."""
        r, lo = self.max_rank, self.offsets[g]
        return self.bt[:, r * lo:r * (lo + self.widths[g])].view(-1, r, self.widths[g])

    def clear(self, slot: int) -> None:
        self.a[slot].zero_()
        self.bt[slot].zero_()
        self.scale[:, slot] = 0.0

    def write(self, slot: int, g: int, a: torch.Tensor, b: torch.Tensor, scale: float,
              non_blocking: bool = False) -> None:
        """Target g of `slot` := A [r, K], B [w_g, r] (r <= R) and its scale; ranks past r keep their zeros."""
        r = a.shape[0]
        self.a_of(g)[slot, :r].copy_(a, non_blocking=non_blocking)
        self.bt_of(g)[slot, :r].copy_(b.t(), non_blocking=non_blocking)
        self.scale[g, slot] = scale

    @property
    def nbytes(self) -> int:
        return self.a.numel() * self.a.element_size() + self.bt.numel() * self.bt.element_size()


class SlotStacks:
    """Every layer's projection stacks in one dtype on one device, with each target's views by name.

    projections[layer][targets]  the ProjectionStacks of one projection (keyed by its target names)
    a, bt, b, scale[layer][t]    views of target t: [N, R, K], [N, R, w], [N, w, R], [N]
    """

    def __init__(self, config: ModelConfig, num_slots: int, max_rank: int, dtype: torch.dtype,
                 device: torch.device | str):
        self.dtype, self.max_rank = dtype, max_rank
        self.projections: list[dict[tuple[str, ...], ProjectionStacks]] = []
        self.a: list[dict[str, torch.Tensor]] = []
        self.bt: list[dict[str, torch.Tensor]] = []
        self.b: list[dict[str, torch.Tensor]] = []
        self.scale: list[dict[str, torch.Tensor]] = []
        self._where: dict[str, tuple[tuple[str, ...], int]] = {}  # target -> (its projection, index in it)
        for _ in range(config.num_layers):
            projections, a, bt, b, scale = {}, {}, {}, {}, {}
            for targets in PROJECTIONS:
                widths = tuple(config.target_shape(t)[0] for t in targets)
                stacks = ProjectionStacks.zeros(targets, widths, config.target_shape(targets[0])[1], num_slots,
                                                max_rank, dtype, device)
                projections[targets] = stacks
                for g, t in enumerate(targets):
                    a[t], bt[t], scale[t] = stacks.a_of(g), stacks.bt_of(g), stacks.scale[g]
                    b[t] = bt[t].transpose(1, 2)
                    self._where[t] = (targets, g)
            self.projections.append(projections)
            self.a.append(a)
            self.bt.append(bt)
            self.b.append(b)
            self.scale.append(scale)

    def clear(self, slot: int) -> None:
        for layer in self.projections:
            for stacks in layer.values():
                stacks.clear(slot)

    def write(self, slot: int, layer: int, target: str, a: torch.Tensor, b: torch.Tensor, scale: float,
              non_blocking: bool = False) -> None:
        targets, g = self._where[target]
        self.projections[layer][targets].write(slot, g, a, b, scale, non_blocking)

    @property
    def nbytes(self) -> int:
        """Bytes of the A and B stacks (the scales are a few floats)."""
        return sum(s.nbytes for layer in self.projections for s in layer.values())
