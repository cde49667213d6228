"""Synthetic multi-adapter workloads, S-LoRA and Punica style, reproducible from a seed.

S-LoRA's serving trace (its benchmarks' `generate_requests`): adapter i chosen as
floor(num_adapters * p) with p ~ numpy power(alpha) (density alpha * p^(alpha-1);
alpha = 1 is uniform, alpha < 1 piles requests onto the low indices); gaps between
arrivals from a Gamma distribution with mean 1/rate and coefficient of variation
cv (cv = 1 is a Poisson process, larger cv is burstier); prompt and output
lengths uniform in [lo, hi). Punica's batch mixes: Distinct (every request its own
adapter), Uniform (ceil(sqrt(B)) adapters, equal shares), Skewed (Zipf),
Identical (one adapter). Both use numpy's Generator with the given seed, so a
config always gives the same requests.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

MIXES = ("distinct", "uniform", "skewed", "identical")


@dataclass(frozen=True)
class WorkloadConfig:
    num_adapters: int = 100
    alpha: float = 1.0              # power-law exponent of adapter popularity (numpy power)
    rate: float = 2.0               # mean arrivals per second
    cv: float = 1.0                 # coefficient of variation of inter-arrival gaps
    num_requests: int = 200
    input_range: tuple[int, int] = (8, 512)   # prompt tokens, uniform in [lo, hi)
    output_range: tuple[int, int] = (8, 512)  # new tokens, uniform in [lo, hi)
    seed: int = 42

    def validate(self) -> None:
        if self.num_adapters < 1:
            raise ValueError(f"num_adapters is {self.num_adapters}; need at least 1")
        if not self.alpha > 0:
            raise ValueError(f"alpha is {self.alpha}; need > 0")
        if not (self.rate > 0 and self.cv > 0):
            raise ValueError(f"rate {self.rate} and cv {self.cv} must both be > 0")
        if self.num_requests < 0:
            raise ValueError(f"num_requests is {self.num_requests}; need >= 0")
        for name, (lo, hi) in (("input_range", self.input_range), ("output_range", self.output_range)):
            if not 1 <= lo < hi:
                raise ValueError(f"{name} is [{lo}, {hi}); need 1 <= lo < hi")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class WorkloadRequest:
    index: int
    arrival_s: float    # seconds after the start of the run
    adapter: int        # index into the adapter list, 0 .. num_adapters - 1
    prompt_len: int
    output_len: int


def slora_requests(cfg: WorkloadConfig) -> list[WorkloadRequest]:
    """The S-LoRA trace for cfg: arrival-ordered requests."""
    cfg.validate()
    rng = np.random.default_rng(cfg.seed)
    n = cfg.num_requests
    p = rng.power(cfg.alpha, n)
    adapters = np.minimum((p * cfg.num_adapters).astype(np.int64), cfg.num_adapters - 1)
    prompt = rng.integers(cfg.input_range[0], cfg.input_range[1], n)
    output = rng.integers(cfg.output_range[0], cfg.output_range[1], n)
    shape = 1.0 / (cfg.cv * cfg.cv)
    scale = cfg.cv * cfg.cv / cfg.rate  # mean gap = shape * scale = 1 / rate
    arrivals = np.cumsum(rng.gamma(shape, scale, n))
    return [WorkloadRequest(i, float(arrivals[i]), int(adapters[i]), int(prompt[i]), int(output[i]))
            for i in range(n)]


def punica_mix(kind: str, batch_size: int, seed: int = 0, zipf_a: float = 1.5) -> list[int]:
    """Adapter index of each of batch_size requests for one of Punica's mixes (MIXES)."""
    if batch_size < 1:
        raise ValueError(f"batch_size is {batch_size}; need at least 1")
    rng = np.random.default_rng(seed)
    if kind == "distinct":
        return list(range(batch_size))
    if kind == "identical":
        return [0] * batch_size
    if kind == "uniform":
        n = math.ceil(math.sqrt(batch_size))
        ids = [i % n for i in range(batch_size)]
        return [int(i) for i in rng.permutation(ids)]
    if kind == "skewed":
        # Zipf draws renumbered by first appearance: index 0 is the most frequent adapter.
        draws = rng.zipf(zipf_a, batch_size)
        vals, counts = np.unique(draws, return_counts=True)
        order = {int(v): i for i, v in enumerate(vals[np.lexsort((vals, -counts))])}
        return [order[int(d)] for d in draws]
    raise ValueError(f"unknown mix {kind!r}; choose one of {', '.join(MIXES)}")


def prompt_ids(length: int, vocab_size: int, seed: int, low: int = 10) -> list[int]:
    """A reproducible random prompt that avoids the first `low` ids (specials in most vocabs)."""
    rng = np.random.default_rng(seed)
    return [int(t) for t in rng.integers(low, vocab_size, length)]


def percentiles(values: Sequence[float], qs: Sequence[float] = (50, 90, 99)) -> dict[str, float]:
    """{'p50': .., 'p99': .., 'mean': ..} of values (NaN when empty)."""
    if not values:
        return {**{f"p{q:g}": float("nan") for q in qs}, "mean": float("nan")}
    arr = np.asarray(values, dtype=np.float64)
    out = {f"p{q:g}": float(np.percentile(arr, q)) for q in qs}
    out["mean"] = float(arr.mean())
    return out


def summarize(requests: Sequence[WorkloadRequest]) -> dict:
    """Shape of a trace: how many adapters it touches, the top adapter's share, rates and lengths."""
    if not requests:
        return {"requests": 0}
    counts: dict[int, int] = {}
    for r in requests:
        counts[r.adapter] = counts.get(r.adapter, 0) + 1
    span = requests[-1].arrival_s
    return {
        "requests": len(requests),
        "distinct_adapters": len(counts),
        "top_adapter_share": max(counts.values()) / len(requests),
        "duration_s": span,
        "observed_rate": len(requests) / span if span > 0 else float("inf"),
        "mean_prompt": float(np.mean([r.prompt_len for r in requests])),
        "mean_output": float(np.mean([r.output_len for r in requests])),
    }
