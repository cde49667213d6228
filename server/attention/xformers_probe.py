"""Decide once per process whether xformers' CUDA attention runs here, and use it for prefill.

xformers wheels are built against one exact torch release; with another torch
its import may fail, or import but have no usable CUDA kernel. So the probe does
not trust the import: it runs one small block-diagonal causal attention on the
device and compares it with torch SDPA. Whatever it finds is logged once, and
every caller falls back to SDPA when xformers is not the answer.

The mode comes from `EngineConfig.attention` (`--attention`, LORASERVE_ATTENTION or
TOML, validated there): auto (the probe decides), sdpa (never try xformers), or
xformers (fail at start-up if it does not work, instead of falling back).

Wiring into the engine: at start-up on CUDA,
    from server.attention import sdpa, xformers_probe
    sdpa.set_prefill_backend(xformers_probe.prefill_fn(device, config.attention))
`varlen_prefill_attention` does a whole batch of prompts in one kernel call.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Callable, Literal, Optional, Sequence

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

AttentionMode = Literal["auto", "sdpa", "xformers"]
PrefillFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ProbeResult:
    """What the probe found: usable or not, and why, for the start-up log and ModelInfo."""

    usable: bool
    reason: str
    version: Optional[str] = None


@functools.lru_cache(maxsize=None)
def probe(device_index: int = 0) -> ProbeResult:
    """Import xformers and run a GQA block-diagonal causal attention on cuda:device_index."""
    if not torch.cuda.is_available():
        return ProbeResult(False, "no CUDA device")
    try:
        import xformers  # noqa: F401
        import xformers.ops as xops
    except Exception as e:  # ImportError, or a broken build raising anything at import
        return ProbeResult(False, f"xformers does not import: {type(e).__name__}: {e}")
    version = getattr(xformers, "__version__", None)
    try:
        dev = torch.device("cuda", device_index)
        g = torch.Generator(device=dev).manual_seed(0)
        lens = [5, 11]
        T, nh, nkv, hd = sum(lens), 4, 2, 64
        q = torch.randn(T, nh, hd, device=dev, dtype=torch.bfloat16, generator=g)
        k = torch.randn(T, nkv, hd, device=dev, dtype=torch.bfloat16, generator=g)
        v = torch.randn(T, nkv, hd, device=dev, dtype=torch.bfloat16, generator=g)
        got = _xformers_varlen(xops, q, k, v, lens, None)
        want = _sdpa_varlen(q, k, v, lens, None)
        torch.cuda.synchronize(dev)
        err = float((got.float() - want.float()).abs().max())
    except Exception as e:  # no kernel for this GPU/torch, CUDA errors, shape checks
        return ProbeResult(False, f"xformers {version} imports but its attention fails: "
                                  f"{type(e).__name__}: {e}", version)
    if not err < 5e-2:
        return ProbeResult(False, f"xformers {version} disagrees with SDPA (max abs error {err:.3g})", version)
    return ProbeResult(True, f"xformers {version} memory_efficient_attention works (max abs error "
                             f"vs SDPA {err:.2g})", version)


@functools.lru_cache(maxsize=None)
def _decide(device_type: str, device_index: int, mode: AttentionMode) -> str:
    if device_type != "cuda":
        log.info("attention backend: sdpa (device %s)", device_type)
        return "sdpa"
    if mode == "sdpa":
        log.info("attention backend: sdpa (attention=sdpa)")
        return "sdpa"
    res = probe(device_index)
    if res.usable:
        log.info("attention backend: xformers (%s)", res.reason)
        return "xformers"
    if mode == "xformers":
        raise RuntimeError(f"attention=xformers was asked for, but {res.reason}")
    log.warning("attention backend: sdpa (%s)", res.reason)
    return "sdpa"


def attention_backend(device: torch.device | str, mode: AttentionMode = "auto") -> str:
    """'xformers' when `mode` allows it and its CUDA ops load and pass the probe on this device, else 'sdpa'."""
    dev = torch.device(device)
    index = dev.index if dev.index is not None else (torch.cuda.current_device() if dev.type == "cuda" else 0)
    return _decide(dev.type, index, mode)


def _sdpa_4d(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float]) -> torch.Tensor:
    """Causal SDPA of one sequence (q [n, nh, hd], k/v [n, nkv, hd] -> [n, nh, hd]) as [1, heads, n, hd] with
    the KV heads repeated: CUDA's fused kernels (flash, memory-efficient: no [n, n] scores) take only 4-D
    inputs, and memory-efficient (fp32's) no enable_gqa; anything else falls back to the math kernel."""
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                       is_causal=True, scale=scale)
    return o[0].transpose(0, 1)


def _sdpa_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: Sequence[int],
                 scale: Optional[float]) -> torch.Tensor:
    out = torch.empty_like(q)
    start = 0
    for n in seq_lens:
        if n:
            s = slice(start, start + n)
            if q.is_cuda:
                out[s] = _sdpa_4d(q[s], k[s], v[s], scale)
            else:  # 3-D, as it always ran here (the CPU bits of the 4-D form differ in the last place)
                o = F.scaled_dot_product_attention(
                    q[s].transpose(0, 1), k[s].transpose(0, 1), v[s].transpose(0, 1),
                    is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
                out[s] = o.transpose(0, 1)
        start += n
    return out


def _xformers_varlen(xops, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     seq_lens: Sequence[int], scale: Optional[float]) -> torch.Tensor:
    """One memory_efficient_attention call over all sequences; GQA through the 5-D [B, M, G, H, K] form."""
    from xformers.ops.fmha.attn_bias import BlockDiagonalCausalMask

    lens = [int(n) for n in seq_lens if n]
    T, nh, hd = q.shape
    nkv = k.shape[1]
    if nh % nkv:
        raise ValueError(f"{nh} query heads are not a multiple of {nkv} KV heads")
    per = nh // nkv
    bias = BlockDiagonalCausalMask.from_seqlens(lens, device=q.device)
    q5 = q.reshape(1, T, nkv, per, hd)
    k5 = k.reshape(1, T, nkv, 1, hd).expand(1, T, nkv, per, hd)
    v5 = v.reshape(1, T, nkv, 1, hd).expand(1, T, nkv, per, hd)
    out = xops.memory_efficient_attention(q5, k5, v5, attn_bias=bias, scale=scale)
    return out.reshape(T, nh, hd)


def varlen_prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             seq_lens: Sequence[int], scale: Optional[float] = None,
                             mode: AttentionMode = "auto") -> torch.Tensor:
    """Causal attention of several prompts packed back to back.

    q [T, nh, hd], k/v [T, nkv, hd] with T = sum(seq_lens); each sequence sees only
    its own earlier tokens. xformers (one kernel, block-diagonal causal mask) where
    the probe passed, SDPA per sequence otherwise. Returns [T, nh, hd].
    """
    if sum(int(n) for n in seq_lens) != q.shape[0]:
        raise ValueError(f"seq_lens sum to {sum(seq_lens)} but q has {q.shape[0]} tokens")
    if q.shape[0] == 0:
        return torch.empty_like(q)
    if attention_backend(q.device, mode) == "xformers":
        import xformers.ops as xops

        return _xformers_varlen(xops, q, k, v, seq_lens, scale)
    return _sdpa_varlen(q, k, v, seq_lens, scale)


def prefill_fn(device: torch.device | str, mode: AttentionMode = "auto") -> PrefillFn:
    """A one-sequence causal prefill fn(q [n, nh, hd], k, v) for `server.attention.sdpa.set_prefill_backend`."""
    if attention_backend(device, mode) != "xformers":
        return lambda q, k, v: _sdpa_varlen(q, k, v, [q.shape[0]], None)
    import xformers.ops as xops

    return lambda q, k, v: _xformers_varlen(xops, q, k, v, [q.shape[0]], None)
