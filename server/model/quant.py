"""Quantized linears for the shared base model.

Modes: `none` (dense), `int8` (symmetric, one scale per output channel) and `int4`
(asymmetric groups of 32/64/128 input channels, two values per byte). Weights stay
quantized in memory.

int8 on CPU runs the `dynamic` kernel (server/model/int8_dynamic.py): activations are
quantized too, per token after a block Hadamard rotation, and multiplied in integers
(AVX-512 VNNI / AMX / AVX2), so a decode step streams int8 weights near memory speed and a
prefill runs on the integer units (measured single threaded on this repo's AMX Xeon: a
512-token SmolLM2 prefill 2.0 s -> 0.41 s of CPU time, an 8-token decode step 107-170 ->
53 ms). Perplexity on the default model: +0.6% against `none` (benchmarks/perplexity.py).
Every row takes the same formula whatever its batch (integer sums are exact), so no token's
numbers depend on what else was in its batch.

int8 on CUDA runs our Triton kernel (`triton`, server/model/int8_triton.py): int8 weight tiles converted in
registers and multiplied on tensor cores, where torch's CUDA `_weight_int8pack_mm` reads the weights once per
activation row with scalar FMAs. Elsewhere, and with LORASERVE_INT8_DYNAMIC=0, weights are dequantized inside the
matmul: by torch's fused kernels where they exist (`_weight_int8pack_mm`, `_weight_int4pack_mm[_for_cpu]`),
otherwise by dequantizing in row chunks right before `F.linear`.

The kernel is chosen once per module from a fixed table keyed by (device, compute
dtype, mode), never by a run-time timing probe: two processes serving the same model
must compute the same numbers. torch's int8/int4 weight kernels are fast with bf16
activations and 5-50x slower with fp32 ones on CPUs without native bf16 (AMD EPYC, AVX2),
so fp32 activations are rounded to bf16 for the weight kernel and the result cast
back. That rounding (2^-9 relative) is far below the weight quantization error itself
(about 1% for int8, several % for int4); `kernel="dequant"` keeps full fp32 math.

With the weight kernels on CPU, int8 prompt tokens (prefill) multiply int8 weights dequantized
into a reused per-thread scratch, in fp32 (dequantizing once costs a fixed ~0.25 ms plus ~16 us
a row against ~35 us a row in the weight kernel), and decode tokens go through the weight
kernel. The split is by token kind, not by batch size: the caller says where the prompt rows
start (`prompt_from`). But torch's fp32 GEMM itself splits its work over the threads by the
row count, so on that path a prompt's bits still depended on its batch (down_proj, 2 threads:
a 64-row prompt alone and inside a 512-row step differ); the dynamic kernel has no such split.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from server.model import int8_dynamic

log = logging.getLogger(__name__)

QUANT_MODES = ("none", "int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128)
# 32, by perplexity on the default model (benchmarks/perplexity.py then scoring 631 tokens, none = 23.03):
# G=32 +0.07%, G=64 +36%, G=128 +92% (int8 lm_head in each). SmolLM2's GGUF is Q4_1, already on a
# 4-bit min/scale grid in blocks of 32, which G=32 reproduces exactly and wider groups smear.
DEFAULT_INT4_GROUP = 32
KERNELS = ("auto", "dynamic", "triton", "fused", "fused_bf16", "dequant")
_DEQUANT_CHUNK_ELEMS = 1 << 22  # rows dequantized at once: bounds the temporary to ~16 MB in fp32


@dataclass(frozen=True)
class QuantConfig:
    """How base linears are stored and multiplied."""

    mode: str = "int8"
    int4_group_size: int = DEFAULT_INT4_GROUP
    # auto: the table below; dynamic: int8 activations too, per token (server/model/int8_dynamic.py,
    # CPU int8 only); triton: int8 weights x activations in x's dtype (server/model/int8_triton.py, CUDA
    # int8; on CPU only under TRITON_INTERPRET=1); fused: the weight kernel in x's dtype; fused_bf16: the
    # weight kernel with bf16 activations; dequant: dequantize then F.linear in x's dtype.
    kernel: str = "auto"

    def __post_init__(self) -> None:
        if self.mode not in QUANT_MODES:
            raise ValueError(f"quantization {self.mode!r}: choose one of {', '.join(QUANT_MODES)}")
        if self.int4_group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"int4 group size {self.int4_group_size}: choose one of {INT4_GROUP_SIZES}")
        if self.kernel not in KERNELS:
            raise ValueError(f"quant kernel {self.kernel!r}: choose one of {', '.join(KERNELS)}")


# ---------------------------------------------------------------- quantizers (pure functions)

def quantize_int8(w: torch.Tensor, scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: w ~= q * scale[:, None], q in [-127, 127].

    The scale is rounded to its storage dtype first and q computed against the rounded
    value, so the stored pair is the best one the kernel can use.
    """
    w = w.detach().float()
    amax = w.abs().amax(dim=1)
    scale = (amax / 127.0).clamp(min=torch.finfo(torch.float32).tiny).to(scale_dtype)
    q = torch.round(w / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[:, None]


def quantize_int4(w: torch.Tensor, group_size: int,
                  param_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric grouped 4-bit, in the layout of torch's int4 weight kernels.

    w[n, g*G + j] ~= (q - 8) * scale[n, g] + zero[n, g], q in [0, 15], where zero is the
    group's midpoint value (min + 8 * scale). K must be a multiple of `group_size`
    (`QuantLinear` pads). Returns q as int32 [N, K], scale and zero [N, K/G].
    """
    w = w.detach().float()
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"in_features {k} is not a multiple of the int4 group size {group_size}")
    wg = w.reshape(n, k // group_size, group_size)
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
    scale = ((hi - lo) / 15.0).clamp(min=1e-10).to(param_dtype)
    zero = (lo + 8.0 * scale.float()).to(param_dtype)
    q = torch.round((wg - zero.float()[..., None]) / scale.float()[..., None] + 8.0).clamp_(0, 15)
    return q.to(torch.int32).reshape(n, k).contiguous(), scale.contiguous(), zero.contiguous()


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    n, k = q.shape
    qg = q.float().reshape(n, k // group_size, group_size)
    return ((qg - 8.0) * scale.float()[..., None] + zero.float()[..., None]).reshape(n, k)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Two 4-bit values per byte along K (even column in the high nibble): [N, K] -> uint8 [N, K/2]."""
    q = q.to(torch.uint8)
    return ((q[:, 0::2] << 4) | q[:, 1::2]).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    hi, lo = (packed >> 4).to(torch.int32), (packed & 0xF).to(torch.int32)
    return torch.stack([hi, lo], dim=-1).reshape(packed.shape[0], -1)


# ---------------------------------------------------------------- kernel choice

def _has_op(name: str) -> bool:
    return hasattr(torch.ops.aten, name)


def _triton_int8():
    """server.model.int8_triton when triton imports, else None (imported on first use: CPU start-ups skip it)."""
    from server.model import int8_triton

    return int8_triton if int8_triton.available() else None


def _choose(mode: str, device: torch.device, dtype: torch.dtype, kernel: str) -> str:
    """The kernel path for (mode, device, compute dtype): 'dynamic', 'triton', 'fused', 'fused_bf16' or 'dequant'."""
    if kernel == "dynamic" and not (mode == "int8" and device.type == "cpu"):
        raise ValueError(f"the dynamic int8 kernel runs int8 on CPU, not {mode} on {device.type}")
    if kernel == "triton" and not (mode == "int8" and _triton_int8() is not None):
        raise ValueError(f"the Triton int8 kernel runs int8 where triton imports, not {mode}")
    if kernel != "auto":
        return kernel
    if device.type == "cpu":
        if mode == "int8" and int8_dynamic.load() is not None:
            # int8 x int8 products, per-token activation scales (measured: module docstring).
            return "dynamic"
        op = "_weight_int8pack_mm" if mode == "int8" else "_weight_int4pack_mm_for_cpu"
        if not _has_op(op):
            return "dequant"
        # Measured on AVX2 EPYC (module docstring): the weight kernels are the fastest with
        # half-precision activations and far the slowest with fp32 ones.
        return "fused" if dtype in (torch.bfloat16, torch.float16) else "fused_bf16"
    if device.type == "cuda":
        if mode == "int8" and _triton_int8() is not None:
            return "triton"
        op = "_weight_int8pack_mm" if mode == "int8" else "_weight_int4pack_mm"
        if not _has_op(op):
            return "dequant"
        # CUDA int4 kernel takes bf16 only; int8 takes bf16/fp16/fp32.
        if mode == "int4" and dtype != torch.bfloat16:
            return "fused_bf16"
        return "fused"
    return "dequant"


# ---------------------------------------------------------------- modules

class DenseLinear(nn.Module):
    """Full-precision base linear (`none`); `weight` may be shared, e.g. a tied lm_head."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.out_features, self.in_features = weight.shape
        self.kernel = "dense"

    def forward(self, x: torch.Tensor, prompt_from: Optional[int] = None) -> torch.Tensor:
        w = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, w, b)

    @property
    def nbytes(self) -> int:
        return _tensor_bytes(self.weight, self.bias)


class QuantLinear(nn.Module):
    """A weight-only quantized linear: x [..., in] -> [..., out] in x's dtype.

    Buffers hold exactly what is stored (`nbytes`); `dequantize()` rebuilds the fp32
    weight the kernels compute with, the reference every path is tested against.
    """

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], mode: str,
                 dtype: torch.dtype, device: torch.device, group_size: int = DEFAULT_INT4_GROUP,
                 kernel: str = "auto"):
        super().__init__()
        if mode not in ("int8", "int4"):
            raise ValueError(f"QuantLinear mode {mode!r}: int8 or int4")
        device = torch.device(device)
        self.mode, self.out_features, self.in_features = mode, int(weight.shape[0]), int(weight.shape[1])
        self.kernel = _choose(mode, device, dtype, kernel)
        # The dtype activations are in when they reach the weight kernel; scales are kept in it.
        self.kernel_dtype = torch.bfloat16 if self.kernel == "fused_bf16" else dtype
        if self.kernel == "dequant":
            self.kernel_dtype = dtype
        self.group_size = group_size if mode == "int4" else 0
        self._pw: Optional[int8_dynamic.PackedWeight] = None  # the dynamic kernel's weight, when it runs
        self._int8_matmul = _triton_int8().int8_matmul if self.kernel == "triton" else None  # looked up once
        self.bias = None if bias is None else nn.Parameter(
            bias.detach().to(device=device, dtype=dtype), requires_grad=False)
        if self.kernel == "dynamic":
            self._init_dynamic(weight)
            return
        w = weight.detach().to(device=device, dtype=torch.float32)
        # The fused kernels read K in whole vectors (torch 2.13's CPU int8 kernel crashes the process
        # on K % 16 != 0; int4 needs whole groups): pad with zero columns, matched by zero-padded x.
        align = 16 if mode == "int8" else group_size
        self.padded_in = -(-self.in_features // align) * align \
            if self.kernel not in ("dequant", "triton") or mode == "int4" else self.in_features
        if self.padded_in != self.in_features:
            w = F.pad(w, (0, self.padded_in - self.in_features))
        if mode == "int8":
            q, scale = quantize_int8(w, self.kernel_dtype)
            self.register_buffer("qweight", q)
            self.register_buffer("scale", scale)
        else:
            q, scale, zero = quantize_int4(w, group_size, self.kernel_dtype)
            packed = self._pack_for_kernel(q, device) if self.kernel != "dequant" else None
            if packed is None:
                if self.kernel != "dequant":
                    log.info("int4 kernel unavailable for %s; dequantizing instead", tuple(weight.shape))
                self.kernel, self.kernel_dtype = "dequant", dtype
                q, scale, zero = quantize_int4(w, group_size, dtype)  # scales in the dtype we now compute in
                self.register_buffer("qweight", pack_int4(q))
                self.register_buffer("scale", scale)
                self.register_buffer("zero", zero)
            else:
                self.register_buffer("qweight", packed)
                # Kernel layout: [K/G, N, 2] holding (scale, zero).
                self.register_buffer("scale_zero", torch.stack([scale.t(), zero.t()], dim=-1).contiguous())

    def _init_dynamic(self, weight: torch.Tensor) -> None:
        kern = int8_dynamic.load()
        if kern is None:
            raise RuntimeError("the dynamic int8 kernel is unavailable on this machine (see the log)")
        self._dyn = kern
        self.kernel_dtype = torch.int8  # activations reach the kernel as int8
        pw = kern.pack(weight.detach().float().cpu())
        self.padded_in, self.rotation = pw.kp, pw.block
        self.register_buffer("qweight", pw.packed)
        self.register_buffer("wsum", pw.wsum)
        self.register_buffer("scale", pw.scale)
        self._pw = pw  # the same tensors, as the kernel takes them

    def _pack_for_kernel(self, q: torch.Tensor, device: torch.device) -> Optional[torch.Tensor]:
        try:
            if device.type == "cpu":
                return torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
            # CUDA tinygemm: uint8 [N, K/2] input, K-tiles of 16*innerKTiles; N a multiple of 8.
            inner = 8 if q.shape[1] % 128 == 0 else (4 if q.shape[1] % 64 == 0 else 2)
            return torch._convert_weight_to_int4pack(pack_int4(q), inner)
        except (RuntimeError, NotImplementedError, AttributeError) as e:
            log.debug("int4 pack failed for %s: %s", tuple(q.shape), e)
            return None

    # -- what is stored
    @property
    def nbytes(self) -> int:
        return _tensor_bytes(*self.buffers(recurse=False), self.bias)

    def dequantize(self) -> torch.Tensor:
        """The fp32 [out, in] weight this module multiplies by (`dynamic`: by which int8
        activations are multiplied, the rotation undone)."""
        if self.kernel == "dynamic":
            return self._dyn.dequantize(self._pw)
        if self.mode == "int8":
            return dequantize_int8(self.qweight, self.scale)[:, :self.in_features]
        if self.kernel == "dequant":
            q = unpack_int4(self.qweight)
            return dequantize_int4(q, self.scale, self.zero, self.group_size)[:, :self.in_features]
        # The packed layout is the kernel's own: read it back through the kernel on the
        # identity (one product per output, so no rounding in fp32).
        fp32_ok = self.qweight.device.type == "cpu"
        dt = torch.float32 if fp32_ok else self.kernel_dtype
        eye = torch.eye(self.padded_in, dtype=dt, device=self.qweight.device)
        w = self._fused_int4(eye, self.scale_zero.to(dt)).float().t()
        return w[:, :self.in_features].contiguous()

    # -- compute
    def _fused_int4(self, x2: torch.Tensor, scale_zero: torch.Tensor) -> torch.Tensor:
        if x2.device.type == "cpu":
            return torch._weight_int4pack_mm_for_cpu(x2, self.qweight, self.group_size, scale_zero)
        return torch._weight_int4pack_mm(x2, self.qweight, self.group_size, scale_zero)

    def _dequant_matmul(self, x2: torch.Tensor) -> torch.Tensor:
        # Row chunks keep the temporary dense weight small (the lm_head is 49152 rows).
        rows = max(1, _DEQUANT_CHUNK_ELEMS // max(1, self.padded_in))
        outs = []
        for r0 in range(0, self.out_features, rows):
            r1 = min(self.out_features, r0 + rows)
            if self.mode == "int8":
                # One pass (int8 * scale promotes) into a reused buffer: a fresh multi-MB
                # allocation costs more in page faults than the arithmetic.
                w = _scratch((r1 - r0, self.qweight.shape[1]), x2.dtype, x2.device)
                torch.mul(self.qweight[r0:r1], self.scale[r0:r1, None].to(x2.dtype), out=w)
                w = w[:, :self.in_features]
            else:
                q = unpack_int4(self.qweight[r0:r1])
                w = dequantize_int4(q, self.scale[r0:r1], self.zero[r0:r1], self.group_size)
                w = w[:, :self.in_features].to(x2.dtype)
            outs.append(x2 @ w.t())
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)

    def forward(self, x: torch.Tensor, prompt_from: Optional[int] = None) -> torch.Tensor:
        """x [..., in] -> [..., out]; rows of x from `prompt_from` on are prompt tokens (None: none are)."""
        if self._pw is not None:
            # dynamic: every row alike, prompt or decode. The product is exact in integers and its
            # scaling a fixed per-element formula, so no row's numbers depend on the rest of the batch.
            y = self._dyn.linear(x, self._pw)
            if self.bias is not None:
                y = y + self.bias.float()
            return y if y.dtype == x.dtype else y.to(x.dtype)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if (self.kernel != "dequant" and self.mode == "int8" and prompt_from is not None
                and x2.device.type == "cpu" and prompt_from < x2.shape[0]):
            if prompt_from == 0:
                y = self._dequant_matmul(x2)
            else:
                y = x2.new_empty((x2.shape[0], self.out_features))
                y[:prompt_from] = self._kernel_matmul(x2[:prompt_from])
                y[prompt_from:] = self._dequant_matmul(x2[prompt_from:])
        elif self.kernel == "dequant":
            y = self._dequant_matmul(x2)
        else:
            y = self._kernel_matmul(x2)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def _kernel_matmul(self, x2: torch.Tensor) -> torch.Tensor:
        if self.kernel == "triton":
            return self._int8_matmul(x2, self.qweight, self.scale)
        xk = x2.to(self.kernel_dtype)
        if self.padded_in != self.in_features:
            xk = F.pad(xk, (0, self.padded_in - self.in_features))
        xk = xk.contiguous()
        if self.mode == "int8":
            y = torch._weight_int8pack_mm(xk, self.qweight, self.scale)
        else:
            y = self._fused_int4(xk, self.scale_zero)
        return y.to(x2.dtype)

    def extra_repr(self) -> str:
        g = f", group={self.group_size}" if self.mode == "int4" else ""
        return (f"in={self.in_features}, out={self.out_features}, mode={self.mode}{g}, "
                f"kernel={self.kernel}({str(self.kernel_dtype).removeprefix('torch.')})")


_workspace = threading.local()


def _scratch(shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A per-thread buffer for dequantized weight chunks, grown on demand and reused."""
    n = shape[0] * shape[1]
    key = (dtype, device)
    buf = getattr(_workspace, "bufs", {}).get(key)
    if buf is None or buf.numel() < n:
        with torch.inference_mode(False):  # a normal tensor: writable in and out of inference mode
            buf = torch.empty(n, dtype=dtype, device=device)
        _workspace.bufs = {**getattr(_workspace, "bufs", {}), key: buf}
    return buf[:n].view(shape)


def _tensor_bytes(*tensors: Optional[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


_logged: set[tuple[str, str, str, str]] = set()


def make_linear(weight: torch.Tensor, bias: Optional[torch.Tensor], mode: str,
                dtype: torch.dtype, device: torch.device, *, group_size: int = DEFAULT_INT4_GROUP,
                kernel: str = "auto") -> nn.Module:
    """A base linear for `weight` [out, in] stored as `mode`, computing in `dtype` on `device`."""
    cfg = QuantConfig(mode=mode, int4_group_size=group_size, kernel=kernel)  # validates
    device = torch.device(device)
    if cfg.mode == "none":
        w = weight.detach().to(device=device, dtype=dtype).contiguous()
        b = None if bias is None else bias.detach().to(device=device, dtype=dtype)
        return DenseLinear(w, b)
    mod = QuantLinear(weight, bias, cfg.mode, dtype, device, group_size=cfg.int4_group_size, kernel=cfg.kernel)
    key = (cfg.mode, device.type, str(dtype), mod.kernel)
    if key not in _logged:
        _logged.add(key)
        log.info("quantized linears: mode=%s device=%s dtype=%s -> kernel %s (%s activations)",
                 cfg.mode, device.type, str(dtype).removeprefix("torch."), mod.kernel,
                 str(mod.kernel_dtype).removeprefix("torch."))
    return mod


def lm_head_mode(mode: str) -> str:
    """Storage of the output projection for a base quantized as `mode`.

    The head's error lands on every logit directly, and 4-bit there cost +6% perplexity on
    the default model against +0.07% for int8 (whose copy is only 2x int4's), so `int4`
    keeps an int8 head.
    """
    return "int8" if mode == "int4" else mode


def make_lm_head(embed_weight: torch.Tensor, mode: str, dtype: torch.dtype, device: torch.device,
                 **kw: object) -> nn.Module:
    """The output projection for tied embeddings (or an untied head's weight).

    With `none` it shares the given tensor (no copy). Otherwise it is a separate quantized
    copy stored as `lm_head_mode(mode)`: the embedding lookup keeps the dense table, the
    logits matmul (the largest one at small batch) reads the quantized one.
    """
    if mode == "none":
        w = embed_weight.detach()
        if w.device != torch.device(device) or w.dtype != dtype:
            w = w.to(device=device, dtype=dtype)
        return DenseLinear(w, None)
    return make_linear(embed_weight, None, lm_head_mode(mode), dtype, device, **kw)  # type: ignore[arg-type]


def kernel_description(model: nn.Module) -> str:
    """In words, which kernels a model's base linears run (for the log and benchmark results)."""
    kinds = sorted({(m.kernel, str(getattr(m, "kernel_dtype", "")).removeprefix("torch."))
                    for m in model.modules() if isinstance(m, (DenseLinear, QuantLinear))})
    words = []
    for kernel, dtype in kinds:
        if kernel == "dynamic":
            kern = int8_dynamic.load()
            words.append(kern.description if kern else "dynamic")
        elif kernel == "dense":
            words.append("dense (torch F.linear)")
        else:
            words.append(f"{kernel} ({dtype} activations)")
    return "; ".join(words)


def module_nbytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer in `model`, each storage counted once (tied weights)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total
