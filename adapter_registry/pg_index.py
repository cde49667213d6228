"""The PostgreSQL index (`--registry postgresql://...`): what every replica of a fleet shares.

The same rows and guarantees as the SQLite index (`index.py`), in the schema `loraserve`, through
psycopg 3 and a small connection pool:

- A publish is one transaction. It locks the name's row (`SELECT ... FOR UPDATE`), so two replicas
  registering one name at once get two distinct versions; when quotas apply it also locks the tenant's
  row, so two publishes cannot both slip under a limit. There is no single-writer lock.
- Every committed publish and delete takes the next value of `loraserve.change_seq` and sends
  `NOTIFY loraserve_registry` with a small JSON payload (PostgreSQL delivers it at commit);
  `pg_listener.ChangeListener` turns it into cache updates on every replica.
- Objects live on a shared filesystem and are removed only after a grace period: a delete records when
  a digest stopped being referenced (`released_objects`), and removal holds an exclusive advisory lock
  on the digest while publishes hold a shared one, so a row is never committed for a removed object.
- A connection failure is `UnavailableError` naming the database (never its password). Connections
  come from a small pool of our own (`_Pool`) that never sleeps: a resolve that misses the cache runs
  on the server's event loop, so after a PostgreSQL restart a dead pooled connection is found by its
  failing BEGIN and replaced at once by a fresh one, with no backoff, and nothing needs a restart.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import psycopg
from psycopg.conninfo import conninfo_to_dict

from server.core.errors import UnavailableError

from .index_api import VersionRow, adapters_quota_error, versions_quota_error

log = logging.getLogger("loraserve.registry.pg")

CHANNEL = "loraserve_registry"
SCHEMA_VERSION = 1
_LOCK_NAMESPACE = 0x4C53          # advisory locks of ours: (namespace, key); "LS"
_SCHEMA_LOCK_KEY = 1              # serializes schema creation when many replicas start at once

_DDL = """
CREATE SCHEMA IF NOT EXISTS loraserve;
CREATE TABLE IF NOT EXISTS loraserve.meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS loraserve.tenants (
    tenant TEXT PRIMARY KEY,
    created_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS loraserve.names (
    tenant TEXT NOT NULL REFERENCES loraserve.tenants(tenant),
    name TEXT NOT NULL,
    next_version INTEGER NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (tenant, name)
);
CREATE TABLE IF NOT EXISTS loraserve.versions (
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    digest TEXT NOT NULL,
    base_fingerprint TEXT NOT NULL,
    rank INTEGER NOT NULL,
    targets TEXT NOT NULL,
    size_bytes BIGINT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    metadata TEXT NOT NULL,
    PRIMARY KEY (tenant, name, version),
    FOREIGN KEY (tenant, name) REFERENCES loraserve.names(tenant, name)
);
CREATE INDEX IF NOT EXISTS versions_digest ON loraserve.versions(digest);
CREATE TABLE IF NOT EXISTS loraserve.released_objects (
    digest TEXT PRIMARY KEY,
    released_at DOUBLE PRECISION NOT NULL
);
CREATE SEQUENCE IF NOT EXISTS loraserve.change_seq;
"""

_COLS = "tenant, name, version, digest, base_fingerprint, rank, targets, size_bytes, created_at, metadata"
_NOT_REACHED = (psycopg.OperationalError, psycopg.InterfaceError)


class PoolBusy(Exception):
    """Every connection of the pool stayed in use for the whole wait."""


class _Pool:
    """At most `size` connections, idle ones reused newest first; opened on demand, never in the background."""

    def __init__(self, url: str, kwargs: dict[str, Any], size: int):
        self.url, self.kwargs, self.size = url, kwargs, size
        self._slots = threading.BoundedSemaphore(size)
        self._idle: deque[psycopg.Connection] = deque()
        self._lock = threading.Lock()
        self._closed = False

    @contextmanager
    def connection(self, timeout: float) -> Iterator[tuple[psycopg.Connection, bool]]:
        """(connection, fresh): `fresh` is False for a reused one, which may have died while idle."""
        if not self._slots.acquire(timeout=timeout):
            raise PoolBusy(f"all {self.size} database connections stayed busy for {timeout:.0f}s")
        conn: Optional[psycopg.Connection] = None
        try:
            with self._lock:
                while self._idle and conn is None:
                    c = self._idle.pop()
                    conn = None if c.closed or c.broken else c
            fresh = conn is None
            if conn is None:
                conn = psycopg.connect(self.url, **self.kwargs)
            yield conn, fresh
        finally:
            if conn is not None:
                reusable = not (conn.closed or conn.broken) and \
                    conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
                with self._lock:
                    if reusable and not self._closed:
                        self._idle.append(conn)
                        conn = None
                if conn is not None:
                    conn.close()
            self._slots.release()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = list(self._idle), deque()
        for c in idle:
            c.close()


def _row(r: tuple) -> VersionRow:
    return VersionRow(r[0], r[1], int(r[2]), r[3], r[4], int(r[5]), tuple(json.loads(r[6])), int(r[7]),
                      float(r[8]), json.loads(r[9]))


def _object_key(digest: str) -> int:
    """A signed 32-bit advisory-lock key from the digest (uniform: it is a sha256)."""
    return int.from_bytes(bytes.fromhex(digest[:8]), "big", signed=True)


def redacted(url: str) -> str:
    """`postgresql://user@host:port/db`, never the password, for logs and error messages."""
    try:
        p = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql://(unparsable URL)"
    user = f"{p['user']}@" if p.get("user") else ""
    port = f":{p['port']}" if p.get("port") else ""
    return f"postgresql://{user}{p.get('host', '')}{port}/{p.get('dbname', '')}"


def connection_kwargs(url: str, connect_timeout: float) -> dict[str, Any]:
    """Defaults for every connection of ours; what the URL itself sets wins."""
    given = conninfo_to_dict(url)
    kw: dict[str, Any] = {"autocommit": True}
    defaults = {"connect_timeout": str(max(1, int(connect_timeout))), "application_name": "loraserve",
                # a PostgreSQL host that vanishes without a reset is noticed in ~20 s, not hours
                "keepalives": "1", "keepalives_idle": "10", "keepalives_interval": "3", "keepalives_count": "3"}
    for k, v in defaults.items():
        if k not in given:
            kw[k] = v
    return kw


def unreachable(where: str, e: BaseException) -> UnavailableError:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    first = lines[0] if lines else type(e).__name__
    first = first.removeprefix("connection failed: ")
    return UnavailableError(f"the adapter registry database {where} is unreachable ({first}); retry shortly")


class PgIndex:
    """An `IndexBackend` on PostgreSQL (see the module docstring)."""

    shared = True

    def __init__(self, url: str, pool_size: int = 8, connect_timeout: float = 3.0, wait_timeout: float = 3.0):
        self.url = url
        self.where = redacted(url)
        self.wait_timeout = wait_timeout
        self.kwargs = connection_kwargs(url, connect_timeout)
        self._pool = _Pool(url, self.kwargs, pool_size)
        try:
            self._create_schema()
        except BaseException:
            self._pool.close()
            raise

    def describe(self) -> str:
        return self.where

    def close(self) -> None:
        self._pool.close()

    @contextmanager
    def _tx(self) -> Iterator[psycopg.Connection]:
        """One transaction on a pooled connection; losing the database becomes UnavailableError.

        A reused connection whose BEGIN fails died while idle (a database restart): nothing of ours
        ran on it, so the next one (at worst a fresh one) is tried at once.
        """
        try:
            for _ in range(self._pool.size + 1):
                with self._pool.connection(self.wait_timeout) as (conn, fresh):
                    try:
                        tx = conn.transaction()
                        tx.__enter__()
                    except _NOT_REACHED:
                        if fresh:
                            raise
                        continue
                    try:
                        yield conn
                    except BaseException as e:
                        tx.__exit__(type(e), e, e.__traceback__)
                        raise
                    tx.__exit__(None, None, None)
                    return
        except PoolBusy as e:
            raise UnavailableError(f"the adapter registry database {self.where}: {e}; retry shortly") from None
        except _NOT_REACHED as e:
            raise unreachable(self.where, e) from None

    def _create_schema(self) -> None:
        """Create the schema once (the first replica to start; the others wait on the lock); later starts
        only read its version, so a role that may use but not create the schema can run replicas."""
        with self._tx() as conn:
            if conn.execute("SELECT to_regclass('loraserve.meta')").fetchone()[0] is None:
                conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (_LOCK_NAMESPACE, _SCHEMA_LOCK_KEY))
                conn.execute(_DDL)
            r = conn.execute("SELECT value FROM loraserve.meta WHERE key = 'schema_version'").fetchone()
            if r is None:
                conn.execute("INSERT INTO loraserve.meta(key, value) VALUES ('schema_version', %s)",
                             (str(SCHEMA_VERSION),))
            elif int(r[0]) > SCHEMA_VERSION:
                raise UnavailableError(f"the registry database {self.where} has schema version {r[0]}, newer than "
                                       f"this loraserve understands ({SCHEMA_VERSION}); upgrade loraserve")

    # ---- writes ------------------------------------------------------------------------------

    def publish(self, tenant: str, name: str, digest: str, base_fingerprint: str, rank: int,
                targets: tuple[str, ...], size_bytes: int, metadata: dict[str, str],
                max_names: Optional[int] = None, max_versions: Optional[int] = None,
                ensure_object: Optional[Callable[[], None]] = None) -> VersionRow:
        now = time.time()
        with self._tx() as conn:
            conn.execute("SELECT pg_advisory_xact_lock_shared(%s, %s)", (_LOCK_NAMESPACE, _object_key(digest)))
            if ensure_object is not None:
                ensure_object()  # a collector cannot remove the object from here to the commit
            conn.execute("INSERT INTO loraserve.tenants(tenant, created_at) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                         (tenant, now))
            if max_names is not None or max_versions is not None:
                conn.execute("SELECT 1 FROM loraserve.tenants WHERE tenant = %s FOR UPDATE", (tenant,))
            conn.execute("INSERT INTO loraserve.names(tenant, name, next_version, created_at) VALUES (%s, %s, 1, %s) "
                         "ON CONFLICT DO NOTHING", (tenant, name, now))
            version = int(conn.execute("SELECT next_version FROM loraserve.names WHERE tenant = %s AND name = %s "
                                       "FOR UPDATE", (tenant, name)).fetchone()[0])
            if max_names is not None:
                live = conn.execute("SELECT COUNT(*) FROM loraserve.versions WHERE tenant = %s AND name = %s",
                                    (tenant, name)).fetchone()[0]
                if live == 0:
                    n = conn.execute("SELECT COUNT(DISTINCT name) FROM loraserve.versions WHERE tenant = %s",
                                     (tenant,)).fetchone()[0]
                    if n >= max_names:
                        raise adapters_quota_error(tenant, max_names)
            if max_versions is not None:
                n = conn.execute("SELECT COUNT(*) FROM loraserve.versions WHERE tenant = %s", (tenant,)).fetchone()[0]
                if n >= max_versions:
                    raise versions_quota_error(tenant, max_versions)
            conn.execute("UPDATE loraserve.names SET next_version = %s WHERE tenant = %s AND name = %s",
                         (version + 1, tenant, name))
            conn.execute(f"INSERT INTO loraserve.versions({_COLS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                         (tenant, name, version, digest, base_fingerprint, rank, json.dumps(list(targets)),
                          size_bytes, now, json.dumps(metadata, sort_keys=True)))
            conn.execute("DELETE FROM loraserve.released_objects WHERE digest = %s", (digest,))
            self._notify(conn, "publish", tenant, name, [version])
        return VersionRow(tenant, name, version, digest, base_fingerprint, rank, tuple(targets), size_bytes, now,
                          dict(metadata))

    def delete(self, tenant: str, name: str, versions: list[int]) -> list[int]:
        now = time.time()
        with self._tx() as conn:
            gone = conn.execute("DELETE FROM loraserve.versions WHERE tenant = %s AND name = %s "
                                "AND version = ANY(%s) RETURNING version, digest",
                                (tenant, name, list(versions))).fetchall()
            for digest in {d for _, d in gone}:
                if conn.execute("SELECT 1 FROM loraserve.versions WHERE digest = %s LIMIT 1", (digest,)).fetchone():
                    continue
                conn.execute("INSERT INTO loraserve.released_objects(digest, released_at) VALUES (%s, %s) "
                             "ON CONFLICT (digest) DO UPDATE SET released_at = EXCLUDED.released_at", (digest, now))
            if gone:
                self._notify(conn, "delete", tenant, name, sorted(v for v, _ in gone))
        return sorted(int(v) for v, _ in gone)

    @staticmethod
    def _notify(conn: psycopg.Connection, op: str, tenant: str, name: str, versions: list[int]) -> None:
        seq = conn.execute("SELECT nextval('loraserve.change_seq')").fetchone()[0]
        payload = json.dumps({"seq": seq, "op": op, "tenant": tenant, "name": name, "versions": versions})
        conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))

    # ---- reads -------------------------------------------------------------------------------

    def get_version(self, tenant: str, name: str, version: Optional[int]) -> Optional[VersionRow]:
        with self._tx() as conn:
            if version is None:
                r = conn.execute(f"SELECT {_COLS} FROM loraserve.versions WHERE tenant = %s AND name = %s "
                                 "ORDER BY version DESC LIMIT 1", (tenant, name)).fetchone()
            else:
                r = conn.execute(f"SELECT {_COLS} FROM loraserve.versions WHERE tenant = %s AND name = %s "
                                 "AND version = %s", (tenant, name, version)).fetchone()
        return _row(r) if r else None

    def versions(self, tenant: str, name: Optional[str] = None) -> list[VersionRow]:
        with self._tx() as conn:
            if name is None:
                rows = conn.execute(f"SELECT {_COLS} FROM loraserve.versions WHERE tenant = %s "
                                    "ORDER BY name, version", (tenant,)).fetchall()
            else:
                rows = conn.execute(f"SELECT {_COLS} FROM loraserve.versions WHERE tenant = %s AND name = %s "
                                    "ORDER BY version", (tenant, name)).fetchall()
        return [_row(r) for r in rows]

    def digest_referenced(self, digest: str) -> bool:
        with self._tx() as conn:
            return conn.execute("SELECT 1 FROM loraserve.versions WHERE digest = %s LIMIT 1",
                                (digest,)).fetchone() is not None

    def all_digests(self) -> set[str]:
        with self._tx() as conn:
            return {r[0] for r in conn.execute("SELECT DISTINCT digest FROM loraserve.versions")}

    def count_versions(self, tenant: Optional[str] = None) -> int:
        with self._tx() as conn:
            if tenant is None:
                return int(conn.execute("SELECT COUNT(*) FROM loraserve.versions").fetchone()[0])
            return int(conn.execute("SELECT COUNT(*) FROM loraserve.versions WHERE tenant = %s",
                                    (tenant,)).fetchone()[0])

    # ---- object removal ----------------------------------------------------------------------

    def released_at(self, digest: str) -> Optional[float]:
        with self._tx() as conn:
            r = conn.execute("SELECT released_at FROM loraserve.released_objects WHERE digest = %s",
                             (digest,)).fetchone()
        return float(r[0]) if r else None

    @contextmanager
    def removal_guard(self, digest: str) -> Iterator[bool]:
        """True (and publishes of `digest` held off until the block ends) when nothing references it."""
        with self._tx() as conn:
            locked = conn.execute("SELECT pg_try_advisory_xact_lock(%s, %s)",
                                  (_LOCK_NAMESPACE, _object_key(digest))).fetchone()[0]
            free = bool(locked) and conn.execute("SELECT 1 FROM loraserve.versions WHERE digest = %s LIMIT 1",
                                                 (digest,)).fetchone() is None
            yield free
            if free:
                conn.execute("DELETE FROM loraserve.released_objects WHERE digest = %s", (digest,))


def read_all_versions(conn: psycopg.Connection) -> list[VersionRow]:
    """Every live version (one query), oldest first per name."""
    return [_row(r) for r in conn.execute(f"SELECT {_COLS} FROM loraserve.versions ORDER BY tenant, name, version")]


def read_change_seq(conn: psycopg.Connection) -> int:
    """The last change number handed out (0 before the first change)."""
    value, called = conn.execute("SELECT last_value, is_called FROM loraserve.change_seq").fetchone()
    return int(value) if called else 0
