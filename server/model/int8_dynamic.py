"""int8 x int8 linears on CPU: per-token int8 activations, per-channel int8 weights, int32 sums.

Why: weight-only int8 (torch's `_weight_int8pack_mm`) still multiplies in floating point, so a
decode step of 8 rows runs at a fraction of the memory bandwidth and a 512-token prefill at the
fp32 peak. Quantizing activations too lets the integer dot-product units do the work (AVX-512
VNNI / AMX here, AVX2's maddubs elsewhere).

Numerics, the same on every path:

* Each token's row is rotated by a block Hadamard transform (blocks of `rotation_block(kp)`:
  64 for K=576, 512 for K=1536) before it is quantized, and every weight row by the same
  transform at load. The transform is orthogonal up to a power of two, so the product is
  unchanged, but a few outlier channels no longer set the whole row's scale: on SmolLM2,
  per-token int8 of the raw activations cost +3.6% perplexity, of the rotated ones +0.3%
  (weight-only int8 +0.02%; benchmarks/perplexity.py on its first 631 tokens, when it had no more).
* A row's scale is its own absmax / 127 (per token, never per batch), q = rint(x * 127/absmax).
* The integer dot products are exact (int32), and the result is ((float)acc * w_scale[n]) *
  x_scale[m]: one fixed formula per output element. A row's numbers therefore never depend on
  the other rows of its batch or on which path ran: whole groups of 16 rows go through AMX where
  the CPU has it, the rest through the vector kernel, and both give the same bits (tested).

Kernels: every batch takes the C kernel (int8_dynamic.c), one pass over the weights: AMX tiles for groups of
16 rows (and for the last rows of a batch of 2 or more), VNNI or AVX2 vectors otherwise, by the
machine it was built on. oneDNN's int8 GEMM (`torch.ops.onednn.qlinear_pointwise`) was measured
beside it and replaced by AMX tiles of our own: single threaded on SmolLM2's shapes (this repo's
AMX Xeon), 8 rows of 3072x576 took 99 us in the C kernel against 190 us in oneDNN and 917 us in
fp32.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os
import threading
from dataclasses import dataclass
from typing import Optional

import torch

from server.core.native import C_AMX_TILES, NATIVE_FLAGS, NativeBuildError, build_and_load, c_source

log = logging.getLogger(__name__)

NB = 16            # output columns per packed block (the C kernel's NB)
K_ALIGN = 64       # K is padded to a multiple of this (the AMX tile depth), so a rotation block is at least 64 wide
MAX_ROTATION = 512
_MAX_KP = 1 << 16  # the quantizer keeps one padded row on the stack

_SOURCE = c_source(__file__, "int8_dynamic.c").replace("@AMX_TILES@", C_AMX_TILES)


def padded_k(k: int) -> int:
    return -(-k // K_ALIGN) * K_ALIGN


def rotation_block(kp: int) -> int:
    """The Hadamard block for a padded width: the largest power of two up to 512 that divides it."""
    b = MAX_ROTATION
    while kp % b:
        b //= 2
    return b


def hadamard_reference(v: torch.Tensor, b: int) -> torch.Tensor:
    """The kernel's rotation in torch, stage for stage (so bit for bit): rows of v in blocks of b."""
    shape = v.shape
    x = v.reshape(-1, b).clone()
    h = b // 2
    while h >= 1:
        x = x.view(-1, b // (2 * h), 2, h)
        a, c = x[:, :, 0], x[:, :, 1]
        x = torch.stack([a + c, a - c], dim=2).reshape(-1, b)
        h //= 2
    return x.reshape(shape)


def quantize_reference(x: torch.Tensor, kp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's activation quantizer in torch (bit for bit): u8 [m, kp] (zero point 128), scales [m]."""
    v = hadamard_reference(torch.nn.functional.pad(x.float(), (0, kp - x.shape[1])), rotation_block(kp))
    amax = v.abs().amax(dim=1)
    # A true division, as the kernel's (a Python number over a tensor is a reciprocal times the number).
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    q = torch.round(v * inv[:, None]).clamp_(-127, 127) + 128
    return q.to(torch.uint8), amax / 127.0


@dataclass
class PackedWeight:
    """One linear's int8 weight in the kernel's layout; `scale` already carries the rotation's 1/b."""

    out_features: int
    in_features: int
    kp: int
    block: int
    packed: torch.Tensor  # int8, blocks of NB outputs x 4 inputs
    wsum: torch.Tensor    # int32 [blocks * NB]: each row's sum, for the u8 zero point
    scale: torch.Tensor   # fp32 [blocks * NB], zero past out_features

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.packed, self.wsum, self.scale

    @functools.cached_property
    def call_args(self) -> tuple[int, ...]:
        """(n, packed, wsum, scale) as the C call takes them: computed once, not per call."""
        return self.out_features, self.packed.data_ptr(), self.wsum.data_ptr(), self.scale.data_ptr()


class DynamicInt8:
    """The compiled kernels behind `pack` (load time) and `linear` (per call)."""

    def __init__(self, lib: ctypes.CDLL):
        i, lg, p = ctypes.c_int, ctypes.c_long, ctypes.c_void_p
        lib.lsq_quantize.argtypes = [i, i, i, i, p, lg, p, p]
        lib.lsq_rotate.argtypes = [i, i, i, p]
        lib.lsq_pack.argtypes = [i, i, p, p]
        lib.lsq_gemm.argtypes = [i, i, i, p, p, p, p, p, p, lg]
        lib.lsq_linear.argtypes = [i, i, i, i, p, lg, p, p, i, p, p, p, p, lg]
        lib.lsq_isa.restype = ctypes.c_char_p
        lib.lsq_set_amx_min_rows.argtypes = [i]
        self._lib = lib
        self.amx = bool(lib.lsq_has_amx()) and bool(lib.lsq_amx_init())
        self.isa = lib.lsq_isa().decode()
        self._scratch = threading.local()

    @property
    def description(self) -> str:
        """Which kernel runs, for the log and the benchmark JSON."""
        return f"loraserve int8 dynamic (per-token, Hadamard): {'amx' if self.amx else self.isa}"

    def set_amx_min_rows(self, rows: int) -> None:
        """Batches of fewer rows take the vector kernel (the same bits; tests compare the two)."""
        self._lib.lsq_set_amx_min_rows(rows)

    # -- load time
    def pack(self, weight: torch.Tensor) -> PackedWeight:
        """Rotate, quantize per output channel and pack an fp32 [out, in] weight."""
        n, k = weight.shape
        kp = padded_k(k)
        if kp > _MAX_KP:
            raise ValueError(f"in_features {k} over the kernel's {_MAX_KP}")
        b = rotation_block(kp)
        w = self.rotate(torch.nn.functional.pad(weight.detach().float(), (0, kp - k)))
        amax = w.abs().amax(dim=1)
        s = (amax / 127.0).clamp(min=torch.finfo(torch.float32).tiny)
        q = torch.round(w / s[:, None]).clamp_(-127, 127).to(torch.int8).contiguous()
        blocks = -(-n // NB)
        packed = torch.empty(blocks * NB * kp, dtype=torch.int8)
        self._lib.lsq_pack(n, kp, q.data_ptr(), packed.data_ptr())
        wsum = torch.zeros(blocks * NB, dtype=torch.int32)
        wsum[:n] = q.sum(dim=1, dtype=torch.int32)
        scale = torch.zeros(blocks * NB)
        scale[:n] = s / b  # exact: b is a power of two
        return PackedWeight(n, k, kp, b, packed, wsum, scale)

    def rotate(self, rows: torch.Tensor) -> torch.Tensor:
        """fp32 rows [n, kp] rotated by the kernel's own transform (a copy), in blocks of rotation_block(kp)."""
        w = rows.float().contiguous().clone()
        n, kp = w.shape
        if kp % K_ALIGN:
            raise ValueError(f"width {kp} is not a multiple of {K_ALIGN}")
        self._lib.lsq_rotate(n, kp, rotation_block(kp), w.data_ptr())
        return w

    def unpack(self, pw: PackedWeight) -> torch.Tensor:
        """int8 [out, kp]: the quantized rotated weight back from the kernel's layout."""
        blocks = pw.packed.numel() // (NB * pw.kp)
        q = pw.packed.view(blocks, pw.kp // 4, NB, 4).permute(0, 2, 1, 3).reshape(blocks * NB, pw.kp)
        return q[:pw.out_features]

    def dequantize(self, pw: PackedWeight) -> torch.Tensor:
        """The fp32 [out, in] weight the product stands for: (q * scale) rotated back."""
        w = self.unpack(pw).float() * pw.scale[:pw.out_features, None]
        return hadamard_reference(w, pw.block)[:, :pw.in_features].contiguous()

    # -- per call
    def quantize(self, x2: torch.Tensor, kp: int) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 rows [m, k] -> (u8 [m, kp] in a per-thread scratch, fp32 scales [m])."""
        m, k = x2.shape
        if x2.dtype != torch.float32 or x2.stride(1) != 1:
            x2 = x2.float().contiguous()
        q = torch.empty(m, kp, dtype=torch.uint8)
        s = torch.empty(m)
        self._lib.lsq_quantize(m, k, kp, rotation_block(kp), x2.data_ptr(), x2.stride(0), q.data_ptr(), s.data_ptr())
        return q, s

    def matmul(self, q: torch.Tensor, s: torch.Tensor, pw: PackedWeight) -> torch.Tensor:
        """y [m, out] fp32 from quantized rows."""
        m = q.shape[0]
        y = torch.empty(m, pw.out_features)
        if m:
            self._lib.lsq_gemm(m, pw.out_features, pw.kp, q.data_ptr(), s.data_ptr(), pw.packed.data_ptr(),
                               pw.wsum.data_ptr(), pw.scale.data_ptr(), y.data_ptr(), y.stride(0))
        return y

    def linear(self, x: torch.Tensor, pw: PackedWeight) -> torch.Tensor:
        """[..., in] -> fp32 [..., out] in one C call (the engine's path; `quantize` and `matmul` are
        its two halves, for tests)."""
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]) if x.dim() != 2 else x
        if x2.dtype is not torch.float32 or x2.stride(1) != 1:
            x2 = x2.float().contiguous()
        m = x2.shape[0]
        y = torch.empty(m, pw.out_features)
        if m:
            q = self._scratch_ptr("q", m * pw.kp, torch.uint8)
            s = self._scratch_ptr("s", m, torch.float32)
            n, wp, wsum, ws = pw.call_args
            self._lib.lsq_linear(m, pw.in_features, pw.kp, pw.block, x2.data_ptr(), x2.stride(0), q, s, n, wp,
                                 wsum, ws, y.data_ptr(), n)
        return y if x.dim() == 2 else y.view(*shape[:-1], pw.out_features)

    def scratch(self, m: int, kp: int) -> tuple[int, int]:
        """Addresses of this thread's activation scratch for m rows of up to kp bytes and their m scales:
        what `linear` passes the kernel, for a caller that calls it from C (server/model/fused_decode.py)."""
        return self._scratch_ptr("q", m * kp, torch.uint8), self._scratch_ptr("s", m, torch.float32)

    def _scratch_ptr(self, name: str, n: int, dtype: torch.dtype) -> int:
        """Address of this thread's buffer `name` of at least n elements (grown, never shrunk)."""
        held = getattr(self._scratch, name, None)
        if held is None or held[1] < n:
            with torch.inference_mode(False):  # a normal tensor, usable in and out of inference mode
                buf = torch.empty(max(n, 1 << 16), dtype=dtype)
            held = (buf, buf.numel(), buf.data_ptr())
            setattr(self._scratch, name, held)
        return held[2]


@functools.lru_cache(maxsize=None)
def load(flags: tuple[str, ...] = NATIVE_FLAGS) -> Optional[DynamicInt8]:
    """The kernels, built on first use; None (logged once) where they cannot be had.
    LORASERVE_INT8_DYNAMIC=0 turns them off (int8 then runs torch's weight-only kernels)."""
    if os.environ.get("LORASERVE_INT8_DYNAMIC", "1") == "0":
        log.info("int8 dynamic kernels: off (LORASERVE_INT8_DYNAMIC=0)")
        return None
    try:
        kern = DynamicInt8(build_and_load("int8_dynamic", _SOURCE, flags))
    except NativeBuildError as e:
        log.warning("int8 dynamic kernels unavailable (%s); int8 runs torch's weight-only kernels", e)
        return None
    log.info("%s", kern.description)
    return kern
