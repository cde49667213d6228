"""Adapter slots on the compute device: stacked, rank-padded A/B tensors per layer and target.

Slot 0 is the bare base (all zeros, scale 0). Slots 1..N hold adapters keyed by
`AdapterVersion.digest` (a content digest). Lifetimes:
  - a slot is *referenced* by every running sequence that uses it (refcount) and
    by an operator's pin; a referenced slot is never evicted or overwritten.
    The pool is the one owner of pins (keyed by digest, like the slots): the
    registry asks `is_pinned` when it reports or deletes a version;
  - a slot is LOADING while a worker thread reads the adapter and copies it in;
    no sequence can reference it until it is READY, so the copy never races the batch;
  - eviction is LRU over unreferenced READY slots.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Optional

import torch

from server.core.stats import PoolStats, added
from server.core.threads import ShortLivedThreads
from server.core.identity import AdapterVersion
from server.core.errors import AdapterInUseError, AdapterLoadError, AdapterRejectedError, CapacityError
from server.lora import cpu_kernel, ops, torch_ref
from server.lora.segments import LoraSegments
from server.lora.weights import LoraWeights
from server.model.config import TARGETS, ModelConfig
from server.model.llama import target_columns

log = logging.getLogger(__name__)

LOADING, READY = "loading", "ready"


@dataclass
class _Slot:
    key: str
    adapter_id: str
    version: int
    state: str
    rank: int = 0
    refcount: int = 0
    pinned: bool = False
    last_used: float = field(default_factory=time.monotonic)
    nbytes: int = 0
    future: Optional[Future] = None


@dataclass(frozen=True)
class SlotInfo:
    key: str
    adapter_id: str
    version: int
    slot: int
    state: str
    rank: int
    pinned: bool
    refcount: int
    last_used: float


# Targets whose base linears the model fuses (one input x, outputs side by side in this order).
FUSED_GROUPS: tuple[tuple[str, ...], ...] = (("q", "k", "v"), ("gate", "up"))


class AdapterPool:
    def __init__(self, config: ModelConfig, num_slots: int, max_rank: int, device: torch.device,
                 dtype: torch.dtype, loader_threads: int = 1, decode_dtype: torch.dtype = torch.float32):
        if num_slots < 1:
            raise ValueError("need at least one adapter slot")
        self.config, self.num_slots, self.max_rank = config, num_slots, max_rank
        self.device, self.dtype = device, dtype
        n = num_slots + 1
        self.a: list[dict[str, torch.Tensor]] = []
        self.b: list[dict[str, torch.Tensor]] = []
        self.scale: list[dict[str, torch.Tensor]] = []
        for _ in range(config.num_layers):
            a, b, s = {}, {}, {}
            for t in TARGETS:
                out_f, in_f = config.target_shape(t)
                # Slot-major: A as [slots, R, in], B stored transposed as [slots, R, out] and exposed
                # as the kernels' [slots, out, R] view. A slot's rank-sliced A and B^T are then each
                # one contiguous block, which is what the per-slot bmm of a decode step streams
                # (measured on CPU: 10 ms for a SmolLM2 step over 8 rank-16 slots, against 27 ms
                # with the earlier rank-major stacks and their gathers).
                a[t] = torch.zeros((n, max_rank, in_f), dtype=dtype, device=device)
                b[t] = torch.zeros((n, max_rank, out_f), dtype=dtype, device=device).transpose(1, 2)
                s[t] = torch.zeros((n,), dtype=torch.float32, device=device)
            self.a.append(a)
            self.b.append(b)
            self.scale.append(s)
        # bf16 copies the CPU kernels read, decode and prompt rows (server/lora/cpu_kernel.py):
        # A [slots, R, in], B^T [slots, R, out]. (Named before the prompt kernel existed.)
        self.decode_a: list[dict[str, torch.Tensor]] = []
        self.decode_bt: list[dict[str, torch.Tensor]] = []
        if decode_dtype == torch.bfloat16 and device.type == "cpu" and dtype == torch.float32:
            for layer in range(config.num_layers):
                self.decode_a.append({t: torch.zeros_like(self.a[layer][t], dtype=torch.bfloat16) for t in TARGETS})
                self.decode_bt.append({t: torch.zeros(self.b[layer][t].transpose(1, 2).shape, dtype=torch.bfloat16)
                                       for t in TARGETS})
        # The kernel's packed view of each group of targets that share x (plus every target alone),
        # per layer; built now, so the kernel is compiled at start-up, not at the first decode step.
        self.kernel_plans: list[dict[tuple[tuple[str, int], ...], cpu_kernel.KernelPlan]] = []
        if self.decode_a and cpu_kernel.load() is not None:
            for layer in range(config.num_layers):
                plans = {}
                for group in FUSED_GROUPS + tuple((t,) for t in TARGETS):
                    parts, off = [], 0
                    for t in group:
                        parts.append((self.decode_a[layer][t], self.decode_bt[layer][t], self.scale[layer][t], off))
                        off += config.target_shape(t)[0]
                    # Keyed like LoraHook.apply_group's parts, (target, width) in column order.
                    plans[tuple((t, config.target_shape(t)[0]) for t in group)] = cpu_kernel.KernelPlan(parts)
                self.kernel_plans.append(plans)
        self._run_views: dict[tuple[int, int, int], list] = {}  # (lo, m, rank) -> LoraBatch's views
        self._slots: list[Optional[_Slot]] = [None] * n
        self._by_key: dict[str, int] = {}
        self._failed: dict[str, BaseException] = {}
        self._lock = threading.RLock()
        self._executor = ShortLivedThreads(loader_threads, "lora-load")
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._stats = PoolStats(slots_total=num_slots)  # counters; slots_ready is filled in by stats()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in (self.a + self.b + self.decode_a + self.decode_bt)
                   for t in layer.values())

    # ---- used by the engine thread -------------------------------------------------------------
    def acquire(self, spec: AdapterVersion) -> Optional[int]:
        """Reference a READY slot holding `spec` for one sequence, starting a load if needed.

        Returns None while the adapter is loading or no slot can be freed yet; raises
        AdapterLoadError if its load failed (once per failure, to every caller that asks).
        """
        with self._lock:
            err = self._failed.get(spec.digest)
            if err is not None:
                raise AdapterLoadError(f"adapter {spec.name!r} (version {spec.version}) could not be "
                                       f"loaded: {err}") from err
            idx = self._by_key.get(spec.digest)
            if idx is not None:
                slot = self._slots[idx]
                assert slot is not None
                if slot.state != READY:
                    return None
                slot.refcount += 1
                slot.last_used = time.monotonic()
                self._stats = added(self._stats, hits=1)
                return idx
            self._stats = added(self._stats, misses=1)
            self._start_load(spec)
            return None

    def release(self, idx: int) -> None:
        if idx == 0:
            return
        with self._lock:
            slot = self._slots[idx]
            if slot is not None and slot.refcount > 0:
                slot.refcount -= 1
                slot.last_used = time.monotonic()

    def clear_failure(self, key: str) -> None:
        """Forget a failed load so a later request may try again."""
        with self._lock:
            self._failed.pop(key, None)

    def rank_of(self, idx: int) -> int:
        slot = self._slots[idx]
        return 0 if slot is None else slot.rank

    def run_views(self, lo: int, m: int, rank: int) -> list[dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
        """Per layer and target, `torch_ref.run_views` of slots lo..lo+m-1 at `rank`; cached (views
        of the stacks, so loads into those slots show through)."""
        key = (lo, m, rank)
        views = self._run_views.get(key)
        if views is None:
            if len(self._run_views) >= 64:
                self._run_views.clear()
            views = [{t: torch_ref.run_views(self.a[i][t][:, :rank], self.b[i][t][:, :, :rank],
                                             self.scale[i][t], lo, m) for t in TARGETS}
                     for i in range(self.config.num_layers)]
            self._run_views[key] = views
        return views

    def batch(self, token_slots: list[int], decode_rows: int = 0) -> "LoraBatch":
        """The LoRA view of a step; its first `decode_rows` rows are decode tokens (the runner puts them first)."""
        segs = LoraSegments.from_token_slots(token_slots, self.device)
        rank = max((self.rank_of(s) for s in set(token_slots) if s), default=0)
        return LoraBatch(self, segs, rank, token_slots, decode_rows)

    # ---- used by operators (admin API) ---------------------------------------------------------
    def load(self, spec: AdapterVersion, pin: bool = False, timeout: Optional[float] = None) -> int:
        """Bring an adapter onto the device now (blocking) and optionally pin it there."""
        with self._lock:
            self._failed.pop(spec.digest, None)
            if spec.digest not in self._by_key:
                self._start_load(spec)
            idx = self._by_key.get(spec.digest)
            fut = self._slots[idx].future if idx is not None and self._slots[idx] else None
        if idx is None:
            raise CapacityError("every adapter slot is in use or pinned; unpin or unload one first")
        if fut is not None:
            fut.result(timeout=timeout)
        with self._lock:
            err = self._failed.pop(spec.digest, None)
            if err is not None:
                raise AdapterLoadError(f"adapter {spec.name!r} could not be loaded: {err}") from err
            slot = self._slots[idx]
            assert slot is not None and slot.key == spec.digest
            if pin:
                slot.pinned = True
            slot.last_used = time.monotonic()
            return idx

    def unpin(self, key: str) -> None:
        with self._lock:
            idx = self._by_key.get(key)
            if idx is not None and self._slots[idx] is not None:
                self._slots[idx].pinned = False

    def is_pinned(self, key: str) -> bool:
        """Whether an operator pinned the adapter with this digest (what `GetAdapter` shows, what blocks a delete)."""
        with self._lock:
            idx = self._by_key.get(key)
            slot = self._slots[idx] if idx is not None else None
            return slot is not None and slot.pinned

    def unload(self, key: str) -> bool:
        """Free the slot holding `key`; refuses while running sequences use it."""
        with self._lock:
            idx = self._by_key.get(key)
            if idx is None:
                return False
            slot = self._slots[idx]
            assert slot is not None
            if slot.refcount > 0 or slot.state != READY:
                raise AdapterInUseError(f"adapter {slot.adapter_id!r} is in use by {slot.refcount} running "
                                        "request(s); retry when they finish")
            self._free(idx)
            return True

    def resident(self) -> list[SlotInfo]:
        with self._lock:
            return [SlotInfo(s.key, s.adapter_id, s.version, i, s.state, s.rank, s.pinned, s.refcount, s.last_used)
                    for i, s in enumerate(self._slots) if s is not None]

    def stats(self) -> PoolStats:
        with self._lock:
            ready = sum(1 for s in self._slots[1:] if s is not None and s.state == READY)
            return replace(self._stats, slots_ready=ready)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ---- internals -----------------------------------------------------------------------------
    def _start_load(self, spec: AdapterVersion) -> None:
        idx = self._free_slot()
        if idx is None:
            if all(s is not None and s.pinned for s in self._slots[1:]):
                raise CapacityError("every adapter slot is pinned by an operator; unpin one to serve "
                                    f"adapter {spec.name!r}")
            return  # all slots referenced by running sequences: retry next step
        slot = _Slot(spec.digest, spec.name, spec.version, LOADING)
        self._slots[idx] = slot
        self._by_key[spec.digest] = idx
        slot.future = self._executor.submit(self._load_into, idx, spec)

    def _free_slot(self) -> Optional[int]:
        for i in range(1, len(self._slots)):
            if self._slots[i] is None:
                return i
        victims = [(s.last_used, i) for i, s in enumerate(self._slots)
                   if i and s is not None and s.state == READY and s.refcount == 0 and not s.pinned]
        if not victims:
            return None
        _, i = min(victims)
        self._free(i)
        self._stats = added(self._stats, evictions=1)
        return i

    def _free(self, idx: int) -> None:
        slot = self._slots[idx]
        if slot is not None:
            self._by_key.pop(slot.key, None)
        self._slots[idx] = None

    def _load_into(self, idx: int, spec: AdapterVersion) -> None:
        t0 = time.perf_counter()
        try:
            weights = spec.load()
            if weights.rank > self.max_rank:
                raise AdapterRejectedError(f"rank {weights.rank} exceeds the server's max rank {self.max_rank}")
            self._copy(idx, weights)
        except BaseException as e:  # noqa: BLE001 (every failure must reach the waiting requests)
            log.warning("loading adapter %s (version %s) failed: %s", spec.name, spec.version, e)
            with self._lock:
                self._failed[spec.digest] = e
                self._stats = added(self._stats, load_failures=1)
                if self._by_key.get(spec.digest) == idx:
                    self._free(idx)
            return
        with self._lock:
            slot = self._slots[idx]
            if slot is not None and slot.key == spec.digest:
                slot.state, slot.rank, slot.nbytes = READY, weights.rank, weights.nbytes
                slot.last_used = time.monotonic()
            self._stats = added(self._stats, loads=1, load_seconds=time.perf_counter() - t0)
        log.info("adapter %s v%s loaded into slot %d in %.3fs", spec.name, spec.version, idx,
                 time.perf_counter() - t0)

    def _copy(self, idx: int, w: LoraWeights) -> None:
        """Write one adapter into slot `idx`: zero it, then copy each module's A/B, zero-padded."""
        stream_ctx = torch.cuda.stream(self._copy_stream) if self._copy_stream is not None else _null_ctx()
        with stream_ctx:
            for layer in range(self.config.num_layers):
                for t in TARGETS:
                    self.a[layer][t][idx].zero_()
                    self.b[layer][t][idx].zero_()
                    if self.decode_a:
                        self.decode_a[layer][t][idx].zero_()
                        self.decode_bt[layer][t][idx].zero_()
                    self.scale[layer][t][idx] = 0.0
                    m = w.modules.get((layer, t))
                    if m is None:
                        continue
                    r = m.rank
                    src_a = m.a.pin_memory() if self._copy_stream is not None else m.a
                    src_b = m.b.pin_memory() if self._copy_stream is not None else m.b
                    self.a[layer][t][idx, :r].copy_(src_a, non_blocking=True)
                    self.b[layer][t][idx, :, :r].copy_(src_b, non_blocking=True)
                    self.scale[layer][t][idx] = m.scale
                    if self.decode_a:
                        self.decode_a[layer][t][idx, :r].copy_(src_a)
                        self.decode_bt[layer][t][idx, :r].copy_(src_b.t())
        if self._copy_stream is not None:
            self._copy_stream.synchronize()


class _null_ctx:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class LoraBatch:
    """The LoRA view of one step: segments plus the pool's stacks, sliced to the batch's max rank.

    On CPU with bf16 copies (where the base is quantized), every row goes through the C kernels
    (`cpu_kernel.py`): decode rows (first in the batch) one token at a time, prompt rows in blocks
    of up to 4 tokens of one adapter; one call of each per group of targets that read the same x
    (q/k/v and gate/up of the fused projections) on plans the pool packed at start-up. A token's
    LoRA arithmetic depends on its kind (decode or prompt), never on the rest of its batch. Otherwise,
    when the torch reference serves a step whose
    adapter tokens form a contiguous run (`torch_ref.contiguous_run`: every decode step of
    distinct adapters), each linear takes four ops on weight views the pool prepared for that
    (slots, rank) once: on the 2-core CPU the per-linear Python and slicing overhead was worth
    as much as the LoRA math itself.
    """

    def __init__(self, pool: AdapterPool, segments: LoraSegments, rank: int,
                 token_slots: Optional[list[int]] = None, decode_rows: int = 0):
        self.pool, self.segments, self.rank = pool, segments, rank
        self._run = None
        self._views: Optional[list[dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]] = None
        self._kernel = cpu_kernel.load() if rank and pool.kernel_plans and token_slots is not None else None
        if self._kernel is not None:
            any_plan = next(iter(pool.kernel_plans[0].values()))
            self._decode_slots = torch.tensor(token_slots[:decode_rows], dtype=torch.int64)
            self._kernel.check_slots(self._decode_slots, rank, any_plan)
            self._prompt_blocks = self._kernel.prompt_blocks(segments, decode_rows)
            self._kernel.check_slots(self._prompt_blocks[:, 2].contiguous(), rank, any_plan)
            self._rows = segments.num_tokens
            return
        if rank and ops.backend_for(pool.device) == "torch":
            self._run = torch_ref.contiguous_run(segments)
            if self._run is not None:
                self._views = pool.run_views(self._run[1], self._run[2], rank)

    def apply(self, y: torch.Tensor, x: torch.Tensor, layer: int, target: str) -> torch.Tensor:
        return self.apply_group(y, x, layer, ((target, y.shape[1]),))

    def apply_group(self, y: torch.Tensor, x: torch.Tensor, layer: int,
                    parts: tuple[tuple[str, int], ...]) -> torch.Tensor:
        """y holds the outputs of targets that all read x, side by side: (target, width) in column order."""
        if self.rank == 0:
            return y
        if self._kernel is not None:
            plan = self.pool.kernel_plans[layer].get(parts)  # None for a grouping or width it has no plan for
            kernel = self._kernel
            if plan is not None and kernel.accepts(y, x, plan, self._rows):  # checked once for both kinds of row
                if self._decode_slots.shape[0]:
                    kernel.run(y, x, self._decode_slots, plan, self.rank)
                if self._prompt_blocks.shape[0]:
                    kernel.run_prompt(y, x, self._prompt_blocks, plan, self.rank)
                return y
        for t, cols in target_columns(y, parts):
            self._apply_torch(cols, x, layer, t)
        return y

    def _apply_torch(self, y: torch.Tensor, x: torch.Tensor, layer: int, target: str) -> torch.Tensor:
        if self._views is not None:
            return torch_ref.apply_run(y, x, *self._views[layer][target], self._run)
        r = self.rank
        return ops.apply_lora(y, x, self.pool.a[layer][target][:, :r], self.pool.b[layer][target][:, :, :r],
                              self.pool.scale[layer][target], self.segments)
