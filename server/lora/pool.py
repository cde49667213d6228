"""Adapter slots on the compute device: which adapter is in which slot, and its weights in the slot stacks.

The pool allocates, loads, pins and evicts slots and owns the stacked weight tensors
(`server/lora/stacks.py`); how a step multiplies by them is its LoRA backend's business
(`server/lora/backend.py`). Slot 0 is the bare base (all zeros, scale 0). Slots 1..N hold
adapters keyed by `AdapterVersion.digest` (a content digest). Lifetimes:
  - a slot is *referenced* by every running sequence that uses it (refcount) and
    by an operator's pin; a referenced slot is never evicted or overwritten.
    The pool is the one owner of pins (keyed by digest, like the slots): the
    registry asks `is_pinned` when it reports or deletes a version;
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
from dataclasses import dataclass, field, replace
from typing import Optional

import torch

from server.core.stats import PoolStats, added
from server.core.threads import ShortLivedThreads
from server.core.identity import AdapterVersion
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
        self._stats = PoolStats(slots_total=num_slots)  # counters; slots_ready is filled in by stats()

    @property
    def nbytes(self) -> int:
        return self.stacks.nbytes + (self.bf16_stacks.nbytes if self.bf16_stacks is not None else 0)

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

    def max_rank_of(self, slots: list[int]) -> int:
        """The largest adapter rank among these slots (0 when none holds an adapter): a step's rank."""
        return max((self.rank_of(s) for s in set(slots) if s), default=0)

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
