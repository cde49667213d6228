"""Authentication hardening over real gRPC on loopback: refusals counted by reason (the key never in a label
or a log line), keys compared in constant time, and one audit line per admin action."""
from __future__ import annotations

import asyncio
import json
import logging

import grpc

from server.api import tenants as tenants_module
from server.api.adapters_service import add_adapters_service
from server.api.auth import AuthInterceptor, TenantResolver
from server.api.gen.loraserve.v1 import adapters_pb2 as pb
from server.api.gen.loraserve.v1 import adapters_pb2_grpc as pb_grpc
from server.api.tenants import QuotaTracker, TenantDirectory, hash_key
from server.metrics import ServerMetrics
from tests.registry.adapters import make_adapter
from tests.registry.test_adapters_service import TENANTS, code_of, env, md, upload  # noqa: F401

SECRET = "wrong-but-secret-key-123"


async def start(reg, directory, metrics, engine):
    server = grpc.aio.server(interceptors=[AuthInterceptor(directory, QuotaTracker(),
                                                           on_refused=metrics.count_auth_failure)])
    add_adapters_service(server, reg, engine, tenant_resolver=TenantResolver(directory))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, grpc.aio.insecure_channel(f"127.0.0.1:{port}"), engine


def _metric(metrics: ServerMetrics, reason: str) -> float:
    return metrics.registry.get_sample_value("loraserve_auth_failures_total", {"reason": reason}) or 0.0


def test_refusals_are_counted_by_reason_and_never_show_the_key(env, caplog):
    reg, directory, _, engine = env
    metrics = ServerMetrics()
    caplog.set_level(logging.INFO)

    async def main():
        server, ch, _ = await start(reg, directory, metrics, engine)
        stub = pb_grpc.AdaptersStub(ch)
        attempts = {
            "missing_key": [[], [("authorization", f"Basic {SECRET}")]],
            "wrong_key": [md(SECRET), md(SECRET + "x")],
            "permission_denied": [md("alice-key", **{"x-loraserve-tenant": "bob"})],
            "unknown_tenant": [md("root-key", **{"x-loraserve-tenant": "nobody"})],
        }
        for reason, metadatas in attempts.items():
            for m in metadatas:
                code, msg = await code_of(stub.ListAdapters(pb.ListAdaptersRequest(), metadata=m))
                assert code != grpc.StatusCode.OK and SECRET not in msg
        assert (await stub.ListAdapters(pb.ListAdaptersRequest(), metadata=md("alice-key"))) is not None
        await ch.close()
        await server.stop(0)
        return attempts

    attempts = asyncio.run(main())
    for reason, metadatas in attempts.items():
        assert _metric(metrics, reason) == len(metadatas), reason
    from prometheus_client import generate_latest

    exported = generate_latest(metrics.registry).decode()
    assert SECRET not in exported and "alice-key" not in exported
    refused = [json.loads(r.getMessage()) for r in caplog.records if '"auth_refused"' in r.getMessage()]
    assert len(refused) == 6 and {r["reason"] for r in refused} == set(attempts)
    assert all(r["method"] == "/loraserve.v1.Adapters/ListAdapters" and r["peer"] for r in refused)
    assert not any(SECRET in r.getMessage() or "alice-key" in r.getMessage() for r in caplog.records)


def test_every_stored_hash_is_compared_whichever_key_matches(monkeypatch):
    """No early exit: the first tenant's key and a wrong key cost the same number of comparisons."""
    data = {"tenants": {f"t{i}": {"api_keys": [hash_key(f"key-{i}")]} for i in range(7)}}
    directory = TenantDirectory.from_dict(data)
    calls = []
    real = tenants_module.hmac.compare_digest
    monkeypatch.setattr(tenants_module.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    for key in ("key-0", "key-6", "nope"):
        calls.clear()
        try:
            assert directory.authenticate(key).name == "t" + key[-1]
        except tenants_module.AuthenticationError:
            assert key == "nope"
        assert len(calls) == 7, key


def test_admin_actions_write_one_audit_line_each(env, caplog):
    reg, directory, _, engine = env
    caplog.set_level(logging.INFO, logger="loraserve.audit")

    async def main():
        server, ch, _ = await start(reg, directory, ServerMetrics(), engine)
        stub = pb_grpc.AdaptersStub(ch)
        a, root = md("alice-key"), md("root-key")
        cfg, weights = make_adapter(seed=1)
        r = await stub.RegisterAdapter(upload("ad", cfg, weights), metadata=a)
        await stub.LoadAdapter(pb.LoadAdapterRequest(adapter_id="ad", pin=True), metadata=a)
        code, _ = await code_of(stub.DeleteAdapter(pb.DeleteAdapterRequest(adapter_id="ad"), metadata=a))
        assert code == grpc.StatusCode.FAILED_PRECONDITION  # pinned
        await stub.UnloadAdapter(pb.UnloadAdapterRequest(adapter_id="ad@1", tenant="alice"), metadata=root)
        await stub.DeleteAdapter(pb.DeleteAdapterRequest(adapter_id="ad"), metadata=a)
        code, _ = await code_of(stub.LoadAdapter(pb.LoadAdapterRequest(adapter_id="ad"), metadata=a))
        assert code == grpc.StatusCode.NOT_FOUND
        code, _ = await code_of(stub.RegisterAdapter(upload("Bad Name", cfg, weights), metadata=a))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        await ch.close()
        await server.stop(0)
        return r.version.digest

    digest = asyncio.run(main())
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "loraserve.audit"]
    got = [(x["action"], x["tenant"], x.get("caller"), x["adapter"], x.get("version"), x["outcome"]) for x in lines]
    assert got == [
        ("register", "alice", "alice", "ad", 1, "OK"),
        ("pin", "alice", "alice", "ad", 1, "OK"),
        ("delete", "alice", "alice", "ad", [1], "FAILED_PRECONDITION"),
        ("unload", "alice", "root", "ad@1", 1, "OK"),   # an admin acting for alice: both named
        ("delete", "alice", "alice", "ad", [1], "OK"),
        ("load", "alice", "alice", "ad", None, "NOT_FOUND"),
        ("register", "alice", "alice", "Bad Name", None, "INVALID_ARGUMENT"),
    ]
    assert lines[0]["digest"] == digest and lines[1]["digest"] == digest and lines[4]["digest"] == [digest]
    assert "pinned" in lines[2]["message"] and all(x["peer"] for x in lines)
    assert not any("alice-key" in r.getMessage() or "root-key" in r.getMessage() for r in caplog.records)
