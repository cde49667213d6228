"""What a replica knows of each adapter name it has resolved, for a shared (PostgreSQL) index.

Every generate request resolves an adapter id. Against a shared index that would be a database
round trip per request, and no answer at all while the database is down. So a replica keeps the
live versions of each name it resolved, and the change feed (`pg_listener`) keeps them current:

- **trusted** (the feed is connected and the entry was read after the last resync): answered from
  memory, found or not found;
- a publish of the name marks its entry stale (re-read on next use); a delete also drops the
  deleted versions from it at once, so they are refused here from that moment on;
- **feed down** (the database is unreachable): versions this replica knows are still served
  (requests for adapters already resolved keep working); anything memory cannot answer
  positively is `UnavailableError`, never a guess and never "not found".

An entry read while a change of its name was in flight is kept stale, so a slow read can never
put an old answer back as trusted.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional

from server.core.errors import UnavailableError

from .index_api import Change, VersionRow

Key = tuple[str, str]


@dataclass
class _Entry:
    rows: tuple[VersionRow, ...]   # live versions, oldest first
    epoch: int
    stale: bool = False


class _Read:
    """A database read in flight for one name; a change of that name spoils it."""

    __slots__ = ("epoch", "spoiled")

    def __init__(self, epoch: int):
        self.epoch = epoch
        self.spoiled = False


@dataclass
class ResolveCacheStats:
    hits: int = 0           # answered from a trusted entry
    reads: int = 0          # read from the database
    stale_served: int = 0   # served from a last-known entry while the database was unreachable
    refused: int = 0        # UnavailableError: not known here and the database unreachable
    names: int = 0
    up: bool = False


def _pick(rows: tuple[VersionRow, ...], version: Optional[int]) -> Optional[VersionRow]:
    if version is None:
        return rows[-1] if rows else None
    for r in rows:
        if r.version == version:
            return r
    return None


class ResolveCache:
    """Per-name version lists kept current by the change feed (see the module docstring)."""

    def __init__(self, read: Callable[[str, str], list[VersionRow]], where: str, max_names: int = 100_000):
        self._read = read
        self.where = where
        self.max_names = max_names
        self._lock = threading.Lock()
        self._entries: "OrderedDict[Key, _Entry]" = OrderedDict()
        self._reads: dict[Key, list[_Read]] = {}
        self._epoch = 0
        self._up = False
        self._down_reason = "not connected yet"
        self._stats = ResolveCacheStats()

    # ---- the feed's side ---------------------------------------------------------------------

    def synced(self) -> None:
        """The feed (re)connected: distrust everything read before, trust what is read from now on."""
        with self._lock:
            self._epoch += 1
            self._up = True

    def down(self, reason: str) -> None:
        with self._lock:
            self._up = False
            self._down_reason = reason

    def apply(self, change: Change) -> None:
        """A committed publish or delete of `change.name` (heard from the feed, or made here)."""
        key = (change.tenant, change.name)
        with self._lock:
            for r in self._reads.get(key, ()):
                r.spoiled = True
            e = self._entries.get(key)
            if e is None:
                return
            e.stale = True
            if change.op == "delete":
                gone = set(change.versions)
                e.rows = tuple(r for r in e.rows if r.version not in gone)

    # ---- the resolver's side -----------------------------------------------------------------

    def get_version(self, tenant: str, name: str, version: Optional[int]) -> Optional[VersionRow]:
        """The row `name@version` (latest for None) names now, or None; UnavailableError if unknowable."""
        key = (tenant, name)
        with self._lock:
            e = self._entries.get(key)
            if e is not None:
                self._entries.move_to_end(key)
                if self._up and not e.stale and e.epoch == self._epoch:
                    self._stats.hits += 1
                    return _pick(e.rows, version)
            if not self._up:
                return self._fallback(e, version)
            read = _Read(self._epoch)
            self._reads.setdefault(key, []).append(read)
        try:
            rows = tuple(self._read(tenant, name))
        except UnavailableError:
            with self._lock:
                self._forget_read(key, read)
                return self._fallback(e, version)
        with self._lock:
            self._forget_read(key, read)
            self._stats.reads += 1
            trusted = self._up and not read.spoiled and read.epoch == self._epoch
            self._entries[key] = _Entry(rows, read.epoch, stale=not trusted)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_names:
                self._entries.popitem(last=False)
        return _pick(rows, version)

    def _fallback(self, e: Optional[_Entry], version: Optional[int]) -> VersionRow:
        """Last-known answer while the database is unreachable: only ever a version we know exists."""
        row = _pick(e.rows, version) if e is not None else None
        if row is not None:
            self._stats.stale_served += 1
            return row
        self._stats.refused += 1
        raise UnavailableError(
            f"the adapter registry database {self.where} is unreachable ({self._down_reason}): adapters this "
            "replica already resolved keep being served, others cannot be resolved until it is back; retry shortly")

    def _forget_read(self, key: Key, read: _Read) -> None:
        reads = self._reads.get(key)
        if reads is not None:
            reads.remove(read)
            if not reads:
                del self._reads[key]

    def stats(self) -> ResolveCacheStats:
        with self._lock:
            s = ResolveCacheStats(**vars(self._stats))
            s.names, s.up = len(self._entries), self._up
            return s
