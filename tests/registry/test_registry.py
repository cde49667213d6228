"""Registry behaviour without an engine: versions, tenants, quotas, deletes, imports, tiers.

Every test here runs against both index backends (SQLite directory, PostgreSQL + objects folder):
see the `open_registry` / `registry` fixtures in conftest.py.
"""
import gc
import os
import threading

import pytest
import torch

from adapter_registry import Registry
from server.api.tenants import TenantDirectory
from server.api.tenants import hash_key
from server.core.errors import (AdapterInUseError, AdapterLoadError, AdapterNotFoundError, AdapterRejectedError,
                           InvalidRequestError, PermissionDeniedError, QuotaExceededError, UnavailableError)
from server.lora.pool import AdapterPool
from server.lora.weights import load_peft_adapter

from .adapters import FINGERPRINT, TINY, make_adapter


def weights_equal(a, b):
    assert a.modules.keys() == b.modules.keys()
    for k in a.modules:
        assert torch.equal(a.modules[k].a, b.modules[k].a) and torch.equal(a.modules[k].b, b.modules[k].b)
        assert a.modules[k].scale == b.modules[k].scale


def test_register_resolve_and_versions(registry):
    c1, w1 = make_adapter(seed=1)
    c2, w2 = make_adapter(seed=2, rank=8, targets=("gate", "down"))
    v1 = registry.register_bytes("t", "ad", c1, w1, {"data": "x"})
    v2 = registry.register_bytes("t", "ad", c2, w2, {})
    assert (v1.version, v2.version) == (1, 2) and v1.digest != v2.digest
    assert v2.rank == 8 and v2.targets == ("gate", "down") and v1.metadata == {"data": "x"}
    latest = registry.resolve("t", "ad")
    assert (latest.name, latest.version, latest.digest) == ("ad", 2, v2.digest)
    assert registry.resolve("t", "ad@latest").version == 2
    old = registry.resolve("t", "ad@1")
    assert old.version == 1 and old.digest == v1.digest
    weights_equal(old.load(), registry._load_weights(v1.digest, "x"))
    assert old.load().rank == 4 and latest.load().rank == 8
    info = registry.get("t", "ad")
    assert info.latest_version == 2 and [v.version for v in info.versions] == [1, 2]
    assert [v.version for v in registry.get("t", "ad@1").versions] == [1]
    assert [a.name for a in registry.list("t")] == ["ad"]


def test_resolve_gives_one_identity_from_request_to_slot(registry):
    """What resolve hands on names the exact version (tenant, `name@N`, digest), whatever the id's form;
    two versions with identical bytes keep their own names but share the digest, i.e. one device slot."""
    c, w = make_adapter()
    registry.register_bytes("t", "ad", c, w)
    registry.register_bytes("t", "ad", c, w)
    latest, first = registry.resolve("t", "ad"), registry.resolve("t", "ad@1")
    assert (latest.tenant, latest.name, latest.version, latest.ref) == ("t", "ad", 2, "ad@2")
    assert latest == registry.resolve("t", "ad@latest") == registry.resolve("t", latest.ref)
    assert first.ref == "ad@1" and first != latest and first.digest == latest.digest
    assert [v.ref for v in registry.get("t", "ad").versions] == ["ad@1", "ad@2"]


def test_digest_covers_the_config(registry):
    c, w = make_adapter(alpha=8)
    c2, _ = make_adapter(alpha=16)
    a = registry.register_bytes("t", "a", c, w)
    b = registry.register_bytes("t", "b", c2, w)
    assert a.digest != b.digest  # same tensors, different scale: never one device slot
    assert registry.resolve("t", "a").load().modules[(0, "q")].scale * 2 == \
        registry.resolve("t", "b").load().modules[(0, "q")].scale
    same = registry.register_bytes("t", "c", c, w)
    assert same.digest == a.digest  # identical content is stored once


def test_tenants_are_isolated_with_identical_messages(registry):
    c, w = make_adapter()
    registry.register_bytes("alice", "secret", c, w)
    with pytest.raises(AdapterNotFoundError) as other:
        registry.resolve("bob", "secret")
    with pytest.raises(AdapterNotFoundError) as missing:
        registry.resolve("bob", "nothing-here")
    assert str(other.value) == "adapter 'secret' not found"
    assert str(missing.value) == "adapter 'nothing-here' not found"
    for op in (registry.get, registry.delete):
        with pytest.raises(AdapterNotFoundError, match="^adapter 'secret' not found$"):
            op("bob", "secret")
    assert registry.list("bob") == []
    with pytest.raises(AdapterNotFoundError):
        registry.resolve("alice", "secret@2")


def test_ids_are_never_paths(registry, tmp_path):
    c, w = make_adapter()
    for bad in ("../x", "a/b", "", "UPPER", "a" * 65):
        with pytest.raises(InvalidRequestError):
            registry.register_bytes("t", bad, c, w)
    with pytest.raises(InvalidRequestError):
        registry.register_bytes("../t", "a", c, w)
    with pytest.raises(InvalidRequestError):
        registry.resolve("t", "../../etc/passwd")
    files = {p.name for p in registry.root.rglob("*")}
    assert not any(n in files for n in ("a", "t", "x"))


def test_rejected_upload_leaves_nothing(registry, tmp_path):
    c, w = make_adapter()
    with pytest.raises(AdapterRejectedError):
        registry.register_bytes("t", "a", c, w[:-3])
    assert registry.list("t") == [] and list(registry.store.digests()) == []
    assert registry.stats().rejected == 1
    with pytest.raises(InvalidRequestError, match="metadata"):
        registry.register_bytes("t", "a", c, w, {f"k{i}": "v" for i in range(100)})


def test_delete_semantics_and_in_flight_versions(registry):
    c1, w1 = make_adapter(seed=1)
    c2, w2 = make_adapter(seed=2)
    v1 = registry.register_bytes("t", "ad", c1, w1)
    registry.register_bytes("t", "ad", c2, w2)
    in_flight = registry.resolve("t", "ad@1")   # a request already holds version 1
    registry.cache.discard(v1.digest)           # force the next load to come from disk
    assert registry.delete("t", "ad@1") == [1]
    with pytest.raises(AdapterNotFoundError):
        registry.resolve("t", "ad@1")
    assert registry.store.exists(v1.digest)      # kept for the in-flight request ...
    assert in_flight.load().rank == 4            # ... which still loads it
    del in_flight
    gc.collect()
    registry._gc.submit(lambda: None).result()   # removal runs on the registry's own thread
    assert not registry.store.exists(v1.digest)  # gone once nobody holds it
    # versions are never reused
    v3 = registry.register_bytes("t", "ad", c1, w1)
    assert v3.version == 3
    assert registry.delete("t", "ad") == [2, 3]
    assert registry.list("t") == []
    assert list(registry.store.digests()) == []
    with pytest.raises(AdapterNotFoundError):
        registry.delete("t", "ad")


def test_delete_refused_while_pinned(tmp_path):
    """Pins live in the device pool (by digest); the registry reports them and refuses the delete."""
    pool = AdapterPool(TINY, num_slots=2, max_rank=16, device=torch.device("cpu"), dtype=torch.float32)
    registry = Registry(tmp_path / "r", TINY, FINGERPRINT, 16, is_pinned=pool.is_pinned)
    c, w = make_adapter()
    registry.register_bytes("t", "ad", c, w)
    pool.load(registry.resolve("t", "ad"), pin=True)
    assert registry.get("t", "ad").versions[0].pinned
    with pytest.raises(AdapterInUseError, match="pinned"):
        registry.delete("t", "ad@1")
    with pytest.raises(AdapterInUseError):
        registry.delete("t", "ad")
    pool.unpin(registry.resolve("t", "ad@1").digest)
    assert not registry.get("t", "ad@1").versions[0].pinned
    assert registry.delete("t", "ad") == [1]
    pool.shutdown()
    registry.close()


def test_persistence(open_registry):
    c, w = make_adapter()
    reg = open_registry()
    reg.register_bytes("t", "a", c, w, {"k": "v"})
    reg.close()
    reg = open_registry()
    adapter = reg.resolve("t", "a")
    assert adapter.version == 1 and adapter.load().rank == 4
    assert reg.get("t", "a").versions[0].metadata == {"k": "v"}
    reg.close()
    # another base model: visible in list, refused at resolve time with the reason
    reg = open_registry(fingerprint="another-base")
    assert [a.name for a in reg.list("t")] == ["a"]
    with pytest.raises(AdapterRejectedError, match="registered for base model"):
        reg.resolve("t", "a")
    reg.close()


def test_single_writer_on_a_directory(tmp_path):
    reg = Registry(tmp_path / "r", TINY, FINGERPRINT, 16)
    with pytest.raises(UnavailableError, match="in use"):
        Registry(tmp_path / "r", TINY, FINGERPRINT, 16)
    reg.close()
    Registry(tmp_path / "r", TINY, FINGERPRINT, 16).close()


def test_many_writers_on_postgresql(pg_url, tmp_path):
    """No single-writer lock on the shared backend: replicas open the same index and objects folder at once."""
    a = Registry(pg_url, TINY, FINGERPRINT, 16, objects=tmp_path / "objects")
    b = Registry(pg_url, TINY, FINGERPRINT, 16, objects=tmp_path / "objects")
    try:
        c, w = make_adapter()
        assert a.register_bytes("t", "x", c, w).version == 1
        assert b.register_bytes("t", "x", c, w).version == 2
        assert b.resolve("t", "x@1").load().rank == 4
    finally:
        a.close()
        b.close()


def test_postgresql_needs_an_objects_folder(pg_url):
    with pytest.raises(InvalidRequestError, match="--objects"):
        Registry(pg_url, TINY, FINGERPRINT, 16)


def test_corrupted_object_is_a_load_error(registry):
    c, w = make_adapter()
    v = registry.register_bytes("t", "a", c, w)
    registry.cache.discard(v.digest)
    path = registry.store.path(v.digest) / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    os.chmod(path, 0o644)
    path.write_bytes(bytes(data))
    with pytest.raises(AdapterLoadError, match="do not match digest"):
        registry.resolve("t", "a").load()


def test_register_path_only_inside_import_dirs(registry, tmp_path):
    imports = tmp_path / "imports"
    c, w = make_adapter()

    def write(d):
        d.mkdir(parents=True)
        (d / "adapter_config.json").write_bytes(c)
        (d / "adapter_model.safetensors").write_bytes(w)
        return d

    inside = write(imports / "good")
    outside = write(tmp_path / "outside")
    assert registry.register_path("t", "good", inside).version == 1
    for p in (outside, imports / ".." / "outside", tmp_path / "nope", imports / "missing"):
        with pytest.raises(PermissionDeniedError, match="not an adapter directory inside an import directory"):
            registry.register_path("t", "x", p)
    (imports / "link").symlink_to(outside)       # a directory symlink out of the import dir
    with pytest.raises(PermissionDeniedError):
        registry.register_path("t", "x", imports / "link")
    sneaky = imports / "sneaky"
    sneaky.mkdir()
    (sneaky / "adapter_config.json").write_bytes(c)
    (sneaky / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    with pytest.raises(PermissionDeniedError):
        registry.register_path("t", "x", sneaky)
    binonly = imports / "bin"
    binonly.mkdir()
    (binonly / "adapter_config.json").write_bytes(c)
    (binonly / "adapter_model.bin").write_bytes(b"PK\x03\x04")
    with pytest.raises(AdapterRejectedError, match="convert it with"):
        registry.register_path("t", "x", binonly)
    # the server's own start-up flags may name any path, and are told exactly what is wrong with it
    assert registry.register_path("t", "boot", outside, allow_any_path=True).version == 1
    with pytest.raises(AdapterRejectedError, match="does not exist"):
        registry.register_path("t", "boot", tmp_path / "typo", allow_any_path=True)
    with pytest.raises(AdapterRejectedError, match="is not a directory"):
        registry.register_path("t", "boot", outside / "adapter_config.json", allow_any_path=True)
    with pytest.raises(PermissionDeniedError, match="not an adapter directory inside"):  # a caller learns nothing
        registry.register_path("t", "x", imports / "typo")
    # the stored weights are exactly PEFT's reading of the directory
    weights_equal(registry.resolve("t", "good").load(), load_peft_adapter(inside, TINY, 16))


def test_server_paths_disabled_without_import_dirs(open_registry, tmp_path):
    reg = open_registry()
    with pytest.raises(PermissionDeniedError, match="--import-dir"):
        reg.register_path("t", "x", tmp_path)
    reg.close()


def test_stored_adapter_quotas(open_registry):
    tenants = TenantDirectory.from_dict({"tenants": {
        "small": {"api_keys": [hash_key("k1")], "max_adapters": 2, "max_adapter_versions": 3}}})
    reg = open_registry(tenants=tenants)
    c, w = make_adapter()
    reg.register_bytes("small", "a", c, w)
    reg.register_bytes("small", "b", c, w)
    with pytest.raises(QuotaExceededError, match="max_adapters"):
        reg.register_bytes("small", "c", c, w)
    reg.register_bytes("small", "a", c, w)  # a new version of an existing name is fine ...
    with pytest.raises(QuotaExceededError, match="max_adapter_versions"):  # ... up to the version quota
        reg.register_bytes("small", "a", c, w)
    reg.delete("small", "b")
    assert reg.register_bytes("small", "c", c, w).version == 1
    reg.close()


def test_concurrent_publishes_get_distinct_versions(registry):
    c, w = make_adapter()
    out, errors = [], []

    def pub(i):
        try:
            cc, ww = make_adapter(seed=i)
            out.append(registry.register_bytes("t", "ad", cc, ww).version)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=pub, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and sorted(out) == list(range(1, 9))


def test_host_tier_lru_and_counters(open_registry):
    c, w = make_adapter(rank=4)
    size = make_weights_size(c, w)
    reg = open_registry(host_cache_bytes=int(size * 2.5))
    specs = []
    for i in range(4):
        ci, wi = make_adapter(seed=i)
        reg.register_bytes("t", f"a{i}", ci, wi)
        specs.append(reg.resolve("t", f"a{i}"))
    s = reg.stats().host
    assert s.entries == 2 and s.evictions == 2 and s.bytes <= size * 2.5
    for i in (3, 2, 0, 0):    # a2, a3 were warmed at register (hits); a0 comes from disk once
        specs[i].load()
    s = reg.stats().host
    assert (s.loads, s.misses, s.hits) == (1, 1, 3)
    assert s.hit_rate == 0.75 and s.load_seconds > 0 and s.evictions == 3
    info = {a.name: a.versions[0].in_host_memory for a in reg.list("t")}
    assert info == {"a0": True, "a1": False, "a2": True, "a3": False}
    reg.close()


def make_weights_size(c, w):
    from adapter_registry.validate import RegistryLimits, validate_adapter
    return validate_adapter(c, w, TINY, 16, RegistryLimits()).weights.nbytes


def test_concurrent_misses_load_once(registry):
    c, w = make_adapter()
    v = registry.register_bytes("t", "a", c, w)
    registry.cache.discard(v.digest)
    adapter = registry.resolve("t", "a")
    before = registry.stats().host.loads
    results = []
    threads = [threading.Thread(target=lambda: results.append(adapter.load())) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert registry.stats().host.loads == before + 1
    assert all(r is results[0] for r in results)


def test_reuse_identical_latest(registry):
    c, w = make_adapter(seed=1)
    c2, w2 = make_adapter(seed=2)
    assert registry.register_bytes("t", "a", c, w, reuse_identical_latest=True).version == 1
    assert registry.register_bytes("t", "a", c, w, reuse_identical_latest=True).version == 1
    assert registry.register_bytes("t", "a", c2, w2, reuse_identical_latest=True).version == 2
    assert registry.register_bytes("t", "a", c, w, reuse_identical_latest=True).version == 3
    assert registry.register_bytes("t", "a", c, w).version == 4
