"""Garbage on the wire: every RPC fed random and mutated bytes through a raw channel (no serializers), and
every POST route of the HTTP API fed random and mutated bodies.

Bytes that do not decode as the RPC's message must get INVALID_ARGUMENT naming the message type; bytes
that do decode (a mutated valid request often still parses) get whatever status the servicer gives a
client's bad input. Never UNKNOWN or INTERNAL, never a hang, and the server serves normally afterwards.
"""
from __future__ import annotations

import json
import random
import time
from collections import Counter

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from server.api.gen.loraserve.v1 import adapters_pb2 as apb
from server.api.gen.loraserve.v1 import inference_pb2 as ipb
from tests.e2e.conftest import start_server
from tests.registry.client import Client, upload_requests
from tests.reliability.conftest import TINY_SERVER_ARGS, adapter_bytes

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PAYLOADS_PER_RPC = 120  # half random bytes, half mutations of a valid request
CALL_TIMEOUT_S = 30.0
# What a client's own bad input may get; anything else (UNKNOWN, INTERNAL, a deadline = a hang) fails.
INPUT_CODES = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
               grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.FAILED_PRECONDITION,
               grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.OUT_OF_RANGE}


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_dir, tiny_config):
    tmp = tmp_path_factory.mktemp("garbage")
    sp = start_server(tmp, "--model", str(tiny_dir), *TINY_SERVER_ARGS, "--max-batch-size", "8",
                      env={"LORASERVE_HOME": str(tmp / "home")})
    c = Client(sp.target)
    cfg, weights = adapter_bytes(tiny_config, seed=1)
    c.register("fuzz", cfg, weights)
    c.close()
    yield sp
    assert sp.stop() == 0, sp.log_tail()


def valid_requests(tiny_config) -> dict[str, list[bytes]]:
    """One valid serialized request per RPC (a list of messages for client-streamed ones)."""
    params = ipb.SamplingParams(max_new_tokens=4, ignore_eos=True)
    cfg, weights = adapter_bytes(tiny_config, seed=2)
    upload = [m.SerializeToString() for m in upload_requests("fuzzed", cfg, weights, chunk=4096)]
    return {
        "/loraserve.v1.Inference/Generate": [ipb.GenerateRequest(adapter_id="fuzz", prompt="hello",
                                                                 params=params).SerializeToString()],
        "/loraserve.v1.Inference/GenerateStream": [ipb.GenerateRequest(
            prompt_token_ids=ipb.TokenIds(ids=[5, 6, 7]), params=params).SerializeToString()],
        "/loraserve.v1.Inference/Tokenize": [ipb.TokenizeRequest(prompt="hello").SerializeToString()],
        "/loraserve.v1.Inference/ModelInfo": [ipb.ModelInfoRequest().SerializeToString()],
        "/loraserve.v1.Adapters/RegisterAdapter": upload,
        "/loraserve.v1.Adapters/LoadAdapter": [apb.LoadAdapterRequest(adapter_id="fuzz@1").SerializeToString()],
        "/loraserve.v1.Adapters/UnloadAdapter": [apb.UnloadAdapterRequest(adapter_id="fuzz").SerializeToString()],
        "/loraserve.v1.Adapters/ListAdapters": [apb.ListAdaptersRequest().SerializeToString()],
        "/loraserve.v1.Adapters/GetAdapter": [apb.GetAdapterRequest(adapter_id="fuzz").SerializeToString()],
        "/loraserve.v1.Adapters/DeleteAdapter": [apb.DeleteAdapterRequest(adapter_id="fuzzed@1").SerializeToString()],
        "/grpc.health.v1.Health/Check": [health_pb2.HealthCheckRequest(service="").SerializeToString()],
        "/grpc.health.v1.Health/Watch": [health_pb2.HealthCheckRequest(service="").SerializeToString()],
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": [
            reflection_pb2.ServerReflectionRequest(list_services="").SerializeToString()],
    }


REQUEST_TYPES = {
    "Generate": ipb.GenerateRequest, "GenerateStream": ipb.GenerateRequest, "Tokenize": ipb.TokenizeRequest,
    "ModelInfo": ipb.ModelInfoRequest, "RegisterAdapter": apb.RegisterAdapterRequest,
    "LoadAdapter": apb.LoadAdapterRequest, "UnloadAdapter": apb.UnloadAdapterRequest,
    "ListAdapters": apb.ListAdaptersRequest, "GetAdapter": apb.GetAdapterRequest,
    "DeleteAdapter": apb.DeleteAdapterRequest, "Check": health_pb2.HealthCheckRequest,
    "Watch": health_pb2.HealthCheckRequest,
    "ServerReflectionInfo": reflection_pb2.ServerReflectionRequest,
}
CLIENT_STREAMING = {"RegisterAdapter", "ServerReflectionInfo"}
SERVER_STREAMING = {"GenerateStream", "Watch", "ServerReflectionInfo"}
ENDLESS = {"Watch"}  # a health watch streams until cancelled: the first answer is what we check


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One to four byte-level edits: flip, overwrite, insert, delete, truncate, duplicate a slice."""
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        i = rng.randrange(len(b) + 1)
        if op == 0 and b:
            b[i % len(b)] ^= 1 << rng.randrange(8)
        elif op == 1 and b:
            b[i % len(b)] = rng.randrange(256)
        elif op == 2:
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 3 and b:
            del b[i:i + rng.randint(1, 8)]
        elif op == 4:
            del b[i:]
        else:
            j = rng.randrange(len(b) + 1)
            b[i:i] = b[min(i, j):max(i, j)][:64]
    return bytes(b)


def decodes(name: str, payload: bytes) -> bool:
    try:
        REQUEST_TYPES[name].FromString(payload)
        return True
    except Exception:  # noqa: BLE001
        return False


def call(channel: grpc.Channel, path: str, messages: list[bytes]) -> tuple[grpc.StatusCode, str]:
    """Send raw `messages` (one for unary requests) and drain the answer; (code, details)."""
    name = path.rsplit("/", 1)[1]
    try:
        if name in CLIENT_STREAMING and name in SERVER_STREAMING:
            for _ in channel.stream_stream(path)(iter(messages), timeout=CALL_TIMEOUT_S):
                pass
        elif name in CLIENT_STREAMING:
            channel.stream_unary(path)(iter(messages), timeout=CALL_TIMEOUT_S)
        elif name in SERVER_STREAMING:
            responses = channel.unary_stream(path)(messages[0], timeout=CALL_TIMEOUT_S)
            for _ in responses:
                if name in ENDLESS:
                    responses.cancel()
                    return grpc.StatusCode.OK, ""
        else:
            channel.unary_unary(path)(messages[0], timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""


def test_every_rpc_answers_garbage_with_a_client_status(server, tiny_config):
    rng = random.Random(15)
    valid = valid_requests(tiny_config)
    channel = grpc.insecure_channel(server.target)
    tally: dict[str, Counter] = {}
    bad: list[str] = []
    undecodable = 0
    t0 = time.monotonic()
    for path, messages in valid.items():
        name = path.rsplit("/", 1)[1]
        counts = tally.setdefault(name, Counter())
        for i in range(PAYLOADS_PER_RPC):
            sent = list(messages)
            k = rng.randrange(len(sent))  # the one message (of a client stream) to spoil
            if i % 2 == 0:
                sent[k] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 200)))
            else:
                sent[k] = mutate(sent[k], rng)
            code, details = call(channel, path, sent)
            counts[code.name] += 1
            if not decodes(name, sent[k]):
                undecodable += 1
                if code != grpc.StatusCode.INVALID_ARGUMENT or "do not decode as" not in details:
                    bad.append(f"{name}: undecodable bytes got {code.name}: {details[:120]}")
            elif code not in INPUT_CODES:
                bad.append(f"{name}: decodable input got {code.name}: {details[:120]}")
    channel.close()
    seconds = time.monotonic() - t0
    print(f"\n{sum(sum(c.values()) for c in tally.values())} calls ({undecodable} undecodable) over "
          f"{len(tally)} RPCs in {seconds:.1f}s: " + "; ".join(f"{n} {dict(c)}" for n, c in tally.items()))
    assert not bad, "\n".join(bad[:30])
    assert undecodable >= len(valid) * PAYLOADS_PER_RPC // 3  # the random half nearly always fails to parse

    # The server is unharmed: it serves, and no request left a traceback behind.
    c = Client(server.target)
    ids, adapter, version, _ = c.stream("fuzz@1", "hello", 4)
    assert len(ids) == 4 and adapter == "fuzz" and version == 1
    c.close()
    log = "\n".join(server.raw)
    # Health.List is not served (grpc_health's aio servicer lacks it): a clean UNIMPLEMENTED, nothing run.
    channel = grpc.insecure_channel(server.target)
    assert call(channel, "/grpc.health.v1.Health/List", [b"\x01garbage"])[0] == grpc.StatusCode.UNIMPLEMENTED
    channel.close()
    assert "Traceback" not in log and "internal error" not in log and "Unexpected" not in log, server.log_tail(60)


def test_a_malformed_message_mid_upload_is_invalid_argument(server, tiny_config):
    """The header parses, the third message does not: the upload is refused by name, nothing registered."""
    cfg, weights = adapter_bytes(tiny_config, seed=3)
    msgs = [m.SerializeToString() for m in upload_requests("midway", cfg, weights, chunk=2048)]
    msgs[2] = b"\xff\xff\xff\xff" + msgs[2][4:]
    channel = grpc.insecure_channel(server.target)
    code, details = call(channel, "/loraserve.v1.Adapters/RegisterAdapter", msgs)
    channel.close()
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert "loraserve.v1.RegisterAdapterRequest" in details
    c = Client(server.target)
    with pytest.raises(grpc.RpcError) as e:
        c.adapters.GetAdapter(apb.GetAdapterRequest(adapter_id="midway"), timeout=10)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    c.close()


HTTP_ROUTES = {  # a valid body per POST route of the OpenAI-compatible API
    "/v1/completions": {"model": "fuzz", "prompt": "hello", "max_tokens": 4, "ignore_eos": True},
    "/v1/chat/completions": {"model": "fuzz", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4},
}


def test_the_http_api_answers_garbage_bodies_with_a_client_status(server):
    """Random and mutated bodies on every POST route: a 2xx or a 4xx in OpenAI's error shape, never a 5xx."""
    import httpx

    rng = random.Random(16)
    tally: Counter = Counter()
    bad: list[str] = []
    with httpx.Client(base_url=f"http://127.0.0.1:{server.http_port}", timeout=CALL_TIMEOUT_S) as http:
        for path, body in HTTP_ROUTES.items():
            valid = json.dumps(body).encode()
            for i in range(PAYLOADS_PER_RPC):
                sent = (bytes(rng.randrange(256) for _ in range(rng.randint(1, 200))) if i % 2 == 0
                        else mutate(valid, rng))
                r = http.post(path, content=sent, headers={"content-type": "application/json"})
                tally[r.status_code] += 1
                if r.status_code >= 500 or (r.status_code >= 400 and set(r.json().get("error", {})) !=
                                            {"message", "type", "param", "code"}):
                    bad.append(f"{path} {sent[:60]!r}: {r.status_code} {r.text[:120]}")
    print(f"\nHTTP: {sum(tally.values())} garbage bodies over {len(HTTP_ROUTES)} routes: {dict(sorted(tally.items()))}")
    assert not bad, "\n".join(bad[:20])
    assert "Traceback" not in "\n".join(server.raw) and "internal error" not in "\n".join(server.raw)
