"""Typed snapshots of serving state, for `server/metrics.py` and anyone else who reads them.

Each layer produces its own: the adapter pool `PoolStats`, the engine `EngineStats` (which holds
the pool's), the registry `RegistryStats` (which holds the host tier's `HostCacheStats` and, for an
index shared by a fleet, `SharedIndexStats` with its `ResolveCacheStats`). They are
frozen: a producer keeps its counters in one of these and swaps in an updated copy under its lock
(`added`), so a snapshot is handed out as is and never changes under its reader.
Counters are totals since the process started; the metrics module names them, nobody re-maps them.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional, TypeVar

S = TypeVar("S")


@dataclass(frozen=True)
class PoolStats:
    """The device tier: adapter slots (slot 0, the bare base, not counted), the rank rows of adapter memory
    they share, and their loads."""

    slots_total: int = 0
    slots_ready: int = 0           # slots holding a loaded adapter (a slot still loading is not counted)
    slots_in_use: int = 0          # slots running sequences hold (0 when idle: a leaked reference shows here)
    rows_total: int = 0            # rank rows of adapter memory (an adapter of rank r holds r of them)
    rows_used: int = 0             # rows held by resident adapters, loading ones included
    loads: int = 0
    load_failures: int = 0
    load_seconds: float = 0.0
    evictions: int = 0
    hits: int = 0                  # a sequence found its adapter already in a slot
    misses: int = 0                # an adapter load a sequence waited for (once per load, not per step waited)


@dataclass(frozen=True)
class PrefixCacheStats:
    """The prefix cache of the paged KV cache (server/engine/prefix_cache.py)."""

    enabled: bool = False
    cached_blocks: int = 0         # KV blocks held under a prefix name (in use or idle)
    hits: int = 0                  # admitted requests that reused at least one cached block
    misses: int = 0                # admitted requests that reused none
    tokens_saved: int = 0          # prompt tokens whose KV was reused instead of computed


@dataclass(frozen=True)
class EngineStats:
    running: int = 0
    waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    last_batch_size: int = 0
    steps: int = 0
    preemptions: int = 0
    pool: PoolStats = field(default_factory=PoolStats)
    prefix: PrefixCacheStats = field(default_factory=PrefixCacheStats)


@dataclass(frozen=True)
class HostCacheStats:
    """The host-memory tier; a miss loads from the disk tier (a `load`)."""

    hits: int = 0
    misses: int = 0
    loads: int = 0
    load_errors: int = 0
    load_seconds: float = 0.0
    evictions: int = 0
    entries: int = 0
    bytes: int = 0
    budget_bytes: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


@dataclass(frozen=True)
class ResolveCacheStats:
    """A replica's in-memory view of a shared index (adapter_registry/resolve_cache.py)."""

    hits: int = 0                  # adapter ids answered from memory
    reads: int = 0                 # names read from the database
    stale_served: int = 0          # answered from memory while the database was unreachable
    refused: int = 0               # not known here while the database was unreachable (UNAVAILABLE)
    names: int = 0                 # adapter names held
    up: bool = False               # the change feed is connected


@dataclass(frozen=True)
class SharedIndexStats:
    """A registry index shared by a fleet of replicas (PostgreSQL), as this replica sees it."""

    remote_changes: int = 0        # publishes and deletes heard from the change feed (this replica's included)
    resyncs: int = 0               # times the whole index was read (every connect, and a gap in the changes)
    disconnects: int = 0           # times the change feed lost its connection
    resolve: ResolveCacheStats = field(default_factory=ResolveCacheStats)


@dataclass(frozen=True)
class RegistryStats:
    versions_stored: int = 0
    registered: int = 0
    rejected: int = 0              # registrations validation refused
    deleted_versions: int = 0
    resolves: int = 0
    objects_removed: int = 0
    startup_temp_removed: int = 0  # unfinished publishes the start-up sweep removed
    startup_orphans_removed: int = 0
    host: HostCacheStats = field(default_factory=HostCacheStats)
    shared: Optional[SharedIndexStats] = None  # None: a local (SQLite) index, nothing shared


def added(stats: S, **increments: float) -> S:
    """A copy of `stats` with each named counter increased; an unknown name raises AttributeError."""
    return replace(stats, **{name: getattr(stats, name) + n for name, n in increments.items()})
