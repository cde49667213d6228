"""The host-memory tier: validated LoraWeights kept in an LRU under a byte budget.

Keyed by content digest, so versions (or tenants) with identical content share one entry.
Concurrent misses on one digest load it once; the others wait for that load. Loads run
in the caller's thread, which is the engine's loader worker, never its loop thread.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import replace
from typing import Callable, Optional

from server.core.stats import HostCacheStats, added
from server.lora.weights import LoraWeights


class _Pending:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: Optional[LoraWeights] = None
        self.error: Optional[BaseException] = None


class HostCache:
    """LRU of host LoraWeights bounded by `budget_bytes` (an entry larger than it is not kept)."""

    def __init__(self, budget_bytes: int):
        self.budget = max(0, int(budget_bytes))
        self._lock = threading.Lock()
        self._items: "OrderedDict[str, LoraWeights]" = OrderedDict()
        self._pending: dict[str, _Pending] = {}
        self._stats = HostCacheStats(budget_bytes=self.budget)

    def get_or_load(self, key: str, load: Callable[[], LoraWeights]) -> LoraWeights:
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                self._stats = added(self._stats, hits=1)
                return hit
            self._stats = added(self._stats, misses=1)
            pending = self._pending.get(key)
            owner = pending is None
            if owner:
                pending = self._pending[key] = _Pending()
        assert pending is not None
        if not owner:
            pending.done.wait()
            if pending.error is not None:
                raise pending.error
            assert pending.value is not None
            return pending.value
        t0 = time.perf_counter()
        try:
            value = load()
        except BaseException as e:
            with self._lock:
                self._stats = added(self._stats, load_errors=1)
                del self._pending[key]
            pending.error = e
            pending.done.set()
            raise
        with self._lock:
            self._stats = added(self._stats, loads=1, load_seconds=time.perf_counter() - t0)
            del self._pending[key]
            self._insert(key, value)
        pending.value = value
        pending.done.set()
        return value

    def _insert(self, key: str, value: LoraWeights) -> None:
        size = value.nbytes
        if size > self.budget:
            return
        self._items[key] = value
        stats = added(self._stats, bytes=size)
        while stats.bytes > self.budget:
            _, old = self._items.popitem(last=False)
            stats = added(stats, bytes=-old.nbytes, evictions=1)
        self._stats = replace(stats, entries=len(self._items))

    def put(self, key: str, value: LoraWeights) -> None:
        """Warm the tier with weights we already hold (a version just registered)."""
        with self._lock:
            if key not in self._items:
                self._insert(key, value)

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._items

    def discard(self, key: str) -> None:
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._stats = replace(self._stats, bytes=self._stats.bytes - old.nbytes, entries=len(self._items))

    def stats(self) -> HostCacheStats:
        return self._stats  # frozen: every change swaps in a new one
