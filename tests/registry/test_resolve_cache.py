"""The resolve cache's rules on their own (the index is a dict here; tests/registry/test_shared_index.py
runs the same cache against PostgreSQL)."""
import threading

import pytest

from adapter_registry.index_api import Change, VersionRow
from adapter_registry.resolve_cache import ResolveCache
from server.core.errors import UnavailableError


def row(name: str, version: int, tenant: str = "t") -> VersionRow:
    return VersionRow(tenant, name, version, f"{version:064x}", "fp", 4, ("q",), 1, 0.0)


class Index:
    """What the cache reads through: rows per (tenant, name), counted; `down` raises as PgIndex would."""

    def __init__(self):
        self.rows: dict = {}
        self.reads = 0
        self.down = False
        self.during_read = None  # called inside a read (to race a change against it)

    def read(self, tenant: str, name: str) -> list[VersionRow]:
        self.reads += 1
        if self.down:
            raise UnavailableError("database unreachable")
        out = list(self.rows.get((tenant, name), []))
        if self.during_read is not None:
            self.during_read()
        return out


@pytest.fixture
def idx():
    return Index()


@pytest.fixture
def cache(idx):
    c = ResolveCache(idx.read, "postgresql://test")
    c.synced()
    return c


def test_trusted_entries_are_answered_from_memory_until_a_change(idx, cache):
    idx.rows[("t", "a")] = [row("a", 1)]
    assert cache.get_version("t", "a", None).version == 1
    assert cache.get_version("t", "a", 1).version == 1 and cache.get_version("t", "a", 2) is None
    assert idx.reads == 1
    idx.rows[("t", "a")].append(row("a", 2))
    cache.apply(Change("publish", "t", "a", (2,)))
    assert cache.get_version("t", "a", None).version == 2 and idx.reads == 2


def test_a_read_overtaken_by_a_change_is_not_trusted(idx, cache):
    idx.rows[("t", "a")] = [row("a", 1)]
    idx.during_read = lambda: cache.apply(Change("publish", "t", "a", (2,)))  # committed while we read
    assert cache.get_version("t", "a", None).version == 1
    idx.during_read = None
    idx.rows[("t", "a")].append(row("a", 2))
    assert cache.get_version("t", "a", None).version == 2  # read again: the old answer was kept stale


def test_database_down_serves_what_is_known_and_refuses_the_rest(idx, cache):
    idx.rows[("t", "a")] = [row("a", 1), row("a", 2)]
    cache.get_version("t", "a", None)
    cache.down("connection refused")
    idx.down = True
    reads = idx.reads
    assert cache.get_version("t", "a", None).version == 2 and cache.get_version("t", "a", 1).version == 1
    for name, version in (("b", None), ("a", 3)):
        with pytest.raises(UnavailableError, match="connection refused"):
            cache.get_version("t", name, version)
    assert idx.reads == reads  # refused at once, without trying the database
    cache.apply(Change("delete", "t", "a", (2,)))  # a delete heard just before: refused from then on
    assert cache.get_version("t", "a", None).version == 1
    with pytest.raises(UnavailableError):
        cache.get_version("t", "a", 2)
    s = cache.stats()
    assert (s.up, s.stale_served, s.refused) == (False, 3, 3)


def test_a_resync_distrusts_everything_and_a_snapshot_trusts_it_again(idx, cache):
    idx.rows[("t", "a")] = [row("a", 1)]
    cache.get_version("t", "a", None)
    epoch = cache.synced()
    cache.apply(Change("publish", "t", "b", (1,)))  # heard after the sync, maybe before the snapshot's read
    cache.load_snapshot([row("a", 1), row("b", 1), row("c", 2), row("c", 1)], epoch)
    reads = idx.reads
    assert cache.get_version("t", "c", None).version == 2 and cache.get_version("t", "a", 1).version == 1
    assert idx.reads == reads  # trusted from the snapshot
    idx.rows[("t", "b")] = [row("b", 1), row("b", 2)]
    assert cache.get_version("t", "b", None).version == 2  # changed since the sync: read again
    cache.load_snapshot([row("a", 1)], epoch - 1)  # a snapshot of an older sync is ignored
    assert cache.get_version("t", "c", 2).version == 2


def test_concurrent_resolves_agree(idx, cache):
    idx.rows[("t", "a")] = [row("a", v) for v in range(1, 4)]
    out = []
    threads = [threading.Thread(target=lambda: out.append(cache.get_version("t", "a", None).version))
               for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out == [3] * 16
