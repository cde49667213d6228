"""Adapter slots on the compute device: which adapter is in which slot, and its weights in the slot stacks.

The pool allocates, loads, pins and evicts slots and owns the stacked weight tensors
(`server/lora/stacks.py`); how a step multiplies by them is its LoRA backend's business
(`server/lora/backend.py`). Slot 0 is the bare base (all zeros, scale 0). Slots 1..N hold
adapters keyed by `AdapterSpec.key` (a content digest). Lifetimes:
  - a slot is *referenced* by every running sequence that uses it (refcount) and
    by an operator's pin; a referenced slot is never evicted or overwritten;
  - a slot is LOADING while a worker thread reads the adapter and copies it in;
    no sequence can reference it until it is READY, so the copy never races the batch;
  - eviction is LRU over unreferenced READY slots.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Optional

import torch

from server.core.threads import ShortLivedThreads
from server.core.identity import AdapterSpec
from server.core.errors import AdapterInUseError, AdapterLoadError, AdapterRejectedError, CapacityError
from server.lora.stacks import SlotStacks
from server.lora.weights import LoraWeights
from server.model.config import TARGETS, ModelConfig

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


@dataclass
class PoolStats:
    slots_total: int = 0
    slots_used: int = 0
    loads: int = 0
    load_failures: int = 0
    evictions: int = 0
    hits: int = 0
    misses: int = 0
    load_seconds_total: float = 0.0


class AdapterPool:
    def __init__(self, config: ModelConfig, num_slots: int, max_rank: int, device: torch.device,
                 dtype: torch.dtype, loader_threads: int = 1, bf16_copies: bool = False):
        """`bf16_copies`: keep a bf16 CPU copy of the stacks beside them, for the CPU kernel backend
        (server/lora/cpu_backend.py), which asks for it; every load writes both."""
        if num_slots < 1:
            raise ValueError("need at least one adapter slot")
        self.config, self.num_slots, self.max_rank = config, num_slots, max_rank
        self.device, self.dtype = device, dtype
        n = num_slots + 1
        self.stacks = SlotStacks(config, n, max_rank, dtype, device)
        self.bf16_stacks = SlotStacks(config, n, max_rank, torch.bfloat16, "cpu") if bf16_copies else None
        self._slots: list[Optional[_Slot]] = [None] * n
        self._by_key: dict[str, int] = {}
        self._failed: dict[str, BaseException] = {}
        self._lock = threading.RLock()
        self._executor = ShortLivedThreads(loader_threads, "lora-load")
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.stats = PoolStats(slots_total=num_slots)

    @property
    def nbytes(self) -> int:
        return self.stacks.nbytes + (self.bf16_stacks.nbytes if self.bf16_stacks is not None else 0)

    # ---- used by the engine thread -------------------------------------------------------------
    def acquire(self, spec: AdapterSpec) -> Optional[int]:
        """Reference a READY slot holding `spec` for one sequence, starting a load if needed.

        Returns None while the adapter is loading or no slot can be freed yet; raises
        AdapterLoadError if its load failed (once per failure, to every caller that asks).
        """
        with self._lock:
            err = self._failed.get(spec.key)
            if err is not None:
                raise AdapterLoadError(f"adapter {spec.adapter_id!r} (version {spec.version}) could not be "
                                       f"loaded: {err}") from err
            idx = self._by_key.get(spec.key)
            if idx is not None:
                slot = self._slots[idx]
                assert slot is not None
                if slot.state != READY:
                    return None
                slot.refcount += 1
                slot.last_used = time.monotonic()
                self.stats.hits += 1
                return idx
            self.stats.misses += 1
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

    def max_rank_of(self, slots: list[int]) -> int:
        """The largest adapter rank among these slots (0 when none holds an adapter): a step's rank."""
        return max((self.rank_of(s) for s in set(slots) if s), default=0)

    # ---- used by operators (admin API) ---------------------------------------------------------
    def load(self, spec: AdapterSpec, pin: bool = False, timeout: Optional[float] = None) -> int:
        """Bring an adapter onto the device now (blocking) and optionally pin it there."""
        with self._lock:
            self._failed.pop(spec.key, None)
            if spec.key not in self._by_key:
                self._start_load(spec)
            idx = self._by_key.get(spec.key)
            fut = self._slots[idx].future if idx is not None and self._slots[idx] else None
        if idx is None:
            raise CapacityError("every adapter slot is in use or pinned; unpin or unload one first")
        if fut is not None:
            fut.result(timeout=timeout)
        with self._lock:
            err = self._failed.pop(spec.key, None)
            if err is not None:
                raise AdapterLoadError(f"adapter {spec.adapter_id!r} could not be loaded: {err}") from err
            slot = self._slots[idx]
            assert slot is not None and slot.key == spec.key
            if pin:
                slot.pinned = True
            slot.last_used = time.monotonic()
            return idx

    def unpin(self, key: str) -> None:
        with self._lock:
            idx = self._by_key.get(key)
            if idx is not None and self._slots[idx] is not None:
                self._slots[idx].pinned = False

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

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ---- internals -----------------------------------------------------------------------------
    def _start_load(self, spec: AdapterSpec) -> None:
        idx = self._free_slot()
        if idx is None:
            if all(s is not None and s.pinned for s in self._slots[1:]):
                raise CapacityError("every adapter slot is pinned by an operator; unpin one to serve "
                                    f"adapter {spec.adapter_id!r}")
            return  # all slots referenced by running sequences: retry next step
        slot = _Slot(spec.key, spec.adapter_id, spec.version, LOADING)
        self._slots[idx] = slot
        self._by_key[spec.key] = idx
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
        self.stats.evictions += 1
        return i

    def _free(self, idx: int) -> None:
        slot = self._slots[idx]
        if slot is not None:
            self._by_key.pop(slot.key, None)
        self._slots[idx] = None

    def _load_into(self, idx: int, spec: AdapterSpec) -> None:
        t0 = time.perf_counter()
        try:
            weights = spec.load()
            if weights.rank > self.max_rank:
                raise AdapterRejectedError(f"rank {weights.rank} exceeds the server's max rank {self.max_rank}")
            self._copy(idx, weights)
        except BaseException as e:  # noqa: BLE001 (every failure must reach the waiting requests)
            log.warning("loading adapter %s (version %s) failed: %s", spec.adapter_id, spec.version, e)
            with self._lock:
                self._failed[spec.key] = e
                self.stats.load_failures += 1
                if self._by_key.get(spec.key) == idx:
                    self._free(idx)
            return
        with self._lock:
            slot = self._slots[idx]
            if slot is not None and slot.key == spec.key:
                slot.state, slot.rank, slot.nbytes = READY, weights.rank, weights.nbytes
                slot.last_used = time.monotonic()
            self.stats.loads += 1
            self.stats.load_seconds_total += time.perf_counter() - t0
        log.info("adapter %s v%s loaded into slot %d in %.3fs", spec.adapter_id, spec.version, idx,
                 time.perf_counter() - t0)

    def _copy(self, idx: int, w: LoraWeights) -> None:
        """Write one adapter into slot `idx` of every stack: zero it, then copy each module's A/B, zero-padded.
        On CUDA the copies run on a side stream from pinned memory, so they never wait behind a step."""
        copies = [s for s in (self.stacks, self.bf16_stacks) if s is not None]
        pinned = self._copy_stream is not None
        with torch.cuda.stream(self._copy_stream) if pinned else contextlib.nullcontext():
            for stacks in copies:
                stacks.clear(idx)
            for layer in range(self.config.num_layers):
                for t in TARGETS:
                    m = w.modules.get((layer, t))
                    if m is None:
                        continue
                    a, b = (m.a.pin_memory(), m.b.pin_memory()) if pinned else (m.a, m.b)
                    for stacks in copies:
                        stacks.write(idx, layer, t, a, b, m.scale, non_blocking=pinned)
        if self._copy_stream is not None:
            self._copy_stream.synchronize()
