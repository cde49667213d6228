"""Adapters on the compute device: which adapter is in which slot, and which rank rows of adapter memory hold it.

The pool allocates, loads, pins and evicts adapters and owns the rank rows and their page table
(`server/lora/stacks.py`); how a step multiplies by them is its LoRA backend's business
(`server/lora/backend.py`). Adapter memory is a budget of rank rows (`--adapter-memory`): an adapter of
rank r takes r rows, so eight rank-8 adapters fit where two rank-32 ones do. A slot is only a name for a
resident adapter (its page-table row and scales); there are as many slots as rows can be shared out, or
`--max-adapters-on-device` when that caps them. Slot 0 is the bare base (no rows, scale 0). Slots 1..N
hold adapters keyed by `AdapterVersion.digest` (a content digest). Lifetimes:
  - a request for an adapter that is not resident is a *miss*, counted once per load it waits for: the
    adapter is read (`AdapterVersion.load`, on a worker thread) and, once its rank is known, given a slot
    and rows, evicting least-recently-used adapters as needed; while none can be freed (every candidate
    is referenced) it waits with its weights read, and the next acquire tries again;
  - a slot is *referenced* by every running sequence that uses it (refcount) and by an operator's pin; a
    referenced adapter is never evicted or overwritten. The pool is the one owner of pins (keyed by
    digest, like the slots): the registry asks `is_pinned` when it reports or deletes a version;
  - a slot is LOADING while a worker thread copies its rows in; no sequence can reference it until it is
    READY, so the copy never races the batch;
  - eviction is LRU over unreferenced READY adapters and frees their rows; an adapter loaded for requests
    that have not taken it yet is spared for a while (`AWAITED_GRACE_S`), so loads are not undone unused.
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
from server.lora.rows import RowAllocator
from server.lora.stacks import RowStacks
from server.lora.weights import LoraWeights
from server.model.config import TARGETS, ModelConfig

log = logging.getLogger(__name__)

LOADING, READY = "loading", "ready"
# An adapter loaded because requests missed it is not evicted before one of them has taken it, for up to this
# long: the loader places adapters far faster than the engine steps, and evicting each one for the next before
# its requests ran would load adapters for nobody (measured: 119 loads for 28 adapters through 8 slots).
AWAITED_GRACE_S = 10.0


@dataclass
class _Pending:
    """An adapter asked for but not placed yet: being read, or read (`weights`) and waiting for rows."""

    spec: AdapterVersion
    future: Optional[Future] = None
    weights: Optional[LoraWeights] = None
    read_seconds: float = 0.0
    awaited: bool = False  # a request missed it (not only an operator's load)


@dataclass
class _Slot:
    key: str
    adapter_id: str
    version: int
    state: str
    rank: int = 0
    rows: list[int] = field(default_factory=list)
    refcount: int = 0
    pinned: bool = False
    last_used: float = field(default_factory=time.monotonic)
    nbytes: int = 0
    future: Optional[Future] = None
    awaited_since: Optional[float] = None  # READY for requests that have not taken it yet (see AWAITED_GRACE_S)


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
                 dtype: torch.dtype, loader_threads: int = 1, kernel_copies: Optional[torch.dtype] = None,
                 num_rows: Optional[int] = None):
        """`num_slots` adapters at most, in `num_rows` rank rows (default: room for `num_slots` adapters of
        `max_rank`, the fixed slots of old). `kernel_copies` (bf16 or int8): keep CPU copies of the rows in that
        dtype beside them, for the CPU kernel backend (server/lora/cpu_backend.py), which asks for them; every
        load writes both."""
        num_rows = num_slots * max_rank if num_rows is None else num_rows
        if num_slots < 1:
            raise ValueError("need at least one adapter slot")
        if num_rows < max_rank:
            raise ValueError(f"{num_rows} rank rows cannot hold an adapter of the max rank {max_rank}")
        if kernel_copies is not None and device.type != "cpu":
            raise ValueError("kernel copies are for the CPU kernel: the pool must be on the CPU")
        self.config, self.num_slots, self.max_rank, self.num_rows = config, num_slots, max_rank, num_rows
        self.device, self.dtype = device, dtype
        n = num_slots + 1
        self.pages = torch.zeros((n, max_rank), dtype=torch.int32, device=device)
        self.stacks = RowStacks(config, num_rows + 1, self.pages, dtype, device)
        self.kernel_stacks = (RowStacks(config, num_rows + 1, self.pages, kernel_copies, "cpu")
                              if kernel_copies is not None else None)
        self._rows = RowAllocator(num_rows)
        self._slots: list[Optional[_Slot]] = [None] * n
        self._by_key: dict[str, int] = {}
        self._pending: dict[str, _Pending] = {}
        self._failed: dict[str, BaseException] = {}
        self._lock = threading.RLock()
        self._executor = ShortLivedThreads(loader_threads, "lora-load")
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._stats = PoolStats(slots_total=num_slots, rows_total=num_rows)  # slots_ready, rows_used: stats()

    @property
    def nbytes(self) -> int:
        return self.stacks.nbytes + (self.kernel_stacks.nbytes if self.kernel_stacks is not None else 0)

    @property
    def sure_capacity(self) -> int:
        """Adapters the pool holds at once whatever their ranks (all at --max-rank); smaller ranks fit more."""
        return min(self.num_slots, self.num_rows // self.max_rank)

    # ---- used by the engine thread -------------------------------------------------------------
    def acquire(self, spec: AdapterVersion) -> Optional[int]:
        """Reference a READY slot holding `spec` for one sequence, starting a load if needed.

        Returns None while the adapter is being read or copied or waits for rows; raises
        AdapterLoadError if its load failed (once per failure, to every caller that asks), and
        CapacityError when adapters pinned by an operator leave too little memory for it.
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
                slot.awaited_since = None
                self._stats = added(self._stats, hits=1)
                return idx
            pending = self._pending.get(spec.digest)
            if pending is None:
                self._stats = added(self._stats, misses=1)  # once per load waited for, not per step
                pending = self._read(spec)
            pending.awaited = True
            if pending.weights is not None:
                self._place_and_copy(pending)
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

    def rows_of(self, idx: int) -> list[int]:
        """The rank rows of the adapter in slot `idx`, rank 0 first (what its page-table row names)."""
        slot = self._slots[idx]
        return [] if slot is None else slot.rows

    # ---- used by operators (admin API) ---------------------------------------------------------
    def load(self, spec: AdapterVersion, pin: bool = False, timeout: Optional[float] = None) -> int:
        """Bring an adapter onto the device now (blocking) and optionally pin it there."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            self._failed.pop(spec.digest, None)
            if spec.digest not in self._by_key and spec.digest not in self._pending:
                self._read(spec)
        while True:
            with self._lock:
                idx = self._by_key.get(spec.digest)
                pending = self._pending.get(spec.digest)
                if idx is not None:
                    slot = self._slots[idx]
                    assert slot is not None
                    fut = slot.future if slot.state != READY else None
                    if fut is None:
                        if pin:
                            slot.pinned = True
                        slot.last_used = time.monotonic()
                        return idx
                elif pending is not None and pending.weights is not None:
                    if self._place_and_copy(pending) is None:
                        raise CapacityError("adapter memory is held by running requests or pinned adapters; "
                                            "unpin or unload one first")
                    continue
                elif pending is not None:
                    fut = pending.future
                else:
                    err = self._failed.pop(spec.digest, None)
                    if err is not None:
                        raise AdapterLoadError(f"adapter {spec.name!r} could not be loaded: {err}") from err
                    raise AdapterLoadError(f"adapter {spec.name!r} was unloaded while it loaded")
            assert fut is not None
            fut.result(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))

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
        """Free the slot and rows holding `key`; refuses while running sequences use it or it loads."""
        with self._lock:
            idx = self._by_key.get(key)
            if idx is None:
                if key in self._pending:
                    raise AdapterInUseError("the adapter is loading for waiting requests; retry when they run")
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
            in_use = sum(1 for s in self._slots[1:] if s is not None and s.refcount)
            return replace(self._stats, slots_ready=ready, slots_in_use=in_use, rows_used=self._rows.num_used)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ---- internals (under self._lock unless said otherwise) -----------------------------------
    def _read(self, spec: AdapterVersion) -> _Pending:
        pending = _Pending(spec)
        self._pending[spec.digest] = pending
        pending.future = self._executor.submit(self._read_and_copy, pending)
        return pending

    def _place_and_copy(self, pending: _Pending) -> Optional[int]:
        """Place a read adapter and start copying it in (on a worker); None while no room can be made."""
        idx = self._place(pending, strict=True)
        if idx is not None:
            slot = self._slots[idx]
            assert slot is not None and pending.weights is not None
            slot.future = self._executor.submit(self._copy_in, idx, pending.weights, pending.read_seconds)
        return idx

    def _place(self, pending: _Pending, strict: bool) -> Optional[int]:
        """Give a read adapter a slot and its rows, evicting LRU adapters if that makes room; None when it cannot
        yet (referenced adapters hold the memory). `strict`: raise CapacityError, and forget the adapter, when
        only an operator's unpin could make room."""
        weights, spec = pending.weights, pending.spec
        assert weights is not None
        need = max(weights.rank, 1)
        victims = self._victims(need)
        if victims is None:
            if strict and self._blocked_by_pins(need):
                del self._pending[spec.digest]
                raise CapacityError(f"adapters pinned by an operator leave no room for adapter {spec.name!r} "
                                    f"(rank {weights.rank}); unpin one to serve it")
            return None
        for v in victims:
            self._free(v)
        self._stats = added(self._stats, evictions=len(victims))
        idx = next(i for i in range(1, len(self._slots)) if self._slots[i] is None)
        rows = self._rows.allocate(need)
        assert rows is not None
        self._slots[idx] = _Slot(spec.digest, spec.name, spec.version, LOADING, rank=weights.rank, rows=rows,
                                 nbytes=weights.nbytes, future=pending.future,
                                 awaited_since=time.monotonic() if pending.awaited else None)
        self._by_key[spec.digest] = idx
        del self._pending[spec.digest]
        return idx

    def _victims(self, need: int) -> Optional[list[int]]:
        """The fewest least-recently-used evictable slots that leave a free slot and `need` free rows; None if
        even evicting every unreferenced adapter would not."""
        has_slot = any(s is None for s in self._slots[1:])
        free = self._rows.num_free
        if has_slot and free >= need:
            return []
        chosen = []
        fresh = time.monotonic() - AWAITED_GRACE_S
        for _, i in sorted((s.last_used, i) for i, s in enumerate(self._slots)
                           if i and s is not None and s.state == READY and s.refcount == 0 and not s.pinned
                           and (s.awaited_since is None or s.awaited_since < fresh)):
            slot = self._slots[i]
            assert slot is not None
            chosen.append(i)
            has_slot, free = True, free + len(slot.rows)
            if free >= need:
                return chosen
        return None

    def _blocked_by_pins(self, need: int) -> bool:
        pinned = [s for s in self._slots[1:] if s is not None and s.pinned]
        return len(pinned) == self.num_slots or self.num_rows - sum(len(s.rows) for s in pinned) < need

    def _free(self, idx: int) -> None:
        slot = self._slots[idx]
        if slot is not None:
            self._by_key.pop(slot.key, None)
            self._rows.free(slot.rows)
        self._slots[idx] = None
        # Nothing reads an unreferenced slot; this keeps its page-table row honest. On the copy stream, where the
        # next load of this slot writes the row: on the caller's stream it could land after that write.
        with self._on_copy_stream():
            self.pages[idx].zero_()

    def _on_copy_stream(self) -> contextlib.AbstractContextManager:
        """Where every write to the slot stacks and page table goes: the copy stream on CUDA, in order."""
        return torch.cuda.stream(self._copy_stream) if self._copy_stream is not None else contextlib.nullcontext()

    def _fail(self, digest: str, err: BaseException) -> None:
        self._failed[digest] = err
        self._stats = added(self._stats, load_failures=1)

    # ---- worker threads --------------------------------------------------------------------------
    def _read_and_copy(self, pending: _Pending) -> None:
        """Read the adapter; place it and copy it in at once when there is room, else leave it waiting for rows."""
        spec, t0 = pending.spec, time.perf_counter()
        try:
            weights = spec.load()
            if weights.rank > self.max_rank:
                raise AdapterRejectedError(f"rank {weights.rank} exceeds the server's max rank {self.max_rank}")
        except BaseException as e:  # noqa: BLE001 (every failure must reach the waiting requests)
            log.warning("loading adapter %s (version %s) failed: %s", spec.name, spec.version, e)
            with self._lock:
                if self._pending.get(spec.digest) is pending:
                    del self._pending[spec.digest]
                    self._fail(spec.digest, e)
            return
        with self._lock:
            if self._pending.get(spec.digest) is not pending:
                return
            pending.weights, pending.read_seconds = weights, time.perf_counter() - t0
            idx = self._place(pending, strict=False)
        if idx is not None:
            self._copy_in(idx, weights, pending.read_seconds)

    def _copy_in(self, idx: int, weights: LoraWeights, read_seconds: float) -> None:
        t0 = time.perf_counter()
        with self._lock:
            slot = self._slots[idx]
            assert slot is not None
            key, rows = slot.key, slot.rows
        try:
            self._copy(idx, rows, weights)
        except BaseException as e:  # noqa: BLE001
            log.warning("copying adapter %s into slot %d failed: %s", slot.adapter_id, idx, e)
            with self._lock:
                if self._by_key.get(key) == idx:
                    self._free(idx)
                self._fail(key, e)
            return
        with self._lock:
            if self._by_key.get(key) == idx:
                slot.state = READY
                slot.last_used = time.monotonic()
                if slot.awaited_since is not None:
                    slot.awaited_since = slot.last_used
            seconds = read_seconds + time.perf_counter() - t0
            self._stats = added(self._stats, loads=1, load_seconds=seconds)
        log.info("adapter %s v%s (rank %d) loaded into slot %d in %.3fs", slot.adapter_id, slot.version,
                 weights.rank, idx, seconds)

    def _copy(self, idx: int, rows: list[int], w: LoraWeights) -> None:
        """Write one adapter into its rows of every stack and its page-table row. The device stacks take it in
        a few bulk operations (`RowStacks.write_adapter`: one host buffer in their dtype, one copy, one
        multi-tensor scatter); on CUDA on a side stream from pinned memory, so a load never waits behind a step
        and a step never waits behind a load. The CPU kernels' int8 copies quantize row by row as before."""
        pinned = self._copy_stream is not None
        page_row = torch.zeros(self.max_rank, dtype=torch.int32)
        page_row[:len(rows)] = torch.tensor(rows, dtype=torch.int32)
        with self._on_copy_stream():
            self.stacks.write_adapter(idx, rows, w.modules, pinned=pinned)
            if self.kernel_stacks is not None:
                self.kernel_stacks.clear(idx, rows)
                for layer in range(self.config.num_layers):
                    for t in TARGETS:
                        m = w.modules.get((layer, t))
                        if m is not None:
                            self.kernel_stacks.write(idx, rows, layer, t, m.a, m.b, m.scale)
            self.pages[idx].copy_(page_row)
        if self._copy_stream is not None:
            self._copy_stream.synchronize()
