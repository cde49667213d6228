"""`loraserve adapters ...` against a real in-process gRPC server (real registry, fake device pool).

People get a table or one line; `-o json` / `--json` get the record a script parses; errors go to
stderr with the gRPC status and exit 1. The server runs on its own event loop in a thread because
the CLI is a blocking client.
"""
from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Iterator

import grpc
import pytest

from adapter_registry import Registry
from server import cli
from server.api.adapters_service import add_adapters_service
from server.api.auth import AuthInterceptor, TenantResolver
from server.api.tenants import QuotaTracker, TenantDirectory
from server.client import render
from tests.registry.adapters import FINGERPRINT, TINY, make_adapter
from tests.registry.test_adapters_service import TENANTS, FakeEngine


@pytest.fixture
def target(tmp_path: Path) -> Iterator[str]:
    directory = TenantDirectory.from_dict(TENANTS)
    engine = FakeEngine()
    reg = Registry(tmp_path / "reg", TINY, FINGERPRINT, 16, tenants=directory, is_pinned=engine.pool.is_pinned)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server(interceptors=[AuthInterceptor(directory, QuotaTracker())])
        add_adapters_service(server, reg, engine, tenant_resolver=TenantResolver(directory))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    yield f"127.0.0.1:{port}"
    asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()
    reg.close()


def adapter_dir(root: Path, name: str, **kw) -> Path:
    cfg, weights = make_adapter(**kw)
    d = root / name
    d.mkdir()
    (d / "adapter_config.json").write_bytes(cfg)
    (d / "adapter_model.safetensors").write_bytes(weights)
    return d


def run(capsys: pytest.CaptureFixture, target: str, *argv: str, key: str = "alice-key") -> tuple[int, str, str]:
    rc = cli.main(["adapters", *argv, "--target", target, "--api-key", key])
    out, err = capsys.readouterr()
    return rc, out, err


def test_list_and_get_print_tables_and_json_on_request(target, tmp_path, capsys) -> None:
    rc, out, _ = run(capsys, target, "list")
    assert rc == 0 and out == "No adapters registered.\n"

    small = adapter_dir(tmp_path, "small", rank=4, targets=("q", "v"), seed=1)
    big = adapter_dir(tmp_path, "big", rank=8, targets=("q", "k", "v", "o", "gate", "up", "down"), seed=2)
    rc, out, _ = run(capsys, target, "register", "support", str(small), "--meta", "owner=team-a")
    assert rc == 0
    assert out.startswith("registered support@1 (digest ") and ", rank 4, 2 targets, " in out
    assert out.count("\n") == 1 and "KiB)" in out
    rc, out, _ = run(capsys, target, "register", "support", str(big))
    assert rc == 0 and "registered support@2" in out and "rank 8, 7 targets" in out

    rc, out, _ = run(capsys, target, "list")
    lines = out.splitlines()
    assert rc == 0 and len(lines) == 2
    assert lines[0].split() == ["NAME", "TENANT", "LATEST", "VERSIONS", "RANK", "TARGETS", "SIZE", "TIER"]
    row = lines[1].split()
    assert row[:6] == ["support", "alice", "@2", "2", "8", "q,k,v,o,gate,up,down"] and row[-1] == "host"
    assert row[-2] == "KiB"

    for flag in (["--json"], ["-o", "json"], ["--output", "json"]):
        rc, out, _ = run(capsys, target, "list", *flag)
        listed = json.loads(out)
        assert rc == 0 and [a["name"] for a in listed["adapters"]] == ["support"]
        assert listed["adapters"][0]["versions"][0]["metadata"] == {"owner": "team-a"}

    rc, out, _ = run(capsys, target, "get", "support")
    lines = out.splitlines()
    assert rc == 0 and len(lines) == 3
    assert lines[0].split() == ["ADAPTER", "TENANT", "DIGEST", "RANK", "TARGETS", "SIZE", "CREATED", "TIER",
                                "PINNED", "METADATA"]
    first = lines[1].split()
    assert first[0] == "support@1" and first[1] == "alice" and len(first[2]) == 12
    assert first[3:5] == ["4", "q,v"] and first[-3:] == ["host", "no", "1"]

    rc, out, _ = run(capsys, target, "get", "support@2", "-o", "json")
    info = json.loads(out)
    assert rc == 0 and [v["version"] for v in info["versions"]] == [2] and len(info["versions"][0]["digest"]) == 64

    rc, out, _ = run(capsys, target, "get", "support@1", "-o", "wide")
    assert rc == 0 and "owner=team-a" in out and FINGERPRINT in out and "BASE MODEL" in out


def test_load_unload_delete_print_one_line(target, tmp_path, capsys) -> None:
    d = adapter_dir(tmp_path, "a", seed=3)
    assert run(capsys, target, "register", "ad", str(d))[0] == 0
    assert run(capsys, target, "register", "ad", str(adapter_dir(tmp_path, "b", seed=4)))[0] == 0

    rc, out, _ = run(capsys, target, "load", "ad@1", "--pin")
    assert rc == 0 and out.startswith("loaded ad@1 onto the device in ") and out.endswith("s (pinned)\n")
    rc, out, _ = run(capsys, target, "list", "-o", "wide")
    header, row = out.splitlines()
    assert header.split()[-3:] == ["DIGEST", "CREATED", "PINNED"] and row.split()[-1] == "@1"

    rc, out, err = run(capsys, target, "delete", "ad@1")
    assert rc == 1 and out == "" and err.startswith("error: FAILED_PRECONDITION: ") and "pinned" in err

    rc, out, _ = run(capsys, target, "unload", "ad@1")
    assert rc == 0 and out == "unloaded ad@1 from the device (still registered)\n"
    rc, out, _ = run(capsys, target, "unload", "ad@1", "--json")
    assert rc == 0 and json.loads(out) == {"adapter_id": "ad@1"}  # proto3 JSON leaves out was_on_device=false

    rc, out, _ = run(capsys, target, "delete", "ad", "-o", "json")
    assert rc == 0 and json.loads(out) == {"deleted_versions": [1, 2]}
    rc, out, _ = run(capsys, target, "list")
    assert out == "No adapters registered.\n"


def test_admin_lists_for_a_tenant_and_errors_go_to_stderr(target, tmp_path, capsys) -> None:
    assert run(capsys, target, "register", "secret", str(adapter_dir(tmp_path, "s")))[0] == 0
    rc, out, _ = run(capsys, target, "list", "--tenant", "bob", key="root-key")
    assert rc == 0 and out == "No adapters registered for tenant 'bob'.\n"
    rc, out, _ = run(capsys, target, "list", "--tenant", "alice", key="root-key")
    assert out.splitlines()[1].split()[:2] == ["secret", "alice"]

    rc, out, err = run(capsys, target, "get", "secret", key="bob-key")
    assert (rc, out, err) == (1, "", "error: NOT_FOUND: adapter 'secret' not found\n")
    rc, out, err = run(capsys, target, "get", "secret", "-o", "json", key="bob-key")
    assert rc == 1 and out == "" and "NOT_FOUND" in err


def test_render_helpers() -> None:
    assert [render.human_size(n) for n in (0, 1023, 1024, 1536, 12 << 20, 5 << 30)] == [
        "0 B", "1023 B", "1.0 KiB", "1.5 KiB", "12.0 MiB", "5.0 GiB"]
    assert render.short_list(["q", "k", "v", "o", "gate", "up", "down"]) == "q,k,v,o,gate,up,down"
    assert render.short_list(["q", "k", "v", "o", "gate", "up", "down"], max_chars=12) == "q,k,v,o,+3"
    assert render.short_list(["a_very_long_name", "b"], max_chars=5) == "a_very_long_name,+1"
    assert render.short_list([]) == "-"
    assert render.timestamp(0) == "-" and render.timestamp(86400 * 365) == "1971-01-01 00:00Z"
    text = render.table([render.Column("NAME"), render.Column("SIZE", right=True)], [["a", "1 B"], ["long", ""]])
    assert text.splitlines() == ["NAME   SIZE", "a       1 B", "long      -"]
