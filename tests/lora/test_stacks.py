"""The slot stacks' layout: a projection's targets share one tensor, each target's view is the shape the
kernels take, one contiguous block per slot, and writes land in exactly one target of one slot."""
from __future__ import annotations

import torch

from server.lora.stacks import ProjectionStacks, SlotStacks
from server.model.config import PROJECTIONS
from tests.lora.backend_utils import TINY


def test_target_views_share_the_projection_tensors_one_block_per_slot():
    st = ProjectionStacks.zeros(("q", "k", "v"), (64, 32, 32), 64, num_slots=3, max_rank=8,
                                dtype=torch.float32, device="cpu")
    assert st.offsets == (0, 64, 96, 128)
    for g, w in enumerate(st.widths):
        a, bt = st.a_of(g), st.bt_of(g)
        assert a.shape == (3, 8, 64) and bt.shape == (3, 8, w)
        assert a.data_ptr() == st.a.data_ptr() + g * 8 * 64 * 4
        assert a[1].is_contiguous() and bt[1].is_contiguous()  # what the per-slot bmm and the C kernel stream
    a = torch.randn(5, 64)
    b = torch.randn(32, 5)
    st.write(2, 1, a, b, 0.25)
    assert torch.equal(st.a_of(1)[2, :5], a) and not st.a_of(1)[2, 5:].any()
    assert torch.equal(st.bt_of(1)[2, :5], b.t()) and torch.equal(st.bt_of(1).transpose(1, 2)[2, :, :5], b)
    assert st.scale[1, 2] == 0.25 and st.scale.sum() == 0.25
    assert not st.a_of(0).any() and not st.a_of(2).any() and not st.a[:2].any()  # nothing else written
    assert int(st.bt.count_nonzero()) == int(b.count_nonzero())
    st.clear(2)
    assert not st.a.any() and not st.bt.any() and not st.scale.any()


def test_slot_stacks_cover_every_projection_of_every_layer():
    stacks = SlotStacks(TINY, num_slots=3, max_rank=4, dtype=torch.bfloat16, device="cpu")
    assert len(stacks.projections) == TINY.num_layers
    for layer in range(TINY.num_layers):
        assert tuple(stacks.projections[layer]) == PROJECTIONS
        for t in ("q", "o", "up", "down"):
            out_f, in_f = TINY.target_shape(t)
            assert stacks.a[layer][t].shape == (3, 4, in_f) and stacks.b[layer][t].shape == (3, out_f, 4)
            assert stacks.scale[layer][t].dtype == torch.float32
    stacks.write(1, 1, "up", torch.ones(2, 64), torch.ones(160, 2), 2.0)
    assert stacks.a[1]["up"][1, :2].all() and not stacks.a[1]["gate"].any() and not stacks.a[0]["up"].any()
    assert stacks.nbytes == 2 * sum(s.a.numel() + s.bt.numel() for p in stacks.projections for s in p.values())
