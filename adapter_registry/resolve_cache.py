"""What a replica knows of the shared (PostgreSQL) index: the live versions of every adapter name.

Every generate request resolves an adapter id. Against a shared index that would be a database
round trip per request, and no answer at all while the database is down. So a replica keeps the
live versions of each name in memory: all of them, read in one query whenever the change feed
(`pg_listener`) connects (up to `max_names` names; others are read on first use), and the feed
keeps them current:

- **trusted** (the feed is connected and the entry was read after the last resync): answered from
  memory, found or not found;
- a publish of the name marks its entry stale (re-read on next use); a delete also drops the
  deleted versions from it at once, so they are refused here from that moment on;
- **feed down** (the database is unreachable): versions this replica knows are still served, on
  every replica, so an adapter whose requests move to another replica (a replica died, or a busy
  one spilled over) keeps working too; anything memory cannot answer positively is
  `UnavailableError`, never a guess and never "not found".

An entry read while a change of its name was in flight is kept stale, so a slow read (or a
snapshot read before the change) can never put an old answer back as trusted.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Optional

from server.core.errors import UnavailableError
from server.core.stats import ResolveCacheStats, added

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
        self._touched: set[Key] = set()  # names changed since the last sync (a snapshot may predate them)
        self._up = False
        self._down_reason = "not connected yet"
        self._stats = ResolveCacheStats()

    # ---- the feed's side ---------------------------------------------------------------------

    def synced(self) -> int:
        """The feed (re)connected: distrust everything read before, trust what is read from now on."""
        with self._lock:
            self._epoch += 1
            self._touched.clear()
            self._up = True
            return self._epoch

    def load_snapshot(self, rows: Iterable[VersionRow], epoch: int) -> int:
        """Every live version, read after `synced()` returned `epoch`; returns the names kept.

        A name changed since that sync stays stale (its notification may predate the read), and a name
        cached before but absent from a complete snapshot has no live versions any more.
        """
        groups: dict[Key, list[VersionRow]] = {}
        for r in rows:
            groups.setdefault((r.tenant, r.name), []).append(r)
        with self._lock:
            if epoch != self._epoch:
                return 0  # another sync came meanwhile: its own snapshot follows
            complete = len(groups) <= self.max_names
            for key in list(groups)[: self.max_names]:
                self._entries[key] = _Entry(tuple(sorted(groups[key], key=lambda r: r.version)), epoch,
                                            stale=key in self._touched)
            if complete:
                for key, e in self._entries.items():
                    if key not in groups and e.epoch != epoch:
                        self._entries[key] = _Entry((), epoch, stale=key in self._touched)
            while len(self._entries) > self.max_names:
                self._entries.popitem(last=False)
            return min(len(groups), self.max_names)

    def down(self, reason: str) -> None:
        with self._lock:
            self._up = False
            self._down_reason = reason

    def apply(self, change: Change) -> None:
        """A committed publish or delete of `change.name` (heard from the feed, or made here)."""
        key = (change.tenant, change.name)
        with self._lock:
            self._touched.add(key)
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
                    self._stats = added(self._stats, hits=1)
                    return _pick(e.rows, version)
            if not self._up:
                return self._fallback(e, version)
        try:
            rows = self._read_into(key)
        except UnavailableError:
            with self._lock:
                return self._fallback(self._entries.get(key), version)
        return _pick(rows, version)

    def refresh(self, tenant: str, name: str) -> None:
        """Read one name now (the feed does, after hearing of a change): the next request finds it in
        memory, and so does a request during a later outage. A failed read leaves the entry stale."""
        try:
            self._read_into((tenant, name))
        except UnavailableError:
            pass

    def _read_into(self, key: Key) -> tuple[VersionRow, ...]:
        with self._lock:
            read = _Read(self._epoch)
            self._reads.setdefault(key, []).append(read)
        try:
            rows = tuple(self._read(*key))
        finally:
            with self._lock:
                self._forget_read(key, read)
        with self._lock:
            self._stats = added(self._stats, reads=1)
            trusted = self._up and not read.spoiled and read.epoch == self._epoch
            held = self._entries.get(key)
            if held is None or held.epoch <= read.epoch:  # never replace what a later sync read
                self._entries[key] = _Entry(rows, read.epoch, stale=not trusted)
                self._entries.move_to_end(key)
            while len(self._entries) > self.max_names:
                self._entries.popitem(last=False)
        return rows

    def _fallback(self, e: Optional[_Entry], version: Optional[int]) -> VersionRow:
        """Last-known answer while the database is unreachable: only ever a version we know exists."""
        row = _pick(e.rows, version) if e is not None else None
        if row is not None:
            self._stats = added(self._stats, stale_served=1)
            return row
        self._stats = added(self._stats, refused=1)
        raise UnavailableError(
            f"the adapter registry database {self.where} is unreachable ({self._down_reason}): adapters known "
            "before the outage keep being served, others cannot be resolved until it is back; retry shortly")

    def _forget_read(self, key: Key, read: _Read) -> None:
        reads = self._reads.get(key)
        if reads is not None:
            reads.remove(read)
            if not reads:
                del self._reads[key]

    def stats(self) -> ResolveCacheStats:
        with self._lock:
            return replace(self._stats, names=len(self._entries), up=self._up)
