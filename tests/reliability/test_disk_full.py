"""Disk full while an upload is written, through the real server: RESOURCE_EXHAUSTED naming the cause, the
registry intact (what was stored still serves, nothing half-visible, a restart finds it whole), and the next
upload after space returns succeeds. The registry is a 4 MiB tmpfs (skipped, saying why, where mounting is
not allowed)."""
from __future__ import annotations

import grpc
import pytest

from server.api.gen.loraserve.v1 import adapters_pb2 as apb
from tests.e2e.conftest import start_server
from tests.helpers import fill_filesystem, small_filesystem
from tests.registry.client import Client
from tests.reliability.conftest import TINY_SERVER_ARGS, adapter_bytes

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_an_upload_onto_a_full_disk(tmp_path, tiny_dir, tiny_config):
    env = {"LORASERVE_HOME": str(tmp_path / "home")}
    with small_filesystem(tmp_path / "registry", "4m") as disk:
        sp = start_server(tmp_path, "--model", str(tiny_dir), *TINY_SERVER_ARGS, env=env)
        try:
            c = Client(sp.target)
            c.register("kept", *adapter_bytes(tiny_config, 1))
            before = c.generate("kept", "hello", 6).token_ids
            big = adapter_bytes(tiny_config, 2, rank=32, targets=("q", "k", "v", "o", "gate", "up", "down"))
            filler = fill_filesystem(disk, leave=16 << 10)
            with pytest.raises(grpc.RpcError) as e:
                c.register("big", *big)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "disk is full" in e.value.details() and "No space left on device" in e.value.details()
            # Intact: what was stored serves as before; the refused upload left nothing visible or on disk.
            assert c.generate("kept", "hello", 6).token_ids == before
            listed = c.adapters.ListAdapters(apb.ListAdaptersRequest(), timeout=30)
            assert [(a.name, a.latest_version) for a in listed.adapters] == [("kept", 1)]
            assert not list((disk / "tmp").iterdir())
            filler.unlink()
            r = c.register("big", *big)  # space is back
            assert r.adapter_id == "big@1" and len(c.generate("big@1", "hello", 6).token_ids) == 6
            c.close()
        finally:
            assert sp.stop() == 0, sp.log_tail()
        audit = [r for r in sp.lines if r.get("event") == "audit" and r.get("adapter") == "big"]
        assert [a["outcome"] for a in audit] == ["RESOURCE_EXHAUSTED", "OK"]

        sp = start_server(tmp_path, "--model", str(tiny_dir), *TINY_SERVER_ARGS, env=env)  # a restart finds it whole
        try:
            c = Client(sp.target)
            listed = c.adapters.ListAdapters(apb.ListAdaptersRequest(), timeout=30)
            assert sorted((a.name, a.latest_version) for a in listed.adapters) == [("big", 1), ("kept", 1)]
            assert c.generate("kept", "hello", 6).token_ids == before
            c.close()
            assert not any("unfinished publishes" in line for line in sp.raw)
        finally:
            assert sp.stop() == 0, sp.log_tail()
