"""The Adapters service and the auth interceptor over real gRPC on loopback (fake engine pool).

The fake pool records loads, pins and unloads exactly as the engine's AdapterPool API
does; the fake Inference servicer lets the quota and tenant checks run without a model.
"""
import asyncio
import hashlib

import grpc
import pytest

from adapter_registry import Registry
from server.api.tenants import QuotaTracker, TenantDirectory
from server.api.tenants import hash_key
from server.api.adapters_service import add_adapters_service
from server.api.auth import AuthInterceptor, TenantResolver
from server.api.gen.loraserve.v1 import adapters_pb2 as pb
from server.api.gen.loraserve.v1 import adapters_pb2_grpc as pb_grpc
from server.api.gen.loraserve.v1 import inference_pb2 as ipb
from server.api.gen.loraserve.v1 import inference_pb2_grpc as ipb_grpc
from server.core.errors import AdapterInUseError

from .adapters import FINGERPRINT, TINY, make_adapter

TENANTS = {"tenants": {
    "alice": {"api_keys": [hash_key("alice-key")], "max_adapters": 2, "max_concurrent_requests": 2,
              "max_tokens_per_minute": 50},
    "bob": {"api_keys": ["sha256:" + hash_key("bob-key")]},
    "root": {"api_keys": [hash_key("root-key")], "role": "admin"},
}}


class Slot:
    def __init__(self, key, pinned=False):
        self.key, self.pinned, self.state, self.refcount = key, pinned, "ready", 0


class FakePool:
    def __init__(self):
        self.slots: dict[str, Slot] = {}
        self.loaded = []

    def load(self, adapter, pin=False, timeout=None):
        w = adapter.load()  # the registry's loader really runs (host tier, digest check)
        assert w.rank > 0
        self.loaded.append((adapter.name, adapter.version))
        slot = self.slots.setdefault(adapter.digest, Slot(adapter.digest))
        slot.pinned = slot.pinned or pin
        return 1

    def unpin(self, key):
        if key in self.slots:
            self.slots[key].pinned = False

    def is_pinned(self, key):
        return key in self.slots and self.slots[key].pinned

    def unload(self, key):
        slot = self.slots.get(key)
        if slot is None:
            return False
        if slot.refcount:
            raise AdapterInUseError("in use")
        del self.slots[key]
        return True

    def resident(self):
        return list(self.slots.values())


class FakeEngine:
    def __init__(self):
        self.pool = FakePool()


class FakeInference(ipb_grpc.InferenceServicer):
    def __init__(self, resolver):
        self.resolver = resolver
        self.release = asyncio.Event()
        self.seen = []

    async def Generate(self, request, context):
        self.seen.append(self.resolver(context))
        await asyncio.wait_for(self.release.wait(), 5)
        return ipb.GenerateResponse(text="x", usage=ipb.Usage(prompt_tokens=10, completion_tokens=20))

    async def GenerateStream(self, request, context):
        self.seen.append(self.resolver(context))
        for _ in range(3):
            yield ipb.GenerateStreamResponse(token_ids=[1, 2])
        yield ipb.GenerateStreamResponse(usage=ipb.Usage(prompt_tokens=4, completion_tokens=6))


@pytest.fixture
def env(tmp_path):
    directory = TenantDirectory.from_dict(TENANTS)
    imports = tmp_path / "imports"
    imports.mkdir()
    engine = FakeEngine()
    reg = Registry(tmp_path / "reg", TINY, FINGERPRINT, 16, import_dirs=[imports], tenants=directory,
                   is_pinned=engine.pool.is_pinned)
    yield reg, directory, imports, engine
    reg.close()


def run(coro):
    return asyncio.run(coro)


async def start(reg, directory, engine):
    resolver = TenantResolver(directory)
    server = grpc.aio.server(interceptors=[AuthInterceptor(directory, QuotaTracker())])
    add_adapters_service(server, reg, engine, tenant_resolver=resolver)
    infer = FakeInference(resolver)
    ipb_grpc.add_InferenceServicer_to_server(infer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    return server, channel, engine, infer


def md(key, **extra):
    out = [("authorization", f"Bearer {key}")] if key else []
    return out + list(extra.items())


def upload(name, cfg, weights, chunk=1000, **header):
    yield pb.RegisterAdapterRequest(header=pb.RegisterAdapterHeader(
        name=name, adapter_config_json=cfg.decode(), metadata={"src": "test"}, **header))
    for i in range(0, len(weights), chunk):
        yield pb.RegisterAdapterRequest(chunk=weights[i:i + chunk])


async def code_of(awaitable):
    try:
        await awaitable
    except grpc.aio.AioRpcError as e:
        return e.code(), e.details()
    return grpc.StatusCode.OK, ""


def test_register_load_pin_delete_flow(env):
    reg, directory, _, engine = env

    async def main():
        server, ch, _, _ = await start(reg, directory, engine)
        stub = pb_grpc.AdaptersStub(ch)
        a = md("alice-key")
        c1, w1 = make_adapter(seed=1)
        r = await stub.RegisterAdapter(upload("ad", c1, w1, total_size=len(w1)), metadata=a)
        assert (r.adapter_id, r.version.version, r.version.rank) == ("ad@1", 1, 4)
        assert r.version.tier == pb.TIER_HOST and list(r.version.targets) == ["q", "v"]
        c2, w2 = make_adapter(seed=2, rank=8)
        r2 = await stub.RegisterAdapter(upload("ad", c2, w2), metadata=a)
        assert r2.adapter_id == "ad@2"
        loaded = await stub.LoadAdapter(pb.LoadAdapterRequest(adapter_id="ad@1", pin=True), metadata=a)
        assert loaded.adapter_id == "ad@1" and loaded.pinned and engine.pool.loaded == [("ad", 1)]
        info = await stub.GetAdapter(pb.GetAdapterRequest(adapter_id="ad"), metadata=a)
        tiers = {v.version: (v.tier, v.pinned) for v in info.versions}
        assert info.latest_version == 2 and tiers == {1: (pb.TIER_DEVICE, True), 2: (pb.TIER_HOST, False)}
        assert info.versions[0].metadata["src"] == "test" and len(info.versions[0].digest) == 64
        code, msg = await code_of(stub.DeleteAdapter(pb.DeleteAdapterRequest(adapter_id="ad@1"), metadata=a))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "pinned" in msg
        code, _ = await code_of(stub.DeleteAdapter(pb.DeleteAdapterRequest(adapter_id="ad"), metadata=a))
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        un = await stub.UnloadAdapter(pb.UnloadAdapterRequest(adapter_id="ad@1"), metadata=a)
        assert un.was_on_device and engine.pool.slots == {}
        d = await stub.DeleteAdapter(pb.DeleteAdapterRequest(adapter_id="ad@1"), metadata=a)
        assert list(d.deleted_versions) == [1]
        lst = await stub.ListAdapters(pb.ListAdaptersRequest(), metadata=a)
        assert [(x.name, [v.version for v in x.versions]) for x in lst.adapters] == [("ad", [2])]
        await ch.close()
        await server.stop(0)

    run(main())


def test_authentication_and_isolation(env):
    reg, directory, _, engine = env

    async def main():
        server, ch, _, infer = await start(reg, directory, engine)
        stub = pb_grpc.AdaptersStub(ch)
        istub = ipb_grpc.InferenceStub(ch)
        for bad in ([], md("wrong-key"), [("authorization", "Basic alice-key")], [("authorization", "Bearer ")]):
            code, _ = await code_of(stub.ListAdapters(pb.ListAdaptersRequest(), metadata=bad))
            assert code == grpc.StatusCode.UNAUTHENTICATED
            code, _ = await code_of(istub.Generate(ipb.GenerateRequest(prompt="x"), metadata=bad))
            assert code == grpc.StatusCode.UNAUTHENTICATED
        c, w = make_adapter()
        await stub.RegisterAdapter(upload("private", c, w), metadata=md("alice-key"))
        bob = md("bob-key")
        got = await code_of(stub.GetAdapter(pb.GetAdapterRequest(adapter_id="private"), metadata=bob))
        missing = await code_of(stub.GetAdapter(pb.GetAdapterRequest(adapter_id="nope"), metadata=bob))
        assert got == (grpc.StatusCode.NOT_FOUND, "adapter 'private' not found")
        assert missing == (grpc.StatusCode.NOT_FOUND, "adapter 'nope' not found")
        for call in (stub.LoadAdapter(pb.LoadAdapterRequest(adapter_id="private"), metadata=bob),
                     stub.DeleteAdapter(pb.DeleteAdapterRequest(adapter_id="private@1"), metadata=bob),
                     stub.UnloadAdapter(pb.UnloadAdapterRequest(adapter_id="private"), metadata=bob)):
            assert (await code_of(call))[0] == grpc.StatusCode.NOT_FOUND
        assert (await stub.ListAdapters(pb.ListAdaptersRequest(), metadata=bob)).adapters == []
        # acting for another tenant: only admins
        code, msg = await code_of(stub.ListAdapters(pb.ListAdaptersRequest(tenant="alice"), metadata=bob))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        code, _ = await code_of(stub.ListAdapters(pb.ListAdaptersRequest(), metadata=md("bob-key", **{
            "x-loraserve-tenant": "alice"})))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        root = md("root-key")
        code, msg = await code_of(stub.ListAdapters(pb.ListAdaptersRequest(tenant="ghost"), metadata=root))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "not in the tenants file" in msg
        seen = await stub.ListAdapters(pb.ListAdaptersRequest(tenant="alice"), metadata=root)
        assert [a.name for a in seen.adapters] == ["private"]
        # the inference servicer learns the caller's tenant
        infer.release.set()
        await istub.Generate(ipb.GenerateRequest(prompt="x"), metadata=bob)
        await istub.Generate(ipb.GenerateRequest(prompt="x"), metadata=md("root-key", **{"x-loraserve-tenant": "bob"}))
        assert infer.seen == ["bob", "bob"]
        await ch.close()
        await server.stop(0)

    run(main())


def test_quotas(env):
    reg, directory, _, engine = env

    async def main():
        server, ch, _, infer = await start(reg, directory, engine)
        stub = pb_grpc.AdaptersStub(ch)
        istub = ipb_grpc.InferenceStub(ch)
        a = md("alice-key")
        c, w = make_adapter()
        await stub.RegisterAdapter(upload("one", c, w), metadata=a)
        await stub.RegisterAdapter(upload("two", c, w), metadata=a)
        code, msg = await code_of(stub.RegisterAdapter(upload("three", c, w), metadata=a))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_adapters" in msg
        # concurrent requests: two run, the third is refused naming the limit
        running = [asyncio.ensure_future(istub.Generate(ipb.GenerateRequest(prompt="x"), metadata=a))
                   for _ in range(2)]
        while len(infer.seen) < 2:
            await asyncio.sleep(0.01)
        code, msg = await code_of(istub.Generate(ipb.GenerateRequest(prompt="x"), metadata=a))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_concurrent_requests" in msg
        # another tenant is not affected by alice's limit
        running.append(asyncio.ensure_future(istub.Generate(ipb.GenerateRequest(prompt="x"), metadata=md("bob-key"))))
        while len(infer.seen) < 3:
            await asyncio.sleep(0.01)
        assert infer.seen == ["alice", "alice", "bob"]
        infer.release.set()
        await asyncio.gather(*running)     # 2 x 30 tokens charged: over the 50 tokens/minute quota
        code, msg = await code_of(istub.Generate(ipb.GenerateRequest(prompt="x"), metadata=a))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_tokens_per_minute" in msg
        code, msg = await code_of(_drain(istub.GenerateStream(ipb.GenerateRequest(prompt="x"), metadata=a)))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_tokens_per_minute" in msg
        # bob has no quotas; his streams are charged from the final usage
        for _ in range(3):
            assert (await code_of(_drain(istub.GenerateStream(ipb.GenerateRequest(prompt="x"),
                                                              metadata=md("bob-key")))))[0] == grpc.StatusCode.OK
        await ch.close()
        await server.stop(0)

    run(main())


async def _drain(call):
    async for _ in call:
        pass


def test_bad_uploads_are_invalid_argument(env):
    reg, directory, imports, engine = env

    async def main():
        server, ch, _, _ = await start(reg, directory, engine)
        stub = pb_grpc.AdaptersStub(ch)
        a = md("bob-key")
        c, w = make_adapter()

        async def status(requests):
            return await code_of(stub.RegisterAdapter(iter(requests), metadata=a))

        hdr = lambda **kw: pb.RegisterAdapterRequest(header=pb.RegisterAdapterHeader(**kw))  # noqa: E731
        chunk = lambda b: pb.RegisterAdapterRequest(chunk=b)  # noqa: E731
        cases = {
            "no header": [chunk(w)],
            "empty stream": [],
            "bad name": [hdr(name="../x", adapter_config_json=c.decode()), chunk(w)],
            "truncated": [hdr(name="x", adapter_config_json=c.decode()), chunk(w[:-10])],
            "size mismatch": [hdr(name="x", adapter_config_json=c.decode(), total_size=len(w) + 1), chunk(w)],
            "no weights": [hdr(name="x", adapter_config_json=c.decode())],
            "two headers": [hdr(name="x", adapter_config_json=c.decode()), hdr(name="y")],
            "bad config": [hdr(name="x", adapter_config_json="{nope"), chunk(w)],
            "pickle": [hdr(name="x", adapter_config_json=c.decode()), chunk(b"PK\x03\x04" + b"\0" * 64)],
            "dora": [hdr(name="x", adapter_config_json=make_adapter(extra_config={"use_dora": True})[0].decode()),
                     chunk(w)],
            "path plus chunks": [hdr(name="x", server_path=str(imports)), chunk(w)],
        }
        for what, reqs in cases.items():
            code, msg = await status(reqs)
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (what, code, msg)
        code, msg = await status([hdr(name="x", server_path="/etc")])
        assert code == grpc.StatusCode.PERMISSION_DENIED
        d = imports / "ok"
        d.mkdir()
        (d / "adapter_config.json").write_bytes(c)
        (d / "adapter_model.safetensors").write_bytes(w)
        r = await stub.RegisterAdapter(iter([hdr(name="frompath", server_path=str(d))]), metadata=a)
        assert r.adapter_id == "frompath@1"
        assert reg.list("bob")[0].name == "frompath" and len(reg.list("bob")) == 1
        await ch.close()
        await server.stop(0)

    run(main())


def test_hash_format():
    assert hash_key("k") == hashlib.sha256(b"k").hexdigest()
    with pytest.raises(Exception, match="sha256"):
        TenantDirectory.from_dict({"tenants": {"a": {"api_keys": ["plain-key"]}}})
