"""The CPU prompt attention kernel: torch SDPA's result, and a prompt token's bits whatever its batch,
whatever part of its prompt was cached, and whatever else shares the call."""
from __future__ import annotations

import pytest
import torch

from server.attention import context_kernel
from server.attention.sdpa import AttentionMetadata, _prefill_after_prefix, paged_attention, sdpa_causal

KERN = context_kernel.load()


@pytest.fixture(autouse=True)
def _kernel_built():
    assert KERN is not None, "the context attention kernel did not build here (no gcc?); the log says why"


def _cache(rows=1024, nkv=3, hd=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, nkv, hd, generator=g), torch.randn(rows, nkv, hd, generator=g)


def _pages(n: int, g: torch.Generator, rows: int = 1024) -> torch.Tensor:
    """Cache rows of an n-token context laid out as the paged cache does: blocks of 16 in scattered order."""
    blocks = torch.randperm(rows // 16, generator=g)[:(n + 15) // 16]
    return (blocks[:, None] * 16 + torch.arange(16)).reshape(-1)[:n].contiguous()


# Shapes compiled as constants (SmolLM2's 9/3 x 64, Llama's 32/8 x 64, 8/8 x 128, ...) and others on the
# run-time-sized path (3 query heads of width 48, 5 heads of 16).
@pytest.mark.parametrize("nh,nkv,hd", [(9, 3, 64), (32, 8, 64), (8, 8, 64), (8, 2, 128), (6, 3, 48), (5, 1, 16)])
def test_matches_sdpa_over_the_gathered_context(nh, nkv, hd):
    k, v = _cache(nkv=nkv, hd=hd)
    g = torch.Generator().manual_seed(1)
    for n, L in [(1, 1), (1, 37), (5, 5), (17, 40), (33, 33), (32, 544), (3, 100)]:
        q = torch.randn(n, nh, hd, generator=g) * 3
        rows = _pages(L, g)
        want = _prefill_after_prefix(q, (k, v), rows)
        torch.testing.assert_close(KERN(q, k, v, [(0, n)], [rows]), want, rtol=1e-5, atol=2e-6)


def test_a_from_scratch_prompt_equals_causal_attention():
    k, v = _cache()
    g = torch.Generator().manual_seed(2)
    rows = _pages(200, g)
    q = torch.randn(200, 9, 64, generator=g)
    want = sdpa_causal(q, k[rows], v[rows])
    torch.testing.assert_close(KERN(q, k, v, [(0, 200)], [rows]), want, rtol=1e-5, atol=2e-6)


def test_a_tokens_bits_depend_only_on_its_own_context():
    """The last 24 tokens of a 90-token prompt: computed with 66 of its tokens cached, with none cached, alone
    and beside other prompts in one call, give the same bits."""
    k, v = _cache()
    g = torch.Generator().manual_seed(3)
    rows = _pages(90, g)
    q = torch.randn(90, 9, 64, generator=g)
    full = KERN(q, k, v, [(0, 90)], [rows])[66:]
    suffix = KERN(q[66:], k, v, [(0, 24)], [rows])
    assert torch.equal(full, suffix)
    for others in ([7], [1, 300], [45, 12, 128]):
        qs = [torch.randn(n, 9, 64, generator=g) for n in others]
        ctx = [_pages(n + 50, g) for n in others]
        batch = torch.cat([*qs, q[66:]])
        runs, start = [], 0
        for n in [*others, 24]:
            runs.append((start, n))
            start += n
        out = KERN(batch, k, v, runs, [*ctx, rows])
        assert torch.equal(out[-24:], suffix)


def test_q_as_a_view_of_the_fused_qkv_rows_gives_the_contiguous_result():
    k, v = _cache()
    g = torch.Generator().manual_seed(4)
    qkv = torch.randn(20, (9 + 2 * 3) * 64, generator=g)
    q = qkv[:, :9 * 64].view(20, 9, 64)
    rows = _pages(50, g)
    assert torch.equal(KERN(q, k, v, [(0, 20)], [rows]), KERN(q.contiguous(), k, v, [(0, 20)], [rows]))


def test_calls_are_split_to_bound_the_workspace(monkeypatch):
    """Past MAX_WORKSPACE floats of transposed keys, the sequences go in several calls: same result."""
    k, v = _cache()
    g = torch.Generator().manual_seed(5)
    runs, ctx, start = [], [], 0
    for n in (10, 20, 30):
        runs.append((start, n))
        ctx.append(_pages(n + 100, g))
        start += n
    q = torch.randn(start, 9, 64, generator=g)
    whole = KERN(q, k, v, runs, ctx)
    monkeypatch.setattr(context_kernel, "MAX_WORKSPACE", KERN.workspace(140, k))
    assert len(KERN.plan(runs, ctx, k)) == 3
    assert torch.equal(KERN(q, k, v, runs, ctx), whole)
    with pytest.raises(ValueError, match="workspace"):
        KERN(q, k, v, [(0, 10)], [_pages(300, g)])


def test_paged_attention_serves_a_mixed_step_with_it(monkeypatch):
    """A step with a prompt from position 0, one after a cached prefix and a decode token: each equals
    torch's attention over its own context, and the kernel served both prompts in one call a layer."""
    planned, ran = [], []
    plan, run = context_kernel.ContextAttention.plan, context_kernel.ContextAttention.run
    monkeypatch.setattr(context_kernel.ContextAttention, "plan",
                        lambda self, runs, *a: planned.append(list(runs)) or plan(self, runs, *a))
    monkeypatch.setattr(context_kernel.ContextAttention, "run", lambda self, *a: ran.append(1) or run(self, *a))
    k, v = _cache()
    cache = (torch.zeros_like(k), torch.zeros_like(v))
    g = torch.Generator().manual_seed(6)
    rows = _pages(16 * 12, g)  # disjoint pages for the three sequences
    a_rows, b_rows, d_rows = rows[:40], rows[48:118], rows[128:153]
    ka, va = torch.randn(40, 3, 64, generator=g), torch.randn(40, 3, 64, generator=g)
    kb, vb = torch.randn(70, 3, 64, generator=g), torch.randn(70, 3, 64, generator=g)
    kd, vd = torch.randn(25, 3, 64, generator=g), torch.randn(25, 3, 64, generator=g)
    cache[0][b_rows[:50]], cache[1][b_rows[:50]] = kb[:50], vb[:50]  # b's cached prefix
    cache[0][d_rows[:24]], cache[1][d_rows[:24]] = kd[:24], vd[:24]  # d's context so far
    qa, qb, qd = (torch.randn(n, 9, 64, generator=g) for n in (40, 20, 1))
    attn = AttentionMetadata(
        slot_mapping=torch.cat([d_rows[24:], a_rows, b_rows[50:]]), prefill=((1, 40), (41, 20)),
        prefill_context=(None, b_rows), decode_rows=torch.tensor([0]), decode_kv=d_rows[None],
        decode_mask=torch.ones(1, 1, 1, 25, dtype=torch.bool), prompt_from=1)
    q, k_new, v_new = torch.cat([qd, qa, qb]), torch.cat([kd[24:], ka, kb[50:]]), torch.cat([vd[24:], va, vb[50:]])
    out = paged_attention(q, k_new, v_new, attn, cache)
    assert torch.equal(paged_attention(q, k_new, v_new, attn, cache), out)  # the next layer: planned once a step
    torch.testing.assert_close(out[1:41], sdpa_causal(qa, ka, va), rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(out[41:], sdpa_causal(torch.cat([torch.zeros(50, 9, 64), qb]), kb, vb)[50:],
                               rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(out[:1], sdpa_causal(torch.cat([torch.zeros(24, 9, 64), qd]), kd, vd)[24:],
                               rtol=1e-5, atol=2e-6)
    assert planned == [[(1, 40), (41, 20)]] and ran == [1, 1]
