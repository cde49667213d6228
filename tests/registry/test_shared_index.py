"""Several replicas on one PostgreSQL index and one objects folder (in one process: two Registry objects).

What a fleet needs beyond the single-registry suite: versions allocated across replicas, changes
propagated by notification (tests/fleet holds the 1 s bound end to end, through real replicas), clean-up that
never sweeps another replica's work, and the database going away and coming back.
"""
import gc
import os
import threading
import time

import pytest

from adapter_registry import Registry
from server.core.errors import AdapterNotFoundError, UnavailableError
from server.fleet.postgres import PostgresCluster

from .adapters import FINGERPRINT, TINY, make_adapter


def open_replica(url, objects, **kw) -> Registry:
    return Registry(url, TINY, FINGERPRINT, 16, objects=objects, **kw)


@pytest.fixture
def replicas(pg_url, tmp_path):
    opened = []

    def make(**kw) -> Registry:
        reg = open_replica(pg_url, tmp_path / "objects", **kw)
        opened.append(reg)
        return reg

    yield make
    for reg in opened:
        reg.close()


def wait_until(pred, timeout: float = 5.0, step: float = 0.005) -> float:
    """Seconds until `pred()` held (AssertionError after `timeout`)."""
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"not true after {timeout}s")
        time.sleep(step)
    return time.monotonic() - t0


def resolves_to(reg: Registry, adapter_id: str):
    try:
        return reg.resolve("t", adapter_id).version
    except AdapterNotFoundError:
        return None


def test_concurrent_publishes_across_replicas(replicas):
    """Two replicas registering one name at once: distinct versions; identical bytes stored once."""
    a, b = replicas(), replicas()
    same_c, same_w = make_adapter(seed=7)
    out, errors = [], []

    def pub(reg, i):
        try:
            c, w = (same_c, same_w) if i % 2 else make_adapter(seed=100 + i)
            out.append(reg.register_bytes("t", "ad", c, w).version)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=pub, args=((a, b)[i % 2], i)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and sorted(out) == list(range(1, 13))
    digests = {v.digest for v in a.get("t", "ad").versions}
    assert len(digests) == 7  # six distinct uploads + one shared by the other six
    assert set(a.store.digests()) == digests
    assert b.get("t", "ad").latest_version == 12


# Propagation rides PostgreSQL's NOTIFY: typically milliseconds. The periodic resync is 30 s, so anything under
# this bound came by notification; it leaves room for a loaded 2-core CI machine (a 1 s bound failed there once).
PROPAGATION_BOUND_S = 3.0


def test_new_and_deleted_versions_propagate_by_notification(replicas):
    a, b = replicas(), replicas()
    c1, w1 = make_adapter(seed=1)
    c2, w2 = make_adapter(seed=2)
    a.register_bytes("t", "ad", c1, w1)
    wait_until(lambda: b.stats().shared.remote_changes == 1)
    reads = b.stats().shared.resolve.reads
    assert resolves_to(b, "ad") == resolves_to(b, "ad") == 1
    s = b.stats().shared.resolve  # b read "ad" when it heard of it: its requests find it in memory
    assert s.hits == 2 and s.reads == reads
    a.register_bytes("t", "ad", c2, w2)
    assert resolves_to(a, "ad") == 2          # at once where it was registered
    took = wait_until(lambda: resolves_to(b, "ad") == 2)
    assert took < PROPAGATION_BOUND_S, f"name@latest reached the other replica after {took:.3f}s"
    in_flight = b.resolve("t", "ad@2")         # a request on b resolved version 2 ...
    b.cache.discard(in_flight.digest)             # (not in b's host memory: it must read the shared folder)
    a.delete("t", "ad@2")
    with pytest.raises(AdapterNotFoundError):
        a.resolve("t", "ad@2")
    took = wait_until(lambda: resolves_to(b, "ad@2") is None)
    assert took < PROPAGATION_BOUND_S, f"a deleted version was still served by the other replica after {took:.3f}s"
    assert resolves_to(b, "ad") == 1           # latest falls back to the version left
    assert in_flight.load().rank == 4          # ... and finishes on it: the files outlive the delete
    assert b.stats().shared.remote_changes >= 3


def test_changes_arrive_and_close_returns_without_waiting_for_the_listeners_poll(replicas, monkeypatch):
    from adapter_registry import pg_listener

    monkeypatch.setattr(pg_listener, "POLL_S", 60.0)  # the listeners' own clock would wake them a minute later
    a, b = replicas(), replicas()
    c1, w1 = make_adapter(seed=1)
    a.register_bytes("t", "ad", c1, w1)
    took = wait_until(lambda: resolves_to(b, "ad") == 1)
    assert took < PROPAGATION_BOUND_S, f"a notification waited for the poll: {took:.3f}s"
    t0 = time.monotonic()
    b.close()
    assert time.monotonic() - t0 < 5.0, "close waited for the listener's poll"
    assert resolves_to(a, "ad") == 1


def test_unused_objects_and_temp_dirs_wait_for_the_grace_period(replicas):
    """A publish in progress elsewhere (a temp dir, an object not yet indexed) is never swept early."""
    a = replicas(object_grace_s=60.0)
    c, w = make_adapter(seed=3)
    from adapter_registry.store import content_digest

    digest = content_digest(c, w)
    a.store.publish(digest, c, w)                   # another replica's publish, between its files and its row
    work = a.store.tmp / "another-replica-publishing"
    work.mkdir()
    assert a.collect_garbage() == {"objects": 0, "temp": 0}
    assert a.store.exists(digest) and work.exists()
    old = time.time() - 120                          # ... abandoned two minutes ago (the writer died)
    os.utime(a.store.path(digest), (old, old))
    os.utime(work, (old, old))
    assert a.collect_garbage() == {"objects": 1, "temp": 1}
    assert not a.store.exists(digest) and not work.exists()
    # A deleted version's object is kept for the grace period after the delete, however old its files:
    # requests elsewhere that resolved it just before may still read them.
    v = a.register_bytes("t", "x", c, w)
    os.utime(a.store.path(v.digest), (old, old))
    a.delete("t", "x")
    assert a.collect_garbage()["objects"] == 0 and a.store.exists(v.digest)
    assert a.index.released_at(v.digest) is not None


def test_a_publish_racing_the_collector_keeps_its_object(replicas):
    """The collector holds an object's removal lock; a publish of the same bytes waits, then writes it again."""
    a, b = replicas(object_grace_s=0.0), replicas(object_grace_s=0.0)
    c, w = make_adapter(seed=4)
    v = a.register_bytes("t", "old", c, w)
    a.delete("t", "old")
    gc.collect()
    assert not a.store.exists(v.digest)  # grace 0 here: removed at once
    a.store.publish(v.digest, c, w)      # an unreferenced object on disk again
    locked, release = threading.Event(), threading.Event()
    result = {}

    def collector():
        with b.index.removal_guard(v.digest) as free:
            result["free"] = free
            locked.set()
            release.wait(5)
            b.store.remove(v.digest)

    t = threading.Thread(target=collector)
    t.start()
    assert locked.wait(5) and result["free"]
    pub = threading.Thread(target=lambda: result.setdefault("v", a.register_bytes("t", "new", c, w)))
    pub.start()
    time.sleep(0.3)
    assert "v" not in result              # the publish waits for the removal to finish ...
    release.set()
    t.join(5)
    pub.join(10)
    assert result["v"].version == 1       # ... then commits, with its object written again
    assert a.store.exists(v.digest)
    spec = b.resolve("t", "new")
    b.cache.discard(spec.digest)
    assert spec.load().rank == 4


@pytest.fixture
def own_cluster():
    """A PostgreSQL server of this test's own: it is stopped and started again."""
    cluster = PostgresCluster().start()
    yield cluster
    cluster.destroy()


def test_postgresql_down_then_back(own_cluster, tmp_path):
    url = own_cluster.create_database("loraserve")
    a = open_replica(url, tmp_path / "objects")
    c1, w1 = make_adapter(seed=1)
    c2, w2 = make_adapter(seed=2)
    c3, w3 = make_adapter(seed=3)
    a.register_bytes("t", "early", c3, w3)   # before b starts: b reads it in its start-up snapshot
    b = open_replica(url, tmp_path / "objects")
    try:
        a.register_bytes("t", "known", c1, w1)
        known = b.resolve("t", "known")       # b has resolved "known" before the outage
        b.cache.discard(known.digest)
        a.register_bytes("t", "heard", c2, w2)  # b only hears of it
        wait_until(lambda: b.stats().shared.remote_changes >= 2)
        own_cluster.stop()
        wait_until(lambda: not b.stats().shared.resolve.up)
        # adapters already resolved keep being served, from the cache (and the shared folder) ...
        again = b.resolve("t", "known")
        assert (again.version, again.digest) == (1, known.digest) and again.load().rank == 4
        assert b.resolve("t", "known@1").version == 1
        # ... and so does every adapter b knows of without ever having served it (requests that move
        # to b because their replica died or was busy keep working during the outage)
        assert b.resolve("t", "early").load().rank == 4 and b.resolve("t", "heard").version == 1
        # ... what is not known here is UNAVAILABLE with the reason, not "not found", and fails fast
        t0 = time.monotonic()
        with pytest.raises(UnavailableError, match="unreachable.*known before the outage keep being served"):
            b.resolve("t", "never-seen")
        with pytest.raises(UnavailableError, match="unreachable"):
            b.resolve("t", "known@2")
        assert time.monotonic() - t0 < 0.5
        with pytest.raises(UnavailableError, match="registry database .* is unreachable"):
            a.register_bytes("t", "during", c2, w2)
        with pytest.raises(UnavailableError):
            a.list("t")
        assert b.stats().shared.resolve.stale_served >= 2 and b.stats().shared.resolve.refused >= 2
        own_cluster.start()
        # reconnects by itself: everything works again, and nothing of the failed register is visible
        wait_until(lambda: a.stats().shared.resolve.up and b.stats().shared.resolve.up, timeout=10)
        with pytest.raises(AdapterNotFoundError):
            b.resolve("t", "never-seen")
        assert [x.name for x in b.list("t")] == ["early", "heard", "known"]
        assert a.register_bytes("t", "during", c2, w2).version == 1
        assert b.resolve("t", "during").load().rank == 4
        assert b.stats().shared.disconnects >= 1
    finally:
        a.close()
        b.close()


def test_a_replica_exports_the_documented_fleet_metrics(replicas):
    """What operators alert on (docs/operations.md): exported with a shared index, read from its stats."""
    from server.core.stats import EngineStats
    from server.metrics import ServerMetrics
    from tests.test_metrics import SHARED_INDEX_METRICS, documented_metrics, exported

    a, b = replicas(), replicas()
    c, w = make_adapter()
    a.register_bytes("t", "ad", c, w)
    wait_until(lambda: b.stats().shared.remote_changes == 1)
    assert resolves_to(b, "ad") == 1
    metrics = ServerMetrics()
    metrics.attach(EngineStats, b.stats)
    documented = documented_metrics()
    shared = {n: t for n, t in exported(metrics).items() if n in SHARED_INDEX_METRICS}
    assert shared == {n: documented[n] for n in SHARED_INDEX_METRICS}
    value, s = metrics.registry.get_sample_value, b.stats().shared
    assert value("loraserve_registry_index_up") == 1 and value("loraserve_registry_remote_changes_total") == 1
    assert value("loraserve_registry_resolve_cache_hits_total") == s.resolve.hits >= 1
    assert value("loraserve_registry_index_resyncs_total") == s.resyncs >= 1
    assert value("loraserve_registry_resolve_refused_total") == 0
