"""The OpenAI-compatible HTTP API of a real server (tiny model, real registry, tenants) beside its gRPC API.

Asserts what a client sees: the same tokens, log-probabilities and refusals over both protocols,
tenant isolation, OpenAI's error shape, engine requests aborted when a client goes away, the
router metrics (checked by promtool) and a drain that finishes HTTP streams like gRPC calls.
"""
from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import threading
import time

import grpc
import httpx
import openai
import pytest

from server.api.gen.loraserve.v1 import inference_pb2 as pb
from server.api.gen.loraserve.v1 import inference_pb2_grpc as pb_grpc
from tests.api.inprocess import KEYS, InProcessServer
from tests.e2e.conftest import parse_metric

ACME = {"Authorization": f"Bearer {KEYS['acme']}"}


@pytest.fixture(scope="module")
def srv(tiny_dir, tiny_adapters, tmp_path_factory):
    s = InProcessServer(tmp_path_factory.mktemp("http"), tiny_dir,
                        {"acme/all_r8": tiny_adapters["all_r8"], "acme/qv": tiny_adapters["qv_r4"],
                         "acme/broken": tiny_adapters["pattern"], "other/secret": tiny_adapters["mlp_rs"]},
                        max_request_bytes=64 << 10)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def http(srv):
    with httpx.Client(base_url=srv.base_url, headers=ACME, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def grpc_stub(srv):
    with grpc.insecure_channel(srv.target) as ch:
        yield pb_grpc.InferenceStub(ch)


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(base_url=srv.base_url + "/v1", api_key=KEYS["acme"], max_retries=0, timeout=60)


def grpc_generate(stub, adapter: str, prompt: str, n: int, **params) -> pb.GenerateResponse:
    req = pb.GenerateRequest(adapter_id=adapter, prompt=prompt,
                             params=pb.SamplingParams(max_new_tokens=n, ignore_eos=True, **params))
    return stub.Generate(req, metadata=(("authorization", f"Bearer {KEYS['acme']}"),), timeout=60)


def events(response: httpx.Response) -> list[dict]:
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            out.append("DONE" if line == "data: [DONE]" else json.loads(line[6:]))
    return out


def test_completion_equals_grpc_tokens_and_logprobs(http, grpc_stub, client, srv):
    body = {"model": "all_r8", "prompt": "hello there", "max_tokens": 9, "temperature": 0, "ignore_eos": True,
            "logprobs": 3, "return_token_ids": True}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    ref = grpc_generate(grpc_stub, "all_r8", "hello there", 9, logprobs=True, top_logprobs=3)
    choice = out["choices"][0]
    assert out["model"] == "all_r8@1" and out["object"] == "text_completion" and out["id"].startswith("cmpl-")
    assert choice["token_ids"] == list(ref.token_ids) and choice["text"] == ref.text
    assert choice["finish_reason"] == "length"
    assert choice["logprobs"]["token_logprobs"] == pytest.approx([lp.logprob for lp in ref.logprobs], abs=1e-6)
    assert all(len(top) in (3, 4) for top in choice["logprobs"]["top_logprobs"])  # 3 + the sampled token
    assert out["usage"] == {"prompt_tokens": ref.usage.prompt_tokens, "completion_tokens": 9,
                            "total_tokens": ref.usage.prompt_tokens + 9}
    # The official client, token ids as the prompt, and the base model by name.
    base = client.completions.create(model="model", prompt=[5, 6, 7], max_tokens=4,
                                     temperature=0, extra_body={"ignore_eos": True, "return_token_ids": True})
    ref_base = grpc_stub.Generate(pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[5, 6, 7]), params=pb.SamplingParams(
        max_new_tokens=4, ignore_eos=True)), metadata=(("authorization", f"Bearer {KEYS['acme']}"),))
    assert base.model == "model" and base.choices[0].model_extra["token_ids"] == list(ref_base.token_ids)


def test_streams_chat_n_and_usage(http, client, grpc_stub):
    r = http.post("/v1/completions", json={"model": "qv", "prompt": "abc", "max_tokens": 6, "temperature": 0,
                                           "ignore_eos": True, "stream": True,
                                           "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    evs = events(r)
    assert evs[-1] == "DONE" and evs[-2]["choices"] == [] and evs[-2]["usage"]["completion_tokens"] == 6
    text_chunks = [e for e in evs[:-2] if e["choices"]]
    assert len(text_chunks) == 6 and all(e["model"] == "qv@1" for e in text_chunks)
    assert text_chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert "".join(e["choices"][0]["text"] for e in text_chunks) == grpc_generate(grpc_stub, "qv", "abc", 6).text
    # Chat, streamed by the official client: n choices, each with its own index, seeded choice by choice.
    stream = client.chat.completions.create(model="all_r8", messages=[{"role": "user", "content": "hi"}], n=3,
                                            max_tokens=5, temperature=0.9, seed=11, stream=True,
                                            logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    texts, lps, finish = ["", "", ""], [[], [], []], [None] * 3
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            lps[c.index] += c.logprobs.content if c.logprobs else []
            finish[c.index] = c.finish_reason or finish[c.index]
    assert finish == ["length"] * 3 and all(len(x) == 5 for x in lps)
    assert all(len(t.top_logprobs) == 2 for x in lps for t in x)
    for j in range(3):  # choice j is the request with seed 11 + j
        chat = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="hi")])
        ref = grpc_stub.Generate(pb.GenerateRequest(adapter_id="all_r8", messages=chat, params=pb.SamplingParams(
            max_new_tokens=5, temperature=0.9, seed=11 + j, ignore_eos=True)),
            metadata=(("authorization", f"Bearer {KEYS['acme']}"),))
        assert texts[j] == ref.text
    unary = client.chat.completions.create(model="all_r8@1", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=4, temperature=0)
    assert unary.model == "all_r8@1" and unary.choices[0].message.role == "assistant"
    assert unary.usage.completion_tokens == 4 or unary.choices[0].finish_reason == "stop"


def test_the_routing_header_only_routes(http, client):
    """x-loraserve-adapter (what a fleet's proxy hashes on) is accepted and never changes what is served."""
    from server.client.routing import ADAPTER_HEADER, routing_headers

    body = {"model": "qv", "prompt": "abc", "max_tokens": 5, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}
    plain = http.post("/v1/completions", json=body).json()
    crossed = http.post("/v1/completions", json=body, headers={ADAPTER_HEADER: "all_r8"}).json()
    assert crossed["model"] == plain["model"] == "qv@1"
    assert crossed["choices"][0]["token_ids"] == plain["choices"][0]["token_ids"]
    # an OpenAI client sets it with extra_headers, as docs/fleet.md shows
    out = client.completions.create(model="qv", prompt="abc", max_tokens=5, temperature=0,
                                    extra_body={"ignore_eos": True, "return_token_ids": True},
                                    extra_headers=routing_headers("qv@1"))
    assert out.model == "qv@1" and out.choices[0].model_extra["token_ids"] == plain["choices"][0]["token_ids"]


def test_models_are_tenant_scoped(http, srv):
    ids = [m["id"] for m in http.get("/v1/models").json()["data"]]
    assert ids == ["model", "all_r8", "all_r8@1", "broken", "broken@1", "qv", "qv@1"]
    card = http.get("/v1/models/qv").json()
    assert card["parent"] == "model" and card["root"] == "qv@1" and card["owned_by"] == "acme"
    other = httpx.get(srv.base_url + "/v1/models", headers={"Authorization": f"Bearer {KEYS['other']}"}).json()
    assert [m["id"] for m in other["data"]] == ["model", "secret", "secret@1"]
    missing, foreign = http.get("/v1/models/nothing"), http.get("/v1/models/secret")
    assert missing.status_code == foreign.status_code == 404
    assert foreign.json()["error"] == {**missing.json()["error"], "message": "model 'secret' not found"}
    assert foreign.json()["error"]["code"] == "model_not_found"


def _error(r: httpx.Response, status: int, param, code) -> str:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert (err["param"], err["code"]) == (param, code), err
    assert set(err) == {"message", "type", "param", "code"}
    return err["message"]


def test_auth_refusals_are_counted_by_reason_and_never_show_the_key(srv, caplog):
    """The same loraserve_auth_failures_total and auth_refused line as gRPC's refusals."""
    secret = "wrong-but-secret-http-key"
    count = srv.server.metrics.registry.get_sample_value
    before = {r: count("loraserve_auth_failures_total", {"reason": r}) for r in ("missing_key", "wrong_key")}
    caplog.set_level("INFO", logger="loraserve.auth")
    ok = {"model": "all_r8", "prompt": "x", "max_tokens": 2}
    assert httpx.post(srv.base_url + "/v1/completions", json=ok).status_code == 401
    assert httpx.post(srv.base_url + "/v1/completions", json=ok,
                      headers={"Authorization": f"Bearer {secret}"}).status_code == 401
    assert {r: count("loraserve_auth_failures_total", {"reason": r}) - before[r] for r in before} == {
        "missing_key": 1, "wrong_key": 1}
    refused = [json.loads(r.getMessage()) for r in caplog.records if '"auth_refused"' in r.getMessage()]
    assert [(x["method"], x["reason"], x["status"]) for x in refused] == [
        ("POST /v1/completions", "missing_key", "UNAUTHENTICATED"),
        ("POST /v1/completions", "wrong_key", "UNAUTHENTICATED")]
    assert all(x["peer"].startswith("127.0.0.1:") for x in refused)
    assert not any(secret in r.getMessage() for r in caplog.records)


def test_refusals_name_the_field(http, srv):
    url = "/v1/completions"
    ok = {"model": "all_r8", "prompt": "x", "max_tokens": 2}
    r = httpx.post(srv.base_url + url, json=ok)
    assert "missing API key" in _error(r, 401, None, "invalid_api_key") and r.headers["www-authenticate"] == "Bearer"
    r = httpx.post(srv.base_url + url, json=ok, headers={"Authorization": "Bearer wrong"})
    assert _error(r, 401, None, "invalid_api_key") == "invalid API key"
    assert "not valid JSON" in _error(http.post(url, content=b'{"model": '), 400, "body", "invalid_value")
    assert _error(http.post(url, json=[1]), 400, "body", "invalid_value") == "body: must be a JSON object"
    assert "max_tokens" in _error(http.post(url, json={**ok, "max_tokens": "5"}), 400, "max_tokens", "invalid_value")
    assert "must be a string or an array of token ids" in _error(http.post(url, json={**ok, "prompt": 5}), 400,
                                                                 "prompt", "invalid_value")
    assert "not a field" in _error(http.post(url, json={**ok, "frobnicate": 1}), 400, "frobnicate", "invalid_value")
    assert _error(http.post(url, json={"prompt": "x"}), 400, "model", "invalid_value") == "model: is required"
    assert "allowed range is [0, 100]" in _error(http.post(url, json={**ok, "temperature": 101}), 400,
                                                 "temperature", "invalid_value")
    assert "allowed range is [1, " in _error(http.post(url, json={**ok, "max_tokens": 10**6}), 400, "max_tokens",
                                             "invalid_value")
    assert "not supported" in _error(http.post(url, json={**ok, "presence_penalty": 0.5}), 400, "presence_penalty",
                                     "invalid_value")
    assert _error(http.post(url, json={**ok, "logprobs": 21}), 400, "logprobs", "invalid_value")
    chat = {"model": "all_r8", "messages": [{"role": "user", "content": "x"}]}
    assert "needs logprobs" in _error(http.post("/v1/chat/completions", json={**chat, "top_logprobs": 2}), 400,
                                      "top_logprobs", "invalid_value")
    assert _error(http.post("/v1/chat/completions", json={**chat, "messages": []}), 400, "messages", "invalid_value")
    # Unknown model, malformed id and another tenant's adapter: one answer, naming `model`.
    for model in ("nothing", "secret", "Not/AnId"):
        assert _error(http.post(url, json={**ok, "model": model}), 404, "model", "model_not_found") == \
            f"model {model!r} not found"
    big = {**ok, "prompt": "x" * (70 << 10)}
    assert "larger than 65536 bytes" in _error(http.post(url, json=big), 413, "body", "request_too_large")
    chunked = http.post(url, content=iter([json.dumps(big).encode()]), headers={"content-type": "application/json"})
    assert "larger than" in _error(chunked, 413, "body", "request_too_large")
    # Far over the limit: the client still reads its 413, also httpx's async client (the openai client's), which
    # reports a reset as a connection error: the server drains the body instead of closing mid-upload.
    huge = {**ok, "prompt": "x" * (8 << 20)}

    async def post_huge() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=srv.base_url, headers=ACME, timeout=60) as client:
            return [await client.post(url, json=huge) for _ in range(3)]

    for r in asyncio.run(post_huge()):
        assert "larger than" in _error(r, 413, "body", "request_too_large")
    assert _error(http.get("/v1/nowhere"), 404, None, "not_found") == "no route /v1/nowhere"
    assert http.get("/health").json() == {"status": "serving"}
    # The server keeps serving everyone else.
    assert http.post(url, json=ok).status_code == 200


def test_quota_and_typed_client_exceptions(srv):
    small = openai.OpenAI(base_url=srv.base_url + "/v1", api_key=KEYS["small"], max_retries=0)
    small.completions.create(model="model", prompt="a", max_tokens=2)
    with pytest.raises(openai.RateLimitError) as e:
        small.completions.create(model="model", prompt="a", max_tokens=2)
    assert "max_tokens_per_minute" in e.value.message and e.value.response.headers["retry-after"] == "1"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=srv.base_url + "/v1", api_key="nope", max_retries=0).models.list()
    acme = openai.OpenAI(base_url=srv.base_url + "/v1", api_key=KEYS["acme"], max_retries=0)
    with pytest.raises(openai.NotFoundError) as e:
        acme.completions.create(model="secret", prompt="a", max_tokens=2)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        acme.completions.create(model="model", prompt="a", max_tokens=0)
    assert e.value.param == "max_tokens"


def test_an_adapter_that_cannot_load_is_503_streamed_or_not(http, srv):
    """A registered adapter whose stored file was corrupted: retryable 503, never a base-model answer."""
    registry = srv.server.registry
    digest = registry.get("acme", "broken").versions[0].digest
    weights = registry.store.path(digest) / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-8:] = bytes(8 - i for i in range(8))
    weights.write_bytes(bytes(data))
    registry.cache.discard(digest)  # as if evicted from host memory since: the next load reads the disk
    for stream in (True, False):
        r = http.post("/v1/completions", json={"model": "broken", "prompt": "x", "max_tokens": 3, "stream": stream})
        assert "disk corruption" in _error(r, 503, None, "adapter_unavailable")
    srv.wait_idle()


def _generated(srv) -> float:
    return sum(parse_metric(httpx.get(srv.base_url + "/metrics").text, "loraserve_generated_tokens_total",
                            {"adapter": a}) for a in ("base", "all_r8", "qv", "secret"))


def test_a_refused_prompt_starts_none_of_its_request(http, srv):
    """A request's prompts go in as one arrival: one bad prompt refuses the request, and none of it runs."""
    srv.wait_idle()
    before = _generated(srv)
    body = {"model": "all_r8", "prompt": [[5, 6, 7], [5, 10**9]], "max_tokens": 50, "ignore_eos": True}
    assert "allowed range" in _error(http.post("/v1/completions", json=body), 400, "prompt", "invalid_value")
    srv.wait_idle()
    assert _generated(srv) == before
    ok = http.post("/v1/completions", json={**body, "prompt": [[5, 6, 7], [5, 8]], "max_tokens": 3})
    assert ok.status_code == 200 and [c["index"] for c in ok.json()["choices"]] == [0, 1]
    srv.wait_idle()
    assert _generated(srv) == before + 6


def test_client_disconnect_aborts_at_once(http, srv):
    srv.wait_idle()
    before = _generated(srv)
    body = {"model": "all_r8", "prompt": "go", "max_tokens": 480, "ignore_eos": True, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        while not next(lines).startswith("data: {"):
            pass
    srv.wait_idle(timeout=3)  # KV blocks, the slot pin and the in-flight count released
    assert _generated(srv) - before < 480
    # A unary request whose client gives up is aborted too: the connection closes as soon as the request runs
    # (a raw socket, so the test does not depend on how long 480 tokens take on this machine).
    before = _generated(srv)
    payload = json.dumps({**body, "stream": False}).encode()
    host, port = srv.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                     + f"Authorization: {ACME['Authorization']}\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
                     + payload)
        deadline = time.monotonic() + 10
        while srv.server.state.in_flight == 0 and time.monotonic() < deadline:
            time.sleep(0.002)
        assert srv.server.state.in_flight == 1
    srv.wait_idle(timeout=3)
    assert _generated(srv) - before < 480


def test_router_metrics_pass_promtool(http, srv):
    body = {"model": "qv", "prompt": "go", "max_tokens": 300, "ignore_eos": True, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        while not next(lines).startswith("data: {"):
            pass
        text = http.get("/metrics").text
    labels = {"running_lora_adapters": "acme/qv", "waiting_lora_adapters": "", "max_lora": "4"}
    assert parse_metric(text, "loraserve_lora_requests_info", labels) > time.time() - 60
    assert 0 < parse_metric(text, "loraserve_kv_cache_usage_ratio") <= 1
    srv.wait_idle()
    text = http.get("/metrics").text
    assert text.count("loraserve_lora_requests_info{") == 1  # the old label set is gone
    assert parse_metric(text, "loraserve_lora_requests_info", {"running_lora_adapters": ""}) > 0
    assert parse_metric(text, "loraserve_kv_cache_usage_ratio") == 0
    assert parse_metric(text, "loraserve_cache_config_info", {"block_size": "16", "num_gpu_blocks": "256"}) == 1
    assert parse_metric(text, "loraserve_kv_blocks_capacity") == 256 and "\nloraserve_kv_blocks_total" not in text
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: install Debian's prometheus package (make install does)"
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr


def test_drain_finishes_http_streams_and_refuses_new_work(tiny_dir, tmp_path):
    srv = InProcessServer(tmp_path, tiny_dir, {}, tenants=False)
    try:
        base = srv.base_url
        got: list = []

        def stream() -> None:
            with httpx.stream("POST", base + "/v1/completions", timeout=60, json={
                    "model": "model", "prompt": "go", "max_tokens": 200, "ignore_eos": True, "stream": True}) as r:
                got.extend(events(r))

        t = threading.Thread(target=stream)
        t.start()
        while srv.server.state.in_flight == 0:
            time.sleep(0.01)
        drained = srv.spawn(srv.server.drain())
        while httpx.get(base + "/health").status_code == 200:
            time.sleep(0.01)
        assert httpx.get(base + "/health").json() == {"status": "draining"}
        r = httpx.post(base + "/v1/completions", json={"model": "model", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"
        assert r.headers["retry-after"] == "1"
        t.join(60)
        drained.result(60)
        assert got[-1] == "DONE" and got[-2]["choices"][0]["finish_reason"] == "length"
        assert sum(1 for e in got[:-1] if e["choices"]) == 200
        with pytest.raises(httpx.ConnectError):
            httpx.get(base + "/health")
    finally:
        srv.loop.call_soon_threadsafe(srv.loop.stop)


def test_drain_delay_keeps_serving_http_while_health_says_draining(tiny_dir, tmp_path):
    """--drain-delay: /health turns 503 at the signal (a balancer stops sending), calls are served until it ends."""
    srv = InProcessServer(tmp_path, tiny_dir, {}, tenants=False, drain_delay=3.0)
    try:
        base = srv.base_url
        drained = srv.spawn(srv.server.drain())
        while httpx.get(base + "/health").status_code == 200:
            time.sleep(0.01)
        assert httpx.get(base + "/health").json() == {"status": "draining"}
        r = httpx.post(base + "/v1/completions", json={"model": "model", "prompt": "x", "max_tokens": 2}, timeout=60)
        assert r.status_code == 200, r.text  # sent inside the delay: served
        drained.result(60)
    finally:
        srv.loop.call_soon_threadsafe(srv.loop.stop)


def test_bench_sends_the_same_workload_over_both_protocols(srv):
    import asyncio

    from server.client import loadgen

    summaries = {}
    for protocol in ("grpc", "http"):
        args = loadgen.build_parser().parse_args([
            "--protocol", protocol, "--target", srv.target, "--base-url", srv.base_url, "--model", "model",
            "--api-key", KEYS["acme"], "--requests", "6", "--concurrency", "3", "--adapters", "all_r8,qv",
            "--include-base", "--min-new-tokens", "3", "--max-new-tokens", "5", "--prompt-words-min", "2",
            "--prompt-words-max", "6"])
        summaries[protocol] = s = asyncio.run(loadgen.run(args))
        assert (s.ok, s.requests, s.errors, s.protocol) == (6, 6, {}, protocol)
        assert s.itl_p50_s > 0 and s.ttft_p50_s > 0
    tokens = {p: round(s.generated_tokens_per_s * s.seconds) for p, s in summaries.items()}
    assert tokens["grpc"] == tokens["http"] == sum(j.max_new_tokens for j in loadgen.workload(args))
