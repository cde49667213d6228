"""The HBM roofline of one decode step: bytes it must move, divided by memory bandwidth.

A decode step reads every base weight once (at its quantized size), the LoRA
weights of each distinct adapter in the batch once, and every sequence's KV
cache; it writes one token's K/V per sequence. At small batch this traffic, not
arithmetic, bounds the step: time >= bytes / bandwidth, so tokens/s <= B / time.
Activations are a few MB at most and left out.

    python -m benchmarks.roofline --shape 8b --batch 1 32 64 --context 192 --adapters 32 --rank 16
"""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from typing import Iterable

# Published peak HBM bandwidth, bytes/s. Measure with `measure_bandwidth` where a GPU is at hand
# (DESIGN.md: about 3.0 TB/s measured by a device copy on an H100 SXM).
PEAK_BANDWIDTH = {"H100 SXM": 3.35e12, "H100 PCIe": 2.0e12, "H200": 4.8e12, "A100 80GB": 2.0e12}
ALL_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass(frozen=True)
class ModelShape:
    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    tie_word_embeddings: bool

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def target_shape(self, target: str) -> tuple[int, int]:
        """(out_features, in_features) of a targeted linear."""
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {"q": (q, h), "k": (kv, h), "v": (kv, h), "o": (h, q),
                "gate": (i, h), "up": (i, h), "down": (h, i)}[target]

    def linear_params(self) -> int:
        """Parameters of the seven per-layer linears, all layers."""
        return self.num_layers * sum(o * i for o, i in (self.target_shape(t) for t in ALL_TARGETS))

    def to_dict(self) -> dict:
        return {**asdict(self), "head_dim": self.head_dim}


# Issue 7's shapes (Llama 3.2 1B and Llama 3.1 8B layouts, vocabulary 128256) and a tiny one for smoke runs.
SHAPES = {
    "1b": ModelShape("1b", 128256, 2048, 8192, 16, 32, 8, True),
    "8b": ModelShape("8b", 128256, 4096, 14336, 32, 32, 8, False),
    "tiny": ModelShape("tiny", 512, 64, 160, 2, 4, 2, True),
}


def weight_bytes_per_param(quantize: str, dtype_bytes: int, group_size: int = 128) -> float:
    """Bytes read per base-linear parameter: int8 per-channel, 4-bit grouped, or the activation dtype.

    Per-channel scales (int8) are one value per output row, negligible against the
    row itself; 4-bit groups carry a dtype-sized scale per group.
    """
    if quantize == "none":
        return float(dtype_bytes)
    if quantize == "int8":
        return 1.0
    if quantize == "int4":
        return 0.5 + dtype_bytes / group_size
    raise ValueError(f"quantize must be none, int8 or int4, not {quantize!r}")


def decode_step_bytes(shape: ModelShape, batch: int, context: int, *, adapters: int = 0, rank: int = 16,
                      targets: Iterable[str] = ALL_TARGETS, quantize: str = "none", dtype_bytes: int = 2,
                      lm_head_quantized: bool = False) -> dict[str, float]:
    """Bytes one decode step moves, by part; `context` is each sequence's KV length."""
    targets = tuple(targets)
    linears = shape.linear_params() * weight_bytes_per_param(quantize, dtype_bytes)
    lm_head_params = shape.vocab_size * shape.hidden_size
    lm_head = lm_head_params * (weight_bytes_per_param(quantize, dtype_bytes) if lm_head_quantized else dtype_bytes)
    embed_rows = batch * shape.hidden_size * dtype_bytes  # the embedding gather reads B rows
    per_adapter = shape.num_layers * sum(rank * (o + i) for o, i in (shape.target_shape(t) for t in targets))
    lora = min(adapters, batch) * per_adapter * dtype_bytes
    kv_per_token = shape.num_layers * 2 * shape.num_kv_heads * shape.head_dim * dtype_bytes
    kv_read = batch * context * kv_per_token
    kv_write = batch * kv_per_token
    total = linears + lm_head + embed_rows + lora + kv_read + kv_write
    return {"base_linears": linears, "lm_head": lm_head, "embedding_rows": embed_rows, "lora": lora,
            "kv_read": kv_read, "kv_write": kv_write, "total": total}


def roofline_tokens_per_s(step_bytes: float, batch: int, bandwidth: float) -> float:
    """Upper bound on decode tokens/s: batch tokens per step, step no faster than bytes / bandwidth."""
    return batch * bandwidth / step_bytes


def measure_bandwidth(device, nbytes: int = 2 * 2**30, iters: int = 10) -> float:
    """Device-to-device copy bandwidth in bytes/s (a copy reads and writes nbytes each)."""
    import torch

    src = torch.empty(nbytes // 2, dtype=torch.float16, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        dst.copy_(src)
    end.record()
    end.synchronize()
    seconds = start.elapsed_time(end) / 1e3
    return 2 * nbytes * iters / seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--context", type=int, default=192, help="KV length per sequence (prompt + half the output)")
    p.add_argument("--adapters", type=int, default=32, help="distinct adapters in the batch (capped at B)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--quantize", choices=("none", "int8", "int4"), default="none")
    p.add_argument("--bandwidth", type=float, default=PEAK_BANDWIDTH["H100 SXM"], help="bytes/s")
    args = p.parse_args(argv)
    shape = SHAPES[args.shape]
    print(f"{shape.name}: quantize={args.quantize}, context={args.context}, rank={args.rank}, "
          f"bandwidth={args.bandwidth / 1e12:.2f} TB/s")
    print(f"{'B':>4} {'base MB':>9} {'LoRA MB':>9} {'KV MB':>9} {'step us':>9} {'tok/s bound':>12}")
    for b in args.batch:
        parts = decode_step_bytes(shape, b, args.context, adapters=args.adapters, rank=args.rank,
                                  quantize=args.quantize)
        t = parts["total"] / args.bandwidth
        print(f"{b:>4} {(parts['base_linears'] + parts['lm_head']) / 1e6:>9.1f} {parts['lora'] / 1e6:>9.1f} "
              f"{parts['kv_read'] / 1e6:>9.1f} {t * 1e6:>9.1f} {roofline_tokens_per_s(parts['total'], b, args.bandwidth):>12.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
