"""The rank rows' layout: a projection's targets share one tensor, each target's rows are one contiguous block,
a slot reads its ranks through the page table (zeros past its rank), and writes land in exactly the named rows
of one target."""
from __future__ import annotations

import torch

from server.lora.stacks import ProjectionStacks, RowStacks
from server.model.config import PROJECTIONS
from tests.lora.backend_utils import TINY


def test_target_views_share_the_projection_tensors_one_block_per_target():
    st = ProjectionStacks.zeros(("q", "k", "v"), (64, 32, 32), 64, num_slots=3, max_rank=8,
                                dtype=torch.float32, device="cpu")
    assert st.offsets == (0, 64, 96, 128)
    assert st.num_rows == 24 and st.num_slots == 3 and st.max_rank == 8
    assert st.pages[0].tolist() == [0] * 8 and st.pages[2].tolist() == list(range(16, 24))  # per-slot layout
    for g, w in enumerate(st.widths):
        a, bt = st.a_of(g), st.bt_of(g)
        assert a.shape == (24, 64) and bt.shape == (24, w)
        assert a.data_ptr() == st.a.data_ptr() + g * 24 * 64 * 4
        assert bt.data_ptr() == st.bt.data_ptr() + 24 * st.offsets[g] * 4
        assert a[16:21].is_contiguous() and bt[16:21].is_contiguous()  # what the per-slot bmm and the C kernel stream
    a = torch.randn(5, 64)
    b = torch.randn(32, 5)
    st.write(2, 1, a, b, 0.25)
    assert torch.equal(st.slot_a(1)[2, :5], a) and not st.slot_a(1)[2, 5:].any()
    assert torch.equal(st.slot_bt(1)[2, :5], b.t()) and torch.equal(st.slot_bt(1).transpose(1, 2)[2, :, :5], b)
    assert st.scale[1, 2] == 0.25 and st.scale.sum() == 0.25
    assert not st.slot_a(0).any() and not st.slot_a(2).any() and not st.slot_a(1)[:2].any()  # nothing else written
    assert int(st.bt.count_nonzero()) == int(b.count_nonzero())
    st.clear_rows(list(range(16, 24)))
    assert not st.a.any() and not st.bt.any()


def test_a_slot_reads_any_rows_its_page_table_names():
    """Rows need not be adjacent: a slot's rank j is wherever pages[slot, j] says, and past its rank row 0 (zeros)."""
    pages = torch.zeros(3, 4, dtype=torch.int32)
    st = ProjectionStacks.empty(("gate", "up"), (16, 16), 8, 10, pages, torch.float32, "cpu")
    rows = [7, 2, 9]
    a, b = torch.randn(3, 8), torch.randn(16, 3)
    st.write_rows(rows, 1, a, b)
    pages[1, :3] = torch.tensor(rows, dtype=torch.int32)
    assert torch.equal(st.a_of(1)[rows], a) and torch.equal(st.bt_of(1)[rows], b.t())
    assert torch.equal(st.slot_a(1)[1, :3], a) and not st.slot_a(1)[1, 3].any()  # rank 3 of 4: a zero row
    assert not st.slot_a(0).any()  # the other target's rows were never written
    one = st.select(1)
    assert one.targets == ("up",) and torch.equal(one.slot_a(0)[1, :3], a)
    assert torch.equal(one.slot_bt(0)[1, :3], b.t()) and one.bt.data_ptr() == st.bt_of(1).data_ptr()


def test_row_stacks_cover_every_projection_of_every_layer():
    pages = torch.zeros(3, 4, dtype=torch.int32)
    stacks = RowStacks(TINY, num_rows=9, pages=pages, dtype=torch.bfloat16, device="cpu")
    assert len(stacks.projections) == TINY.num_layers
    for layer in range(TINY.num_layers):
        assert tuple(stacks.projections[layer]) == PROJECTIONS
        for t in ("q", "o", "up", "down"):
            out_f, in_f = TINY.target_shape(t)
            assert stacks.a[layer][t].shape == (9, in_f) and stacks.bt[layer][t].shape == (9, out_f)
            assert stacks.scale[layer][t].dtype == torch.float32 and stacks.scale[layer][t].shape == (3,)
    stacks.write(1, [3, 4], 1, "up", torch.ones(2, 64), torch.ones(160, 2), 2.0)
    pages[1, :2] = torch.tensor([3, 4], dtype=torch.int32)
    assert stacks.slot_a(1, "up", 1)[:2].all() and not stacks.slot_a(1, "up", 1)[2:].any()
    assert not stacks.a[1]["gate"].any() and not stacks.a[0]["up"].any()
    assert stacks.scale[1]["up"][1] == 2.0
    assert stacks.nbytes == 2 * sum(s.a.numel() + s.bt.numel() for p in stacks.projections for s in p.values())
    assert stacks.nbytes == 9 * RowStacks.bytes_per_row(TINY, torch.bfloat16)
    stacks.clear(1, [3, 4])
    assert not stacks.a[1]["up"].any() and stacks.scale[1]["up"][1] == 0


def test_an_adapter_written_in_bulk_is_what_clear_then_write_per_module_leaves():
    """write_adapter (the pool's path: one staged buffer, one multi-tensor copy) against clear + write per
    module, bit for bit: over an older adapter's rows, rows in two runs, ranks below the rows (rank_pattern),
    targets the adapter lacks, and rounding to bf16."""
    from server.lora.weights import LoraModule

    g = torch.Generator().manual_seed(5)
    rows = [3, 4, 5, 8, 9]
    modules = {}
    for layer in range(TINY.num_layers):
        for t, r in (("q", 5), ("v", 3), ("up", 5), ("down", 2)):  # k, o, gate absent
            out_f, in_f = TINY.target_shape(t)
            modules[(layer, t)] = LoraModule(torch.randn(r, in_f, generator=g), torch.randn(out_f, r, generator=g),
                                             0.5 + layer)
    old = {k: LoraModule(torch.ones(5, m.a.shape[1]), torch.ones(m.b.shape[0], 5), 9.0) for k, m in modules.items()}
    old[(0, "gate")] = LoraModule(torch.ones(5, 64), torch.ones(160, 5), 9.0)
    for dtype in (torch.float32, torch.bfloat16):
        pages = torch.zeros(3, 8, dtype=torch.int32)
        bulk, per_module = (RowStacks(TINY, num_rows=12, pages=pages, dtype=dtype, device="cpu") for _ in range(2))
        for st in (bulk, per_module):
            for (layer, t), m in old.items():  # an older adapter's rows and scales in the same slot
                st.write(1, rows, layer, t, m.a, m.b, m.scale)
        bulk.write_adapter(1, rows, modules)
        per_module.clear(1, rows)
        for (layer, t), m in modules.items():
            per_module.write(1, rows, layer, t, m.a, m.b, m.scale)
        for layer in range(TINY.num_layers):
            for targets, st in bulk.projections[layer].items():
                ref = per_module.projections[layer][targets]
                assert torch.equal(st.a, ref.a) and torch.equal(st.bt, ref.bt), (layer, targets, dtype)
                assert torch.equal(st.scale, ref.scale), (layer, targets, dtype)
        assert bulk.scale[1]["up"][1] == 1.5 and bulk.scale[0]["gate"][1] == 0.0
