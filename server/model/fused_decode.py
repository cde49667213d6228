"""A step's whole layer stack in one C call, on the int8 CPU path.

Why: with the int8 base in C (server/model/int8_dynamic.py), the glue ops in C (cpu_glue.py), decode
attention in C (server/attention/decode_kernel.py) and the LoRA in C (server/lora/cpu_kernel.py), a
decode step of 8 tokens on SmolLM2 still spent about a third of its time in Python between those
calls: 13 calls a layer, each with its argument checks, views, allocations and ctypes marshalling,
30 layers a step. Here a small C driver makes the same calls, with the same arguments in the same
order, for every layer: the kernels are the other libraries' own functions (their addresses handed
over once), so a token's numbers are the layered path's bits (tested), and the layered path stays
for other devices and dtypes and where any kernel is missing.

Steps with prompt rows take it too (decode rows first, then the prompts'): the same calls, with the
prompt rows' LoRA through the LoRA kernel's prompt call and their attention through the context kernel
(server/attention/context_kernel.py). Continuous batching makes such mixed steps common (every arrival's
prompt joins the running decodes); on SmolLM2 a step of 15 decode rows and one 36-token prompt took 42.8 ms
layered and takes 30.5 ms here (alternating in one process). A step whose prompts the context kernel does not
take (a context past its workspace) stays on the layered path. (The module keeps the name of its first use.)

The driver owns no arithmetic except copying each token's new K/V rows into the paged cache (what
`index_copy_` did). The GIL is released for the whole stack (ctypes drops it for a call), so the
server's other threads run meanwhile. LORASERVE_FUSED_DECODE=0 turns it off.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Protocol

import torch
from torch import nn

from server.attention import context_kernel, decode_kernel
from server.core.native import NativeBuildError, build_and_load, c_source

if TYPE_CHECKING:
    from server.attention.sdpa import AttentionMetadata

log = logging.getLogger(__name__)

PROJECTION_COUNT = 4  # q/k/v, o, gate/up, down: the layer's base projections, in this order


class PagedKV(Protocol):
    """The paged KV cache as the driver reads it (server/model/llama.py's KVCache): per layer, K and V rows."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]

_SOURCE = c_source(__file__, "fused_decode.c")

_p, _i, _l, _f = ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_float


class _Linear(ctypes.Structure):
    _fields_ = [("k", _i), ("kp", _i), ("b", _i), ("n", _i), ("wp", _p), ("wsum", _p), ("ws", _p)]


class _Layer(ctypes.Structure):
    _fields_ = [("in_norm", _p), ("post_norm", _p), ("lin", _Linear * PROJECTION_COUNT), ("kc", _p), ("vc", _p)]


class LoraPlan(ctypes.Structure):
    """One projection's LoRA as the CPU LoRA kernel's decode call takes it (server/lora/cpu_kernel.py)."""

    _fields_ = [("pages", _p), ("pages_stride", _i), ("in_features", _i), ("count", _i), ("targets", _p)]


class _Model(ctypes.Structure):
    _fields_ = [("linear", _p), ("norm", _p), ("rope", _p), ("silu", _p), ("attn", _p), ("ctx_attn", _p),
                ("layers", _i), ("hidden", _i), ("nh", _i), ("nkv", _i), ("hd", _i), ("inter", _i),
                ("norm_lanes", _i), ("silu_vector", _i), ("eps", _f), ("attn_scale", _f),
                ("layer", _p), ("final_norm", _p), ("cache_rows", _l)]


class _Step(ctypes.Structure):
    _fields_ = [("m", _i), ("h", _p), ("cos", _p), ("sin", _p), ("new_rows", _p), ("ctx_rows", _p),
                ("ctx_stride", _l), ("ctx_len", _p), ("q8", _p), ("qs8", _p),
                ("x", _p), ("qkv", _p), ("att", _p), ("o", _p), ("gu", _p), ("a", _p), ("dn", _p), ("out", _p),
                ("lora_call", _p), ("lora", _p), ("slots", _p), ("rank", _i),
                ("d", _i), ("ncalls", _i), ("calls", _p), ("lora_prompt", _p), ("blocks", _p), ("nb", _i)]


class _ContextCall(ctypes.Structure):
    _fields_ = [("count", _i), ("nq", _p), ("nctx", _p), ("q0", _p), ("r0", _p), ("rows", _p)]


@dataclass(frozen=True)
class NativeLora:
    """A step's LoRA for the driver: the CPU LoRA kernel's decode and prompt functions, its plans for every
    layer's projections ([layers * 4] `LoraPlan`s, q/k/v, o, gate/up, down), each decode token's slot, the
    prompt rows' blocks and the step's rank."""

    function: int
    prompt_function: int
    plans: int
    in_features: tuple[int, ...]  # of the 4 projections, checked against the model's
    slots: torch.Tensor  # int64 [decode rows]
    blocks: torch.Tensor  # int64 [blocks, 3]: (first row, rows, slot) of the prompt rows (cpu_kernel.prompt_blocks)
    rank: int


def lora_plans(plans: list[tuple[int, int, int, int, int]]) -> ctypes.Array:
    """A [layers * 4] table of `LoraPlan` from (pages address, pages row stride, in_features, targets count,
    targets address) per layer and projection, in the driver's projection order."""
    return (LoraPlan * len(plans))(*[LoraPlan(*p) for p in plans])


def function_address(fn: ctypes._CFuncPtr) -> int:
    return ctypes.cast(fn, ctypes.c_void_p).value or 0


class FusedDecode:
    """The driver bound to one model: its weights' pointers packed once; `try_run` per step."""

    def __init__(self, lib: ctypes.CDLL, model: nn.Module):
        lib.lsq_decode_layers.argtypes = [_p, _p]
        lib.lsq_decode_layers.restype = ctypes.c_int
        self._fn = lib.lsq_decode_layers
        cfg = model.config
        layers = list(model.layers)
        first = layers[0]
        glue, dyn = first.glue, first.qkv._dyn
        attn = decode_kernel.load()
        self._context = context_kernel.load()  # None: steps with prompt rows take the layered path
        self.hidden, self.hd, self.nh = cfg.hidden_size, cfg.head_dim, cfg.num_heads
        self.dyn = dyn
        self.max_kp = max(lin._pw.kp for layer in layers for lin in (layer.qkv, layer.o, layer.gate_up, layer.down))
        self.in_features = (cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.hidden_size, cfg.intermediate_size)
        self._layers = (_Layer * len(layers))()
        for dst, layer in zip(self._layers, layers):
            dst.in_norm, dst.post_norm = layer.input_norm.data_ptr(), layer.post_norm.data_ptr()
            for j, lin in enumerate((layer.qkv, layer.o, layer.gate_up, layer.down)):
                pw = lin._pw
                n, wp, wsum, ws = pw.call_args
                dst.lin[j] = _Linear(pw.in_features, pw.kp, pw.block, n, wp, wsum, ws)
        self._model = _Model(
            function_address(dyn._lib.lsq_linear), function_address(glue._norm), function_address(glue._rope),
            function_address(glue._silu_mul), function_address(attn._fn),
            function_address(self._context._fn) if self._context is not None else 0,
            len(layers), cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size,
            glue.norm_lanes, glue.silu_vector, cfg.rms_norm_eps, cfg.head_dim ** -0.5,
            ctypes.addressof(self._layers), model.norm.data_ptr())
        # Work rows of a step, floats a token: x, q/k/v, attention out, o, gate/up, SiLU x up, down.
        qs, kvs = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self._widths = (cfg.hidden_size, qs + 2 * kvs, qs, cfg.hidden_size, 2 * cfg.intermediate_size,
                        cfg.intermediate_size, cfg.hidden_size)
        self._bound_kv: Optional[tuple[int, ...]] = None

    @staticmethod
    def supports(model: nn.Module) -> bool:
        """Every layer on the dynamic int8 kernel without biases, fp32 on CPU, the glue (norm and SiLU with
        torch's bits) and the decode attention kernel at hand."""
        if model.dtype != torch.float32 or model.device.type != "cpu" or not len(model.layers):
            return False
        for layer in model.layers:
            glue = layer.glue
            if glue is None or glue.norm_lanes is None or not glue.silu_exact:
                return False
            for lin in (layer.qkv, layer.o, layer.gate_up, layer.down):
                if lin.kernel != "dynamic" or getattr(lin, "bias", None) is not None:
                    return False
        attn = decode_kernel.load()
        cfg = model.config
        return attn is not None and cfg.head_dim % 16 == 0 and cfg.head_dim <= 256 and \
            cfg.num_heads % cfg.num_kv_heads == 0 and cfg.num_heads // cfg.num_kv_heads <= decode_kernel.MAX_GROUP

    def _bind(self, kv: PagedKV) -> None:
        key = tuple(t.data_ptr() for t in (*kv.k, *kv.v))
        if key != self._bound_kv:
            for dst, k, v in zip(self._layers, kv.k, kv.v):
                if not (k.is_contiguous() and v.is_contiguous() and k.dtype == v.dtype == torch.float32):
                    raise ValueError("the fused decode reads contiguous fp32 caches")
                if k.shape[0] != kv.k[0].shape[0] or v.shape[0] != k.shape[0]:
                    raise ValueError("the fused decode reads caches of one row count")
                dst.kc, dst.vc = k.data_ptr(), v.data_ptr()
            self._model.cache_rows = kv.k[0].shape[0]
            self._bound_kv = key

    @staticmethod
    def accepts_context(length: int) -> bool:
        """Contexts the decode attention kernel takes (its scores live on the stack); longer ones take the
        layered path, whose attention then runs on torch's SDPA."""
        return decode_kernel.DecodeAttention.accepts_context(length)

    def accepts_lora(self, lora: Optional[NativeLora]) -> bool:
        return lora is None or tuple(lora.in_features) == self.in_features

    def try_run(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: "AttentionMetadata",
                kv: PagedKV, lora: Optional[NativeLora]) -> Optional[torch.Tensor]:
        """The final-norm hidden states [T, hidden] of the step's T tokens (embeddings h, updated in place), their
        K/V written at attn.slot_mapping; None where the driver does not take the step (the layered path then
        serves it): a decode context past the attention kernel's reach, a prompt the context kernel does not
        take, LoRA the plans do not cover."""
        T = h.shape[0]
        if attn.slot_mapping is None or not self.accepts_lora(lora):
            return None
        d = 0 if attn.decode_kv is None else attn.decode_kv.shape[0]
        if d and not self.accepts_context(attn.decode_kv.shape[1]):
            return None
        calls: list[context_kernel.ContextCall] = []
        if attn.prefill:
            if self._context is None or attn.prompt_from != d:
                return None
            probe = torch.empty(0, self.nh, self.hd)
            in_place = attn.in_place_prefills(probe, (kv.k[0], kv.v[0]))
            if len(in_place.runs) != len(attn.prefill):
                return None
            calls = in_place.calls
        if not (h.is_contiguous() and cos.is_contiguous() and sin.is_contiguous() and cos.shape == (T, self.hd)
                and attn.slot_mapping.dtype == torch.int64 and attn.slot_mapping.shape == (T,)
                and attn.slot_mapping.is_contiguous()):
            raise ValueError("fused step: unexpected step tensors")
        self._bind(kv)
        out = torch.empty(T, self.hidden)
        work = torch.empty(T * sum(self._widths))
        ptrs, at = [], work.data_ptr()
        for w in self._widths:
            ptrs.append(at)
            at += 4 * T * w
        q8, s8 = self.dyn.scratch(T, self.max_kp)
        ctx_rows = attn.decode_kv if d else torch.empty(0, 1, dtype=torch.int64)
        ctx_len = attn.decode_lengths() if d else torch.empty(0, dtype=torch.int32)
        if (ctx_rows.dtype != torch.int64 or ctx_rows.stride(1) != 1 or ctx_len.dtype != torch.int32
                or not ctx_len.is_contiguous()):
            raise ValueError("fused step: unexpected decode context tensors")
        table = (_ContextCall * len(calls))(*[_ContextCall(c.count, c.nq.data_ptr(), c.nctx.data_ptr(), c.q0.data_ptr(),
                                                           c.r0.data_ptr(), c.rows.data_ptr()) for c in calls])
        blocks = lora.blocks if lora is not None else None
        nb = 0 if blocks is None else blocks.shape[0]
        step = _Step(T, h.data_ptr(), cos.data_ptr(), sin.data_ptr(), attn.slot_mapping.data_ptr(), ctx_rows.data_ptr(),
                     ctx_rows.stride(0), ctx_len.data_ptr(), q8, s8, *ptrs, out.data_ptr(),
                     lora.function if lora else 0, lora.plans if lora else 0, lora.slots.data_ptr() if lora else 0,
                     lora.rank if lora else 0, d, len(calls), ctypes.addressof(table) if calls else 0,
                     lora.prompt_function if lora else 0, blocks.data_ptr() if nb else 0, nb)
        status = self._fn(ctypes.byref(self._model), ctypes.byref(step))
        if status == -2:
            raise IndexError(f"fused step: a K/V row of the slot mapping lies outside the cache's "
                             f"{self._model.cache_rows} rows")
        if status:
            raise MemoryError("fused step: a kernel could not allocate its workspace")
        return out


@functools.lru_cache(maxsize=None)
def _library() -> Optional[ctypes.CDLL]:
    try:
        return build_and_load("fused_decode", _SOURCE, ("-O2", "-shared", "-fPIC"))
    except NativeBuildError as e:
        log.warning("fused decode driver unavailable (%s); the layered path serves", e)
        return None


def for_model(model: nn.Module) -> Optional[FusedDecode]:
    """The driver for `model`, or None where it does not apply (see `FusedDecode.supports`) or
    LORASERVE_FUSED_DECODE=0 turns it off."""
    if os.environ.get("LORASERVE_FUSED_DECODE", "1") == "0" or not FusedDecode.supports(model):
        return None
    lib = _library()
    return None if lib is None else FusedDecode(lib, model)
