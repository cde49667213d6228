"""Small C kernels for CPU LoRA where the base is quantized, reading bf16 or int8 copies of the adapters' rank rows.

A decode step of distinct adapters reads every adapter in the batch: 157 MB of fp32 LoRA
weights per step for 8 rank-16 adapters on SmolLM2, more than the int8 base itself. The
torch reference streams them with one bmm per slot group at about one core's bandwidth.
The decode kernel reads bf16 copies (half the bytes), accumulates in fp32, does shrink,
scale and expand of every decode token in one call per group of linears that read the same
x (q/k/v, gate/up: 4 calls a layer instead of 7, on `KernelPlan`s packed once at start-up so
a call costs about 6 us of Python), and splits the tokens over the engine thread's OpenMP
team. Measured in an A/B of 20-30 alternating SmolLM2 int8 decode steps, 8 distinct rank-16
adapters: +8-10 ms over the no-adapter step, against +15-17 ms for the fp32 torch path (an
fp32 version of this kernel gained nothing in the model: the bytes are the cost, not the calls).
Decode tokens on the same adapter go through together, up to four at a time (int8 rows): each weight vector
is converted from int8 once for the four, each token keeps its own accumulators summed in the same order as
alone, so its bits do not depend on who shares its adapter (tested). A popular adapter's tokens paid the
conversion once each before: in the engine (SmolLM2 int8, 16 sequences on one rank-16 adapter, decode ms a
step, three alternating processes each way) one adapter cost 5.5-7.0 ms over no adapter, now 2.9-3.8 ms;
8 distinct adapters, one token each, are unchanged (18.3-20.8 against 19.2-21.1 ms).

The prompt kernel takes prompt rows in blocks of up to PROMPT_BLOCK (32) tokens of one adapter, a thread a span
of consecutive blocks of one adapter at a time (up to PROMPT_SPAN, 128 rows): it converts the adapter's rank
rows to fp32 once for the span (once a block before: 8 x 64 rows 68.8-71.8 against 77.6-85.9 ms, a 544-row
prompt 59.0-69.1 against 73.3-73.8 ms, alternating in one process on a slow host, the same bits; built for
AVX2 alone, 75.1 against 76.9 and 98.0 against 105.7 ms), then multiplies in register tiles of 4 tokens x 4 ranks
(shrink) or 4 tokens x 4 vectors of output columns (expand), AVX-512's 16 lanes where the CPU has them (2 and
8 on AVX2), so every weight loaded serves 4 tokens and every x 4 ranks. Measured on SmolLM2's shapes (8
adapters of rank 16, 8 x 64 prompt rows, 30 layers, int8 rows, 2 threads): 39.8-41.7 ms against 54.6-59.0 ms
for the previous kernel (blocks of 4 tokens, 8 lanes, a weight converted per use); bf16 rows 38.6-41.2
against 54.9-55.3 ms. With AVX-512 a token's four rank sums of a tile are reduced together (horizontal adds
across the four accumulators): the kernel alone 27.5-28.6 against 30.1-30.4 ms over 30 layers (rows in cache),
LoRA's share of that prefill in the engine 33.5 / 34.7 against 37.5 / 37.9 ms (rank 8: 19.8 against 23.7 ms).
Of the rest: gate/up's expand runs at about 95 G MAC/s where q/k/v's reaches 220; an order keeping B^T's
columns in L1 changed nothing, so its y traffic (6 MB read and written for 512 rows) is the likely bound; the
shrink runs at about 40% of the FMA peak (ranks outer, tokens inner measured no better). Every row of every
step takes one of the two kernels, by kind, and a token's arithmetic never depends on the rest of its batch
(tested: the same numbers alone and batched).

Where the CPU has AMX (bf16 tiles) and the shapes fit (in a multiple of 32, every target's out of 16), prompt
rows go through tiles instead: a block's x rounded to bf16 once for all its targets, the slot's A^T and B^T
laid out as the tiles read them (the weights exact in bf16), shrink and expand as tile products with fp32 sums,
the expand's tiles loaded from y and stored back. Measured (8 x 64 prompt rows on 8 rank-16 adapters, SmolLM2
int8, 2 threads): the kernel alone over 30 layers 14.9-15.2 ms against 24.8-25.1 ms for the vector kernel, the
LoRA share of that prefill in the engine 18.1 against 30.9 ms, of 8 x 544 rows 149 against 295 ms. What is
left is y: every tile of output is read and written once (gate/up: 12.6 MB a layer at 512 rows), at about the
rate the caches give; x and the rank values rounded to bf16 move a delta by about 0.2% (int8 rows' own
rounding: about 1%). Laying a slot's rows out for the tiles was 16-27% of the kernel's time when it was done
for every block of 32 rows; it is done once a span of up to PROMPT_SPAN (128) rows of one slot, the same bits:
8 x 64 rows 32.1-38.0 ms against 35.4-41.0 ms (the two kernels alternating in one process, a slow host that
day), one 544-row prompt 33.8-37.5 against 40.2-44.2 ms, 16 x 32 rows unchanged.

Where the CPU has AVX-512 BF16 but no AMX (AMD Zen 4 and later, Intel Cooper Lake), the same layout feeds
`vdpbf16ps` instead of tiles: a vector holds a pair of in values of 16 ranks (shrink) or a pair of ranks of 16
output columns (expand), a token's pair of x or of rank values is broadcast to it, 32 products an instruction
against the FMA kernel's 16, the same roundings as the tiles. Measured on an AMD EPYC (Zen 4) guest, 2 threads,
8 x 64 prompt rows on 8 rank-16 adapters, int8 rows, 30 layers of SmolLM2, paths alternating in one process:
the kernel alone 33-38 ms against 65-68 ms for the vector kernel, LoRA's share of that prefill in the engine
25-32 ms against 57-65 ms. Of the rest, the expand is about two thirds: it reads and writes y (10.6 MB a layer
at 512 rows) at about the memory's rate. The three prompt paths are `PROMPT_PATHS`; the best the CPU has serves,
and `use_prompt_path` switches it (tests).

Both read an adapter's ranks through the pool's page table (`server/lora/stacks.py`): rank j of slot
s is row pages[s, j], one pointer per row of in or out values, so an adapter's rows may lie anywhere in
adapter memory; entries past a slot's own rank (row 0, zeros) are skipped, so a rank-8 adapter costs
rank-8 reads in a step whose largest rank is 32.

Rounding adapter weights to bf16 (8 mantissa bits) is what GPU servers do when the model
runs in bf16; here it is used only where the base is already quantized
(`EngineConfig.lora_decode_dtype = "auto"`), never in the PEFT-exact `--quantize none` setting.
`--lora-decode-dtype int8` halves the bytes again: each rank row of A and of B^T as int8 with one fp32
scale (max |value| / 127, `stacks.quantize_rows`), folded into the rank's intermediate value, so the
kernels are the bf16 ones with another element type (one C template, two instances; the bf16 instance
multiplies by a constant 1, so its bits are unchanged).

Built once per machine by `server/core/native.py` (gcc or cc, `-O3 -march=native -fopenmp`) into `kernels/` under the
engine's home (`--home`) and loaded with ctypes after torch, so its OpenMP calls bind to
torch's own libgomp (checked: a second OpenMP runtime would fight torch's threads). Without a
compiler, or when any check fails, `load()` returns None and the torch reference serves.
`server/lora/cpu_backend.py` is the backend that runs these kernels; `--lora-backend` chooses it.
"""
from __future__ import annotations

import ctypes
import functools
import logging
from pathlib import Path
from typing import Optional

import torch

from server.core.native import C_AMX_TILES, C_GROW_BUFFER, NATIVE_FLAGS, NativeBuildError, build_and_load, c_source
from server.lora.segments import LoraSegments

log = logging.getLogger(__name__)

_HEADER = c_source(__file__, "cpu_kernel.c")

# The kernels, written once for a weight type: WT (the element), W(h) (an element as a float), RS_A / RS_B (a
# row's scale: 1 for bf16, so the bf16 bits are those of the kernels before int8 rows existed).
_KERNELS = c_source(__file__, "cpu_kernel_typed.c")

MAX_RANK = 1024  # the kernels' rank buffers
PROMPT_BLOCK = 32  # prompt rows of one adapter a block (the AMX path's two tiles of 16 rows)
PROMPT_SPAN = 128  # a thread's work item: up to this many rows of one adapter (whole blocks), its rows prepared once
# Decode: rank rows asked for ahead of the one read. Measured with kernels swapped run by run in one engine (8
# sequences on 8 distinct rank-16 adapters, SmolLM2 int8), LoRA's ms a decode step: 1 row 2.81-3.34, 3 rows
# 2.63-2.93, 4 rows 2.65-2.71, 6 rows 2.45-2.70, 10 rows 2.59-2.69, 16 rows 2.63-2.71.
PF_ROWS = 6
_SOURCE = (C_GROW_BUFFER + _HEADER.replace("@PROMPT_BLOCK@", str(PROMPT_BLOCK)).replace("@MAX_RANK@", str(MAX_RANK))
           .replace("@PROMPT_SPAN@", str(PROMPT_SPAN))
           .replace("@AMX_TILES@", C_AMX_TILES)
           + f"#define PF_ROWS {PF_ROWS}\n"
           + "#define WT uint16_t\n#define W(h) bf(h)\n#define RS_A(T, p) 1.f\n#define RS_B(T, p) 1.f\n"
           + "#define W16F(p) _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32("
           + "_mm256_loadu_si256((const __m256i*)(p))), 16))\n"
           + "#define DOT1(row, in, x, acc) _Pragma(\"omp simd reduction(+:acc)\") \\\n"
           + "  for (int i = 0; i < in; i++) acc += x[i] * bf(row[i])\n"
           + "#define AXPY(y, v, row, out) _Pragma(\"omp simd\") \\\n"
           + "  for (int o = 0; o < out; o++) y[o] += v * bf(row[o])\n"
           + "#define DECODE_G 1\n"
           + "#define DOTG(row, in, x, G, acc) { float a1_ = 0.f; DOT1(row, in, x[0], a1_); acc[0] = a1_; }\n"
           + "#define AXPYG(y, v, G, row, out) AXPY(y[0], v[0], row, out)\n"
           + _KERNELS.replace("@SUF@", "bf16")
           + "#undef WT\n#undef W\n#undef RS_A\n#undef RS_B\n#undef DOT1\n#undef AXPY\n#undef W16F\n"
           + "#undef DECODE_G\n#undef DOTG\n#undef AXPYG\n"
           + "#define WT int8_t\n#define W(h) ((float)(h))\n#define RS_A(T, p) ((T)->a_sc[p])\n"
           + "#define RS_B(T, p) ((T)->bt_sc[p])\n#define W16F(p) i8x16(p)\n"
           + "#define DECODE_G DECODE_GROUP\n#define DOTG(row, in, x, G, acc) dotg_i8(row, in, x, G, acc)\n"
           + "#define AXPYG(y, v, G, row, out) axpyg_i8(y, v, G, row, out)\n"
           + "#define AXPYG4(y, v, G, rows, out) axpyg4_i8(y, v, G, rows, out)\n"
           + _KERNELS.replace("@SUF@", "i8"))
_F32 = torch.float32


class _Target(ctypes.Structure):
    _fields_ = [("a", ctypes.c_void_p), ("a_row", ctypes.c_long), ("bt", ctypes.c_void_p),
                ("bt_row", ctypes.c_long), ("scale", ctypes.c_void_p), ("out", ctypes.c_long),
                ("y_off", ctypes.c_long), ("a_sc", ctypes.c_void_p), ("bt_sc", ctypes.c_void_p)]


WEIGHT_DTYPES = (torch.bfloat16, torch.int8)  # what the kernels read; int8 rows carry one fp32 scale each
# The prompt kernel's paths, by the C side's number: fp32 FMA, then the bf16 pair products (cpu_kernel.c).
PROMPT_PATHS = ("vector FMA", "AVX-512 bf16 dot products", "AMX bf16 tiles")


def _rows_contiguous(t: torch.Tensor) -> bool:
    """[rows, n] whose every row is contiguous (the rows themselves may be apart)."""
    return t.dim() == 2 and t.stride(1) == 1


class KernelPlan:
    """The kernels' view of one group of targets that read the same x (q/k/v, gate/up, or one
    linear alone): their rank rows' pointers, the page table and output columns, checked and packed
    once (at backend start-up) so that a step pays one ctypes call per group and kind of row, and no
    per-call checks on them. It keeps its tensors alive; they must stay in place (the pool writes
    adapters into them and their rows into the page table)."""

    def __init__(self, parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]], pages: torch.Tensor,
                 row_scales: Optional[list[tuple[torch.Tensor, torch.Tensor]]] = None):
        """parts: per target (A rows [P, K], B^T rows [P, w], both bf16 or both int8, scale [N] fp32, first
        output column); pages: [N, R] int32, slot s's rank j at row pages[s, j] (`server/lora/stacks.py`);
        row_scales: with int8 rows, per target the fp32 scales [P] of its A rows and of its B^T rows."""
        if not parts:
            raise ValueError("a plan needs at least one target")
        if not (pages.dtype == torch.int32 and pages.device.type == "cpu" and pages.dim() == 2
                and pages.is_contiguous()):
            raise ValueError("the page table must be a contiguous [slots, R] int32 CPU tensor")
        self.slots, self.max_rank = pages.shape
        a0 = parts[0][0]
        self.in_features = a0.shape[1] if a0.dim() == 2 else 0
        self.width = 0  # columns of y the group spans
        self.dtype = a0.dtype
        if self.dtype not in WEIGHT_DTYPES:
            raise ValueError(f"the kernel reads bf16 or int8 rank rows, not {self.dtype}")
        if (row_scales is not None) != (self.dtype == torch.int8) or (row_scales and len(row_scales) != len(parts)):
            raise ValueError("int8 rows need their row scales (one pair per target), bf16 rows none")
        for i, (a, bt, scale, y_off) in enumerate(parts):
            if row_scales is not None:
                a_sc, bt_sc = row_scales[i]
                if not (a_sc.dtype == bt_sc.dtype == torch.float32 and a_sc.is_contiguous() and bt_sc.is_contiguous()
                        and a_sc.shape == (a.shape[0],) and bt_sc.shape == (bt.shape[0],)):
                    raise ValueError("row scales must be contiguous fp32, one per row")
            if not (a.dtype == bt.dtype == self.dtype and scale.dtype == torch.float32
                    and a.device.type == bt.device.type == scale.device.type == "cpu"
                    and _rows_contiguous(a) and _rows_contiguous(bt) and scale.is_contiguous()):
                raise ValueError("the kernel reads bf16 or int8 CPU rank rows (one dtype), each row contiguous, and fp32 scales")
            if a.shape != a0.shape or bt.shape[0] != a0.shape[0] or scale.shape != (self.slots,):
                raise ValueError(f"rows disagree: a {tuple(a.shape)}, bt {tuple(bt.shape)}, "
                                 f"scale {tuple(scale.shape)} for {tuple(a0.shape)} and {self.slots} slots")
            if y_off < 0:
                raise ValueError("negative output offset")
            self.width = max(self.width, y_off + bt.shape[1])
        if self.max_rank > MAX_RANK:
            raise ValueError(f"rank {self.max_rank} over the kernel's {MAX_RANK}")
        self._keep = (parts, pages, row_scales)
        self.pages = pages
        scales = row_scales or [(None, None)] * len(parts)
        self._targets = (_Target * len(parts))(*[
            _Target(a.data_ptr(), a.stride(0), bt.data_ptr(), bt.stride(0), scale.data_ptr(), bt.shape[1], y_off,
                    a_sc.data_ptr() if a_sc is not None else None, bt_sc.data_ptr() if bt_sc is not None else None)
            for (a, bt, scale, y_off), (a_sc, bt_sc) in zip(parts, scales)])
        self.count = len(parts)
        self.address = ctypes.addressof(self._targets)


class CpuLoraKernel:
    def __init__(self, lib: ctypes.CDLL):
        i, lg, p = ctypes.c_int, ctypes.c_long, ctypes.c_void_p
        self._decode, self._prompt = {}, {}
        for dtype, suffix in ((torch.bfloat16, "bf16"), (torch.int8, "i8")):
            for table, kind, restype in ((self._decode, "decode", None), (self._prompt, "prompt", ctypes.c_int)):
                fn = getattr(lib, f"loraserve_{kind}_{suffix}")
                fn.argtypes = [i, p, p, i, i, i, p, lg, p, lg, i, p]
                fn.restype = restype
                table[dtype] = fn
        self._set_prompt_path = lib.loraserve_set_prompt_path
        self._set_prompt_path.argtypes = [i]
        self._prompt_path = lib.loraserve_prompt_path
        self._prompt_path.restype = i
        lib.loraserve_prompt_init.restype = i
        self._best_path = lib.loraserve_prompt_init()

    @property
    def prompt_path(self) -> str:
        """The prompt rows' path in words (one of PROMPT_PATHS), for the start-up log and benchmark files."""
        return PROMPT_PATHS[self._prompt_path()]

    @property
    def prompt_bf16(self) -> bool:
        """Whether prompt rows go through bf16 pairs (x and rank values rounded to bf16: AMX or AVX-512 BF16)."""
        return self._prompt_path() > 0

    @property
    def prompt_paths(self) -> tuple[str, ...]:
        """The prompt paths this CPU has, best last (the best serves)."""
        return PROMPT_PATHS[:self._best_path + 1]

    def use_prompt_path(self, path: str) -> None:
        """Tests: serve prompt rows on `path`, one of `prompt_paths` (the best again: the last)."""
        if path not in self.prompt_paths:
            raise ValueError(f"prompt path {path!r} is not one of this CPU's {self.prompt_paths}")
        self._set_prompt_path(PROMPT_PATHS.index(path))

    def decode_function(self, dtype: torch.dtype) -> ctypes._CFuncPtr:
        """The decode call for rows of `dtype`, for the fused step driver (server/model/fused_decode.py)."""
        return self._decode[dtype]

    def prompt_function(self, dtype: torch.dtype) -> ctypes._CFuncPtr:
        """The prompt call for rows of `dtype`, for the fused step driver."""
        return self._prompt[dtype]

    @staticmethod
    def prompt_blocks(segments: LoraSegments, first_row: int) -> torch.Tensor:
        """The prompt kernel's work list for the rows from first_row on: [blocks, 3] int64 of (row, rows,
        slot), up to PROMPT_BLOCK rows of one adapter each, slot 0 left out. Built once per step from the step's
        segments (the runner sorts prompt rows by slot, so they are long)."""
        blocks = [(t, min(PROMPT_BLOCK, e - t), slot)
                  for s, e, slot in zip(segments.starts, segments.ends, segments.slots) if slot and e > first_row
                  for t in range(max(s, first_row), e, PROMPT_BLOCK)]
        return torch.tensor(blocks, dtype=torch.int64).view(-1, 3)

    @staticmethod
    def accepts(y: torch.Tensor, x: torch.Tensor, plan: KernelPlan, rows: int = 0) -> bool:
        """The activations the kernel reads: fp32 CPU rows of unit stride, at least `rows` of them, x as
        wide as the plan's input and y as its outputs side by side."""
        return (x.dtype is _F32 and y.dtype is _F32 and x.is_cpu and y.is_cpu and x.dim() == 2 and y.dim() == 2
                and x.stride(1) == 1 and y.stride(1) == 1 and x.shape[1] == plan.in_features
                and y.shape[1] == plan.width and x.shape[0] >= rows and y.shape[0] >= rows)

    @staticmethod
    def check_slots(slots: torch.Tensor, rank: int, plan: KernelPlan) -> None:
        """Once per step, not per call: the kernel indexes the page table with these unchecked."""
        if slots.dtype != torch.int64 or slots.device.type != "cpu" or not slots.is_contiguous() or slots.dim() != 1:
            raise ValueError("decode slots must be a contiguous 1-D int64 CPU tensor")
        if not 0 < rank <= plan.max_rank:
            raise ValueError(f"rank {rank} outside 1..{plan.max_rank}")
        if slots.numel() and not 0 <= int(slots.min()) <= int(slots.max()) < plan.slots:
            raise ValueError(f"slot out of range for {plan.slots} slots")

    def run(self, y: torch.Tensor, x: torch.Tensor, slots: torch.Tensor, plan: KernelPlan, rank: int) -> None:
        """y[t] += LoRA delta of every target in `plan` for the first len(slots) rows (slot 0 rows
        untouched). Unchecked: slots and rank passed `check_slots` (once per step), and y, x passed
        `accepts` for at least len(slots) rows; the backend checks once per group for both kinds of row."""
        self._decode[plan.dtype](slots.shape[0], slots.data_ptr(), plan.pages.data_ptr(), plan.max_rank, rank, plan.in_features,
                 x.data_ptr(), x.stride(0), y.data_ptr(), y.stride(0), plan.count, plan.address)

    def run_prompt(self, y: torch.Tensor, x: torch.Tensor, blocks: torch.Tensor, plan: KernelPlan, rank: int) -> None:
        """Like `run`, for the prompt rows of `blocks` (from `prompt_blocks`); y, x must have passed
        `accepts` for every row the blocks reach."""
        if self._prompt[plan.dtype](blocks.shape[0], blocks.data_ptr(), plan.pages.data_ptr(), plan.max_rank, rank,
                                    plan.in_features, x.data_ptr(), x.stride(0), y.data_ptr(), y.stride(0),
                                    plan.count, plan.address):
            raise MemoryError("the CPU LoRA prompt kernel could not allocate its workspace")


@functools.lru_cache(maxsize=None)
def load(cache_dir: Path) -> Optional[CpuLoraKernel]:
    """The compiled kernel, built into `cache_dir` on first use (the engine passes its kernel cache);
    None (logged once) when it cannot be had."""
    try:
        kernel = CpuLoraKernel(build_and_load("lora_cpu", _SOURCE, NATIVE_FLAGS, directory=cache_dir))
    except NativeBuildError as e:
        log.warning("CPU LoRA kernel unavailable (%s)", e)
        return None
    log.info("CPU LoRA kernel: built into %s; prompt rows on %s", cache_dir, kernel.prompt_path)
    return kernel
