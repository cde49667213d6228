"""A small C kernel for the CPU decode step's LoRA, reading bf16 copies of the slot stacks.

A decode step of distinct adapters reads every adapter in the batch: 157 MB of fp32 LoRA
weights per step for 8 rank-16 adapters on SmolLM2, more than the int8 base itself. The
torch reference streams them with one bmm per slot group at about one core's bandwidth.
This kernel reads bf16 copies (half the bytes), accumulates in fp32, does shrink, scale
and expand of every decode token in one call per linear, and splits the tokens over the
engine thread's OpenMP team. Every decode row of every step takes it (prompt rows keep
the fp32 torch path), so a token's numbers depend on its kind, never on its batch. Measured in an A/B of 20 alternating SmolLM2 int8 decode steps,
8 distinct rank-16 adapters: +8.5 ms over the no-adapter step, against +15-17 ms for the
fp32 torch path (an fp32 version of this kernel gained nothing in the model: the bytes
are the cost, not the calls).

Rounding adapter weights to bf16 (8 mantissa bits) is what GPU servers do when the model
runs in bf16; here it is used only where the base is already quantized
(`EngineConfig.lora_decode_dtype = "auto"`), never in the PEFT-exact `--quantize none` setting.

Built once per machine (gcc or cc, `-O3 -march=native -fopenmp`) into
`$LORASERVE_HOME/kernels/` and loaded with ctypes after torch, so its OpenMP calls bind
to torch's own libgomp (checked: a second OpenMP runtime would fight torch's threads).
Without a compiler, or when any check fails, `load()` returns None and the torch
reference serves. LORASERVE_CPU_KERNEL=0 turns it off.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger(__name__)

_SOURCE = r"""
#include <stdint.h>
#include <string.h>
static inline float bf16_to_f32(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }

/* For each of n decode tokens t with slot s = slots[t] != 0: y[t] += scale[s] * (x[t] . A_s^T) . B_s^T,
   A_s: r rows of `in` bf16 at a + s*a_stride; B_s^T: r rows of `out` bf16 at bt + s*bt_stride. */
void loraserve_decode_bf16(int n, const int64_t* slots, int r, int in, int out,
                           const float* x, long x_stride, const uint16_t* a, long a_stride,
                           const uint16_t* bt, long bt_stride, const float* scale,
                           float* y, long y_stride) {
  #pragma omp parallel for schedule(static) if(n > 1)
  for (int t = 0; t < n; t++) {
    const long s = slots[t];
    if (s == 0) continue;
    float v[1024];
    const float* xs = x + t * x_stride;
    const uint16_t* as = a + s * a_stride;
    for (int j = 0; j < r; j++) {
      const uint16_t* row = as + (long)j * in;
      float acc = 0.f;
      #pragma omp simd reduction(+:acc)
      for (int i = 0; i < in; i++) acc += xs[i] * bf16_to_f32(row[i]);
      v[j] = acc * scale[s];
    }
    float* ys = y + t * y_stride;
    const uint16_t* bs = bt + s * bt_stride;
    for (int j = 0; j < r; j++) {
      const float vj = v[j];
      const uint16_t* row = bs + (long)j * out;
      #pragma omp simd
      for (int o = 0; o < out; o++) ys[o] += vj * bf16_to_f32(row[o]);
    }
  }
}
"""
_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
MAX_RANK = 1024  # v[] in the kernel


class CpuLoraKernel:
    def __init__(self, lib: ctypes.CDLL):
        fn = lib.loraserve_decode_bf16
        i, lg, p = ctypes.c_int, ctypes.c_long, ctypes.c_void_p
        fn.argtypes = [i, p, i, i, i, p, lg, p, lg, p, lg, p, p, lg]
        fn.restype = None
        self._fn = fn

    @staticmethod
    def accepts(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, scale: torch.Tensor) -> bool:
        """The layouts the kernel reads: fp32 x/y with unit-stride rows on CPU, bf16 stacks
        a [slots, R, in] and bt [slots, R, out] contiguous, fp32 scale [slots]."""
        return (x.dtype == y.dtype == scale.dtype == torch.float32 and a.dtype == bt.dtype == torch.bfloat16
                and x.device.type == "cpu" and x.stride(1) == 1 and y.stride(1) == 1
                and a.is_contiguous() and bt.is_contiguous() and scale.is_contiguous()
                and a.shape[2] == x.shape[1] and bt.shape[2] == y.shape[1] and a.shape[1] <= MAX_RANK)

    def decode(self, y: torch.Tensor, x: torch.Tensor, slots: torch.Tensor, a: torch.Tensor, bt: torch.Tensor,
               scale: torch.Tensor, rank: int) -> torch.Tensor:
        """y[t] += scale[s] * (x[t] A_s^T) B_s^T with the first `rank` rows of slot s = slots[t], for
        the first len(slots) rows (slot 0: untouched); see `accepts` for the layouts."""
        n = int(slots.shape[0])
        if not 0 < rank <= a.shape[1] or slots.dtype != torch.int64 or not slots.is_contiguous() \
                or n > x.shape[0] or n > y.shape[0]:
            raise ValueError(f"decode needs int64 slots for at most {min(x.shape[0], y.shape[0])} rows "
                             f"and 0 < rank <= {a.shape[1]}")
        if n and int(slots.max()) >= a.shape[0]:
            raise ValueError(f"slot {int(slots.max())} out of range for {a.shape[0]} slots")
        self._fn(n, slots.data_ptr(), rank, x.shape[1], y.shape[1], x.data_ptr(), x.stride(0),
                 a.data_ptr(), a.stride(0), bt.data_ptr(), bt.stride(0), scale.data_ptr(), y.data_ptr(), y.stride(0))
        return y


def _cache_dir() -> Path:
    home = os.environ.get("LORASERVE_HOME", "")
    return (Path(home).expanduser() if home else Path("~/.cache/loraserve").expanduser()) / "kernels"


def _cpu_flags() -> str:
    """Part of the cache key: -march=native code is valid only on the CPU it was built for."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def _build(target: Path) -> None:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise RuntimeError("no C compiler (gcc or cc) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / "lora_cpu.c"
        src.write_text(_SOURCE)
        so = Path(tmp) / target.name
        subprocess.run([cc, *_FLAGS, "-o", str(so), str(src)], check=True, capture_output=True, timeout=120)
        os.replace(so, target)  # atomic: a concurrent builder sees the whole file or none


def _openmp_runtimes() -> set[str]:
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="ignore") as f:
            return {line.split()[-1] for line in f if "libgomp" in line or "libiomp" in line}
    except OSError:
        return set()


@functools.lru_cache(maxsize=None)
def load() -> Optional[CpuLoraKernel]:
    """The compiled kernel, built on first use; None (logged once) when it cannot be had."""
    if os.environ.get("LORASERVE_CPU_KERNEL", "1") == "0":
        log.info("CPU LoRA kernel: off (LORASERVE_CPU_KERNEL=0)")
        return None
    digest = hashlib.sha256("\0".join([_SOURCE, *_FLAGS, _cpu_flags(), torch.__version__]).encode()).hexdigest()
    target = _cache_dir() / f"lora_cpu_{digest[:16]}.so"
    try:
        if not target.exists():
            _build(target)
        before = _openmp_runtimes()
        lib = ctypes.CDLL(str(target))
        if len(_openmp_runtimes() - before) > 0 and before:
            raise RuntimeError(f"it loaded a second OpenMP runtime beside torch's ({sorted(_openmp_runtimes())})")
        kernel = CpuLoraKernel(lib)
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        detail = (getattr(e, "stderr", b"") or b"").decode(errors="replace")[-500:]
        log.warning("CPU LoRA kernel unavailable (%s %s); the torch reference serves decode steps", e, detail)
        return None
    log.info("CPU LoRA kernel: %s", target)
    return kernel
