"""The SQLite index: tenants, adapter names, versions, digests and provenance.

WAL journal with synchronous=FULL: a committed publish survives a kill -9 and a power cut.
Every publish is one transaction that allocates the version number and inserts the row,
so a version number is visible only together with its complete row. Version numbers are
never reused: `names.next_version` keeps counting after deletes, and `name@N` always
means the same bytes.
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Callable, Optional

from .index_api import VersionRow, adapters_quota_error, versions_quota_error

__all__ = ["Index", "VersionRow"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tenants (
    tenant TEXT PRIMARY KEY,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS names (
    tenant TEXT NOT NULL REFERENCES tenants(tenant),
    name TEXT NOT NULL,
    next_version INTEGER NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (tenant, name)
);
CREATE TABLE IF NOT EXISTS versions (
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    digest TEXT NOT NULL,
    base_fingerprint TEXT NOT NULL,
    rank INTEGER NOT NULL,
    targets TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    created_at REAL NOT NULL,
    metadata TEXT NOT NULL,
    PRIMARY KEY (tenant, name, version),
    FOREIGN KEY (tenant, name) REFERENCES names(tenant, name)
);
CREATE INDEX IF NOT EXISTS versions_digest ON versions(digest);
"""


def _full(e: sqlite3.Error) -> bool:
    """SQLITE_FULL (the disk holding the database or its WAL is full)."""
    return getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "disk is full" in str(e)


def _rollback(cur: sqlite3.Cursor) -> None:
    try:
        cur.execute("ROLLBACK")
    except sqlite3.Error:
        pass  # SQLite may have rolled back already (after SQLITE_FULL it can): nothing is left to undo


_COLS = "tenant, name, version, digest, base_fingerprint, rank, targets, size_bytes, created_at, metadata"


def _row(r: tuple) -> VersionRow:
    return VersionRow(r[0], r[1], int(r[2]), r[3], r[4], int(r[5]), tuple(json.loads(r[6])), int(r[7]),
                      float(r[8]), json.loads(r[9]))


class Index:
    """Thread-safe access to the index database (one connection, one lock); an `IndexBackend`."""

    shared = False  # one process (the registry directory's lock): objects can go as soon as unused

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)

    def describe(self) -> str:
        return str(self.path)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def publish(self, tenant: str, name: str, digest: str, base_fingerprint: str, rank: int,
                targets: tuple[str, ...], size_bytes: int, metadata: dict[str, str],
                max_names: Optional[int] = None, max_versions: Optional[int] = None,
                ensure_object: Optional[Callable[[], None]] = None) -> VersionRow:
        """Allocate the next version of `name` and insert its row, all in one transaction.

        Quota checks run inside the same transaction, so two concurrent publishes cannot
        both slip under a limit (QuotaExceededError names the limit).
        """
        now = time.time()
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                if ensure_object is not None:
                    ensure_object()
                cur.execute("INSERT OR IGNORE INTO tenants(tenant, created_at) VALUES (?, ?)", (tenant, now))
                r = cur.execute("SELECT next_version FROM names WHERE tenant=? AND name=?", (tenant, name)).fetchone()
                live = cur.execute("SELECT COUNT(*) FROM versions WHERE tenant=? AND name=?",
                                   (tenant, name)).fetchone()[0]
                if max_names is not None and live == 0:
                    n = cur.execute("SELECT COUNT(DISTINCT name) FROM versions WHERE tenant=?", (tenant,)).fetchone()[0]
                    if n >= max_names:
                        raise adapters_quota_error(tenant, max_names)
                if max_versions is not None:
                    n = cur.execute("SELECT COUNT(*) FROM versions WHERE tenant=?", (tenant,)).fetchone()[0]
                    if n >= max_versions:
                        raise versions_quota_error(tenant, max_versions)
                if r is None:
                    version = 1
                    cur.execute("INSERT INTO names(tenant, name, next_version, created_at) VALUES (?, ?, 2, ?)",
                                (tenant, name, now))
                else:
                    version = int(r[0])
                    cur.execute("UPDATE names SET next_version=? WHERE tenant=? AND name=?",
                                (version + 1, tenant, name))
                row = VersionRow(tenant, name, version, digest, base_fingerprint, rank, tuple(targets),
                                 size_bytes, now, dict(metadata))
                cur.execute(f"INSERT INTO versions({_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            (tenant, name, version, digest, base_fingerprint, rank, json.dumps(list(targets)),
                             size_bytes, now, json.dumps(metadata, sort_keys=True)))
                cur.execute("COMMIT")
            except BaseException as e:
                _rollback(cur)
                if isinstance(e, sqlite3.Error) and _full(e):
                    from server.core.errors import StorageFullError

                    raise StorageFullError(f"the registry's disk is full at {self.path.parent} while recording "
                                           f"{name}'s new version; nothing was stored; free space and retry") from None
                raise
        return row

    def get_version(self, tenant: str, name: str, version: Optional[int]) -> Optional[VersionRow]:
        """One version, or the latest one when `version` is None."""
        with self._lock:
            if version is None:
                r = self._db.execute(f"SELECT {_COLS} FROM versions WHERE tenant=? AND name=? "
                                     "ORDER BY version DESC LIMIT 1", (tenant, name)).fetchone()
            else:
                r = self._db.execute(f"SELECT {_COLS} FROM versions WHERE tenant=? AND name=? AND version=?",
                                     (tenant, name, version)).fetchone()
        return _row(r) if r else None

    def versions(self, tenant: str, name: Optional[str] = None) -> list[VersionRow]:
        with self._lock:
            if name is None:
                rows = self._db.execute(f"SELECT {_COLS} FROM versions WHERE tenant=? ORDER BY name, version",
                                        (tenant,)).fetchall()
            else:
                rows = self._db.execute(f"SELECT {_COLS} FROM versions WHERE tenant=? AND name=? ORDER BY version",
                                        (tenant, name)).fetchall()
        return [_row(r) for r in rows]

    def delete(self, tenant: str, name: str, versions: list[int]) -> list[int]:
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                gone = []
                for v in versions:
                    cur.execute("DELETE FROM versions WHERE tenant=? AND name=? AND version=?", (tenant, name, v))
                    if cur.rowcount:
                        gone.append(v)
                cur.execute("COMMIT")
            except BaseException as e:
                _rollback(cur)
                if isinstance(e, sqlite3.Error) and _full(e):
                    from server.core.errors import StorageFullError

                    raise StorageFullError(f"the registry's disk is full at {self.path.parent}: even a delete needs "
                                           "room in the journal; free a little space and retry") from None
                raise
        return gone

    def released_at(self, digest: str) -> Optional[float]:
        return None  # one process: the registry knows when it let go of an object

    def removal_guard(self, digest: str) -> AbstractContextManager[bool]:
        # One process: the registry's publish lock already keeps removal and publish apart.
        return nullcontext(not self.digest_referenced(digest))

    def digest_referenced(self, digest: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM versions WHERE digest=? LIMIT 1", (digest,)).fetchone() is not None

    def all_digests(self) -> set[str]:
        with self._lock:
            return {r[0] for r in self._db.execute("SELECT DISTINCT digest FROM versions")}

    def count_versions(self, tenant: Optional[str] = None) -> int:
        with self._lock:
            if tenant is None:
                return self._db.execute("SELECT COUNT(*) FROM versions").fetchone()[0]
            return self._db.execute("SELECT COUNT(*) FROM versions WHERE tenant=?", (tenant,)).fetchone()[0]
