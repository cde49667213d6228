"""Group a flattened batch's tokens into runs that share an adapter slot.

The runner orders sequences by slot, so every slot's tokens are contiguous and a
segment is just [start, end) with one slot id. Kernels either run one small GEMM
per segment (prefill, SGMV) or gather per token (decode, BGMV); both read these.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class LoraSegments:
    """Segments of a batch of T tokens.

    token_slots: [T] int64 on the compute device, slot of each token (0 = no adapter).
    starts/ends/slots: host lists, one entry per segment of consecutive equal slots;
    segments of slot 0 are kept so every token is covered, and kernels skip them.
    seg_starts/seg_slots: the same on the device as int32, for kernels.
    """

    token_slots: torch.Tensor
    starts: tuple[int, ...]
    ends: tuple[int, ...]
    slots: tuple[int, ...]
    seg_starts: torch.Tensor  # [S + 1] int32
    seg_slots: torch.Tensor  # [S] int32
    cache: dict = field(default_factory=dict, compare=False, repr=False)  # per-step derived tensors

    @property
    def num_tokens(self) -> int:
        return int(self.token_slots.shape[0])

    @property
    def has_lora(self) -> bool:
        return any(s != 0 for s in self.slots)

    @property
    def max_segment_len(self) -> int:
        return max((e - s for s, e, sl in zip(self.starts, self.ends, self.slots) if sl != 0), default=0)

    @classmethod
    def from_token_slots(cls, token_slots: list[int], device: torch.device | str = "cpu") -> "LoraSegments":
        """Build from a per-token slot list; equal neighbours merge into one segment."""
        starts: list[int] = []
        ends: list[int] = []
        slots: list[int] = []
        for i, s in enumerate(token_slots):
            if slots and slots[-1] == s:
                ends[-1] = i + 1
            else:
                starts.append(i)
                ends.append(i + 1)
                slots.append(s)
        dev = torch.device(device)
        return cls(
            token_slots=torch.tensor(token_slots, dtype=torch.long, device=dev),
            starts=tuple(starts), ends=tuple(ends), slots=tuple(slots),
            seg_starts=torch.tensor(starts + [len(token_slots)], dtype=torch.int32, device=dev),
            seg_slots=torch.tensor(slots, dtype=torch.int32, device=dev),
        )

    @classmethod
    def from_sequences(cls, seq_slots: list[int], seq_lens: list[int],
                       device: torch.device | str = "cpu") -> "LoraSegments":
        """Build from per-sequence slots and token counts, in batch order."""
        per_token: list[int] = []
        for s, n in zip(seq_slots, seq_lens):
            per_token.extend([s] * n)
        return cls.from_token_slots(per_token, device)
