"""A tiny model's shape, random adapters loaded into a real pool, and each row's LoRA delta computed
straight from the adapters' own weights: what every backend's step must add."""
from __future__ import annotations

from typing import Optional

import torch

from server.core.identity import AdapterVersion
from server.lora.pool import AdapterPool
from server.lora.weights import LoraModule, LoraWeights
from server.model.config import ModelConfig, Projection

TINY = ModelConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=16, max_position_embeddings=512)


def random_adapter(config: ModelConfig, rank: int, targets: tuple[str, ...], seed: int,
                   bf16_exact: bool = False) -> LoraWeights:
    """Every layer's `targets` at `rank`; `bf16_exact`: values a bf16 copy holds exactly."""
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for layer in range(config.num_layers):
        for t in targets:
            out_f, in_f = config.target_shape(t)
            a, b = torch.randn(rank, in_f, generator=g) / in_f ** 0.5, torch.randn(out_f, rank, generator=g)
            if bf16_exact:
                a, b = a.bfloat16().float(), b.bfloat16().float()
            mods[(layer, t)] = LoraModule(a=a, b=b, scale=0.5 + seed / 4)
    return LoraWeights(modules=mods)


def pool_with(adapters: list[LoraWeights], config: ModelConfig = TINY, max_rank: int = 16,
              device: str = "cpu", kernel_copies: Optional[torch.dtype] = None) -> tuple[AdapterPool, list[int]]:
    """A pool holding `adapters`, loaded the way the engine loads them; their slots in order."""
    pool = AdapterPool(config, num_slots=len(adapters) + 1, max_rank=max_rank, device=torch.device(device),
                       dtype=torch.float32, kernel_copies=kernel_copies)
    slots = [pool.load(AdapterVersion("default", f"a{i}", 1, f"a{i}", lambda w=w: w)) for i, w in enumerate(adapters)]
    return pool, slots


def scattered_pool_with(adapters: list[LoraWeights], config: ModelConfig = TINY, max_rank: int = 16,
                        device: str = "cpu", kernel_copies: Optional[torch.dtype] = None) -> tuple[AdapterPool, list[int]]:
    """Like `pool_with`, but each adapter's rank rows lie apart (every other row of adapter memory), as after
    evictions: rank-1 fillers fill the memory, every other one is unloaded, the adapters load into the gaps."""
    need = sum(max(w.rank, 1) for w in adapters)
    pool = AdapterPool(config, num_slots=2 * need + len(adapters), max_rank=max_rank, device=torch.device(device),
                       dtype=torch.float32, kernel_copies=kernel_copies, num_rows=2 * need)
    filler = random_adapter(config, 1, ("q",), 99)
    fillers = [AdapterVersion("default", f"f{i}", 1, f"f{i}", lambda: filler) for i in range(2 * need)]
    for f in fillers:
        pool.load(f)
    for f in fillers[::2]:
        pool.unload(f.digest)
    slots = [pool.load(AdapterVersion("default", f"a{i}", 1, f"a{i}", lambda w=w: w)) for i, w in enumerate(adapters)]
    for f in fillers[1::2]:
        pool.unload(f.digest)
    for s, w in zip(slots, adapters):
        rows = pool.rows_of(s)
        assert len(rows) == w.rank and (w.rank < 2 or rows[1] - rows[0] == 2), "rows were meant to lie apart"
    return pool, slots


def expected_delta(x: torch.Tensor, layer: int, projection: Projection, adapter_slots: list[int],
                   by_slot: dict[int, LoraWeights]) -> torch.Tensor:
    """[T, width] in float64: row i's scale * x_i A^T B^T for each target of its adapter (zero without one)."""
    width = sum(w for _, w in projection)
    out = torch.zeros(x.shape[0], width, dtype=torch.float64)
    for i, slot in enumerate(adapter_slots):
        w: Optional[LoraWeights] = by_slot.get(slot)
        lo = 0
        for t, width_t in projection:
            m = w.modules.get((layer, t)) if w is not None else None
            if m is not None:
                out[i, lo:lo + width_t] = m.scale * (x[i].double() @ m.a.double().t()) @ m.b.double().t()
            lo += width_t
    return out


def check_step(step, rows: list[int], by_slot: dict[int, LoraWeights], layer: int, projection: Projection,
               rtol: float = 1e-5, atol: float = 1e-4, where: object = (), rel_from: Optional[int] = None,
               rel: float = 0.0) -> tuple[torch.Tensor, ...]:
    """Random x and y for `rows` through a backend's `step` on one projection of `layer`: every row gets exactly
    its own adapter's delta (`expected_delta`); with `rel_from`, the rows from there on get it within `rel` of
    its norm instead (a kernel that rounds those rows' activations). Returns (x, y0, got) for further checks."""
    x = torch.randn(len(rows), TINY.target_shape(projection[0][0])[1])
    y0 = torch.randn(len(rows), sum(w for _, w in projection))
    got = step.apply(y0.clone(), x, layer, projection)
    delta = expected_delta(x, layer, projection, rows, by_slot)
    want = y0.double() + delta
    exact = len(rows) if rel_from is None else rel_from
    assert torch.allclose(got[:exact].double(), want[:exact], rtol=rtol, atol=atol), where
    if exact < len(rows):
        err = (got[exact:].double() - want[exact:]).norm(dim=1)
        assert (err <= rel * delta[exact:].norm(dim=1) + atol).all(), (where, err)
    return x, y0, got
