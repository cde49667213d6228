"""A full disk at any point of a publish: StorageFullError (RESOURCE_EXHAUSTED) naming the cause, nothing
half-stored, the registry readable, and the same upload succeeds once space returns.

The registry lives on a 4 MiB tmpfs; a filler file leaves 0 to 80 KiB free (the upload is 69 KiB), so the
failure lands while the object files are written or in SQLite's journal when the row is recorded.
"""
from __future__ import annotations


from adapter_registry import Registry
from server.core.errors import StorageFullError
from tests.helpers import fill_filesystem, small_filesystem

from .adapters import FINGERPRINT, TINY, make_adapter

LEAVE = list(range(0, 84 << 10, 4 << 10))  # 0 to 80 KiB free, 4 KiB apart


def test_every_fill_level_fails_cleanly_or_succeeds_and_space_brings_it_back(tmp_path):
    with small_filesystem(tmp_path / "disk", "4m") as disk:
        root = disk / "registry"
        reg = Registry(root, TINY, FINGERPRINT, 16, host_cache_bytes=1 << 20)
        base_cfg, base_w = make_adapter(seed=0)
        reg.register_bytes("t", "base", base_cfg, base_w)
        # Each level uploads new bytes (an identical upload would reuse the stored object and write no file).
        uploads = [make_adapter(rank=16, targets=("q", "k", "v", "o", "gate", "up", "down"), seed=100 + i)
                   for i in range(len(LEAVE))]
        outcomes = {}
        try:
            for i, leave in enumerate(LEAVE):
                big_cfg, big_w = uploads[i]
                filler = fill_filesystem(disk, leave)
                try:
                    info = reg.register_bytes("t", f"big{i}", big_cfg, big_w)
                    outcomes[leave] = f"stored {info.ref}"
                except StorageFullError as e:
                    outcomes[leave] = "full: journal" if "recording" in str(e) else "full: files"
                    assert "disk is full" in str(e) and "nothing was stored" in str(e)
                    assert [a.name for a in reg.list("t")].count(f"big{i}") == 0  # nothing half-visible
                    assert not list((root / "tmp").iterdir())                     # no temp left behind
                finally:
                    filler.unlink()
                # Space is back: the same upload goes through, and everything stored reads back.
                info = reg.register_bytes("t", f"big{i}", big_cfg, big_w)
                assert reg.resolve("t", info.ref).load().rank == 16
                assert reg.resolve("t", "base").load().rank == 4
                if i < len(LEAVE) - 1:
                    assert reg.delete("t", f"big{i}") == [1]  # the next level starts from the same disk
        finally:
            reg.close()
        print("\nfree bytes left -> outcome:", outcomes)
        assert {"full: files", "full: journal"} <= set(outcomes.values())
        # A restart finds a consistent registry: every version listed, no orphan to sweep.
        reg = Registry(root, TINY, FINGERPRINT, 16)
        try:
            stats = reg.stats()
            assert stats.startup_orphans_removed == 0 and stats.startup_temp_removed == 0
            assert sorted(a.name for a in reg.list("t")) == ["base", f"big{len(LEAVE) - 1}"]
        finally:
            reg.close()


def test_the_status_is_resource_exhausted():
    from server.api.errors import status_for
    import grpc

    code, message = status_for(StorageFullError("the registry's disk is full"))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "disk is full" in message
