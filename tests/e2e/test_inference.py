"""The real server, the real SmolLM2, real gRPC: generation, adapters, cancellation, errors, metrics."""
from __future__ import annotations

import concurrent.futures as cf
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from server.api.gen.loraserve.v1 import inference_pb2 as pb
from server.api.gen.loraserve.v1 import inference_pb2_grpc as pb_grpc

from .conftest import ServerProcess, peft_greedy, start_server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
N_NEW = 12
MAX_BATCH = 4
MAX_WAITING = 12


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, peft_adapters: dict[str, Path]) -> ServerProcess:
    tmp = tmp_path_factory.mktemp("srv")
    args = ["--quantize", "none", "--dtype", "float32", "--device", "cpu", "--max-batch-size", str(MAX_BATCH),
            "--max-waiting", str(MAX_WAITING), "--max-model-len", "512", "--kv-cache-tokens", "4096"]
    for name, path in peft_adapters.items():
        args += ["--adapter", f"{name}={path}"]
    sp = start_server(tmp, *args)
    yield sp
    code = sp.stop()
    assert code == 0, sp.log_tail()


@pytest.fixture(scope="module")
def stub(server: ServerProcess) -> pb_grpc.InferenceStub:
    ch = server.channel()
    yield pb_grpc.InferenceStub(ch)
    ch.close()


def greedy(n: int = N_NEW, **kw) -> pb.SamplingParams:
    return pb.SamplingParams(max_new_tokens=n, temperature=0.0, **kw)


def wait_idle(server: ServerProcess, timeout: float = 30) -> None:
    """Running and waiting requests back to 0 and every KV block free."""
    deadline = time.monotonic() + timeout
    while True:
        text = server.metrics_text()
        from .conftest import parse_metric

        vals = [parse_metric(text, n) for n in
                ("loraserve_requests_running", "loraserve_requests_waiting", "loraserve_kv_blocks_used")]
        if vals == [0.0, 0.0, 0.0]:
            assert parse_metric(text, "loraserve_kv_blocks_capacity") > 0
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"engine not idle: running, waiting, kv_used = {vals}")
        time.sleep(0.1)


def test_unary_and_stream_agree(stub: pb_grpc.InferenceStub) -> None:
    req = pb.GenerateRequest(request_id="u1", prompt=PROMPTS[0], params=greedy())
    unary = stub.Generate(req, timeout=120)
    assert unary.request_id == "u1"
    assert unary.usage.completion_tokens == len(unary.token_ids) > 0
    assert unary.usage.prompt_tokens > 0
    assert unary.finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_STOP)
    assert unary.adapter_id == "" and unary.adapter_version == 0
    chunks = list(stub.GenerateStream(req, timeout=120))
    assert len(chunks) >= 2, "a stream of one chunk is not incremental"
    assert all(c.finish_reason == pb.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])
    assert chunks[-1].finish_reason == unary.finish_reason
    assert [t for c in chunks for t in c.token_ids] == list(unary.token_ids)
    assert "".join(c.text for c in chunks) == unary.text
    assert chunks[-1].usage == unary.usage


def test_tokenize_model_info_and_chat(stub: pb_grpc.InferenceStub, default_model_dir: Path) -> None:
    from server.model.loader import load_tokenizer

    tok = load_tokenizer(default_model_dir)
    ids = stub.Tokenize(pb.TokenizeRequest(prompt=PROMPTS[1]), timeout=30).token_ids
    assert list(ids) == tok(PROMPTS[1])["input_ids"]
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    chat = pb.ChatMessages(messages=[pb.ChatMessage(**m) for m in msgs])
    chat_ids = stub.Tokenize(pb.TokenizeRequest(messages=chat), timeout=30).token_ids
    rendered = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert list(chat_ids) == tok(rendered, add_special_tokens=False)["input_ids"]
    resp = stub.Generate(pb.GenerateRequest(messages=chat, params=greedy()), timeout=120)
    assert resp.usage.prompt_tokens == len(chat_ids)
    # The same tokens sent pre-tokenized give the same answer.
    again = stub.Generate(pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=chat_ids), params=greedy()), timeout=120)
    assert list(again.token_ids) == list(resp.token_ids)
    info = stub.ModelInfo(pb.ModelInfoRequest(), timeout=30)
    assert info.model_name == "default" and len(info.model_fingerprint) == 64
    assert info.context_length == 512 and info.quantization == "none" and info.dtype == "float32"
    assert info.device == "cpu" and info.adapter_slots == 8 and info.max_batch_size == MAX_BATCH
    assert info.prefix_cache  # on by default
    assert info.vocab_size == tok.vocab_size or info.vocab_size >= len(tok)


def test_concurrent_adapters_equal_peft_alone(stub: pb_grpc.InferenceStub, server: ServerProcess,
                                              peft_adapters: dict[str, Path], default_model_dir: Path) -> None:
    from server.model.loader import load_tokenizer

    tok = load_tokenizer(default_model_dir)
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    eos = {tok.eos_token_id}
    jobs = [(a, i) for a in ("", "alpha", "beta") for i in range(len(PROMPTS))]
    barrier = threading.Barrier(len(jobs))

    def call(job: tuple[str, int]) -> pb.GenerateResponse:
        adapter, i = job
        barrier.wait(30)
        return stub.Generate(pb.GenerateRequest(adapter_id=adapter, prompt=PROMPTS[i], params=greedy()), timeout=300)

    with cf.ThreadPoolExecutor(len(jobs)) as ex:
        results = dict(zip(jobs, ex.map(call, jobs)))
    expected_by = peft_greedy(default_model_dir, peft_adapters, prompts, N_NEW, eos)
    for adapter in ("", "alpha", "beta"):
        expected = expected_by[adapter]
        for i in range(len(PROMPTS)):
            r = results[(adapter, i)]
            got = [t for t in r.token_ids if t not in eos]
            assert got == expected[i], f"adapter {adapter or 'base'!r}, prompt {i}: {got} != PEFT {expected[i]}"
            assert r.adapter_id == adapter and r.adapter_version == (1 if adapter else 0)
    # The adapters are really applied: each changes at least one output.
    for adapter in ("alpha", "beta"):
        assert any(results[(adapter, i)].token_ids != results[("", i)].token_ids for i in range(len(PROMPTS)))
    wait_idle(server)


def test_cancel_mid_stream_frees_everything(stub: pb_grpc.InferenceStub, server: ServerProcess) -> None:
    req = pb.GenerateRequest(prompt=PROMPTS[2], adapter_id="alpha", params=greedy(400, ignore_eos=True))
    call = stub.GenerateStream(req, timeout=300)
    got = 0
    for chunk in call:
        got += len(chunk.token_ids)
        if got >= 3:
            call.cancel()
            break
    assert call.code() == grpc.StatusCode.CANCELLED
    wait_idle(server, timeout=15)
    line = server.wait_for(lambda r: r.get("event") == "request" and r.get("status") == "CANCELLED", 15,
                           "a CANCELLED request log line")
    assert line["adapter"] == "alpha" and 3 <= line["completion_tokens"] < 400
    # The server is fine afterwards.
    assert stub.Generate(pb.GenerateRequest(prompt=PROMPTS[0], params=greedy(4)), timeout=120).usage.completion_tokens


def test_deadline_aborts_the_engine_request(stub: pb_grpc.InferenceStub, server: ServerProcess) -> None:
    req = pb.GenerateRequest(prompt=PROMPTS[1], params=greedy(400, ignore_eos=True))
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(req, timeout=1.5)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_idle(server, timeout=15)
    assert stub.Generate(pb.GenerateRequest(prompt=PROMPTS[0], params=greedy(4)), timeout=120).usage.completion_tokens


def _code(fn, *a, **kw) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        fn(*a, **kw)
    return e.value.code(), e.value.details()


def test_error_codes_and_messages(stub: pb_grpc.InferenceStub, server: ServerProcess) -> None:
    G = stub.Generate
    code, msg = _code(G, pb.GenerateRequest(prompt="hi", adapter_id="nope"), timeout=30)
    assert code == grpc.StatusCode.NOT_FOUND and msg == "adapter 'nope' not found"
    code, msg = _code(G, pb.GenerateRequest(prompt="hi", adapter_id="alpha@7"), timeout=30)
    assert code == grpc.StatusCode.NOT_FOUND and "alpha@7" in msg
    cases = [
        (pb.GenerateRequest(prompt="hi", params=pb.SamplingParams(temperature=-1)), "temperature", "[0, 100]"),
        (pb.GenerateRequest(prompt="hi", params=pb.SamplingParams(top_p=0)), "top_p", "(0, 1]"),
        (pb.GenerateRequest(prompt="hi", params=pb.SamplingParams(top_k=-3)), "top_k", "[0, 1000000]"),
        (pb.GenerateRequest(prompt="hi", params=pb.SamplingParams(max_new_tokens=0)), "max_new_tokens", "[1, "),
        (pb.GenerateRequest(prompt="hi", params=pb.SamplingParams(max_new_tokens=100000)), "max_new_tokens",
         "context 512"),
        (pb.GenerateRequest(prompt="word " * 600), "prompt", "at most 511"),
        (pb.GenerateRequest(params=greedy()), "input", "prompt, messages or prompt_token_ids"),
        (pb.GenerateRequest(prompt=""), "prompt", "must not be empty"),
        (pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[1, 10**8])), "prompt_token_ids", "allowed range"),
        (pb.GenerateRequest(prompt="hi", params=pb.SamplingParams(stop_token_ids=[-1])), "stop_token_ids", "[0, "),
        (pb.GenerateRequest(messages=pb.ChatMessages()), "messages", "at least one"),
    ]
    for req, field, range_text in cases:
        code, msg = _code(G, req, timeout=30)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (field, code, msg)
        assert field in msg and range_text in msg, msg
        assert "Traceback" not in msg
    # Message size bound: the server refuses a request beyond max_request_bytes (4 MiB).
    code, _ = _code(G, pb.GenerateRequest(prompt="x" * (5 << 20)), timeout=30)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Unimplemented methods answer UNIMPLEMENTED, not a crash.
    ch = server.channel()
    try:
        code, _ = _code(ch.unary_unary("/loraserve.v1.Inference/Nope"), b"", timeout=10)
        assert code == grpc.StatusCode.UNIMPLEMENTED
    finally:
        ch.close()


def test_queue_full_is_resource_exhausted(stub: pb_grpc.InferenceStub, server: ServerProcess) -> None:
    """More requests than batch + queue: the surplus gets RESOURCE_EXHAUSTED at once, the rest finish."""
    n = MAX_BATCH + MAX_WAITING + 6
    req = pb.GenerateRequest(prompt=PROMPTS[0], params=greedy(24, ignore_eos=True))
    futures = [stub.Generate.future(req, timeout=300) for _ in range(n)]
    codes = []
    for f in futures:
        try:
            f.result()
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as e:
            codes.append(e.code())
            if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                assert "waiting queue is full" in e.details()
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 1, codes
    assert codes.count(grpc.StatusCode.OK) >= MAX_BATCH, codes
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    wait_idle(server)


def test_health_and_reflection(server: ServerProcess) -> None:
    with server.channel() as ch:
        h = health_pb2_grpc.HealthStub(ch)
        for svc in ("", "loraserve.v1.Inference"):
            assert h.Check(health_pb2.HealthCheckRequest(service=svc), timeout=10).status == \
                health_pb2.HealthCheckResponse.SERVING
        r = reflection_pb2_grpc.ServerReflectionStub(ch)
        resp = next(r.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                           timeout=10))
        names = {s.name for s in resp.list_services_response.service}
        assert {"loraserve.v1.Inference", "grpc.health.v1.Health"} <= names


def test_metrics_move_by_the_right_amounts(stub: pb_grpc.InferenceStub, server: ServerProcess) -> None:
    wait_idle(server)
    before = server.metrics_text()
    from .conftest import parse_metric

    def delta(after: str, name: str, labels: dict | None = None) -> float:
        return parse_metric(after, name, labels) - parse_metric(before, name, labels)

    resps = [stub.Generate(pb.GenerateRequest(prompt=p, adapter_id=a, params=greedy(6)), timeout=120)
             for p, a in zip(PROMPTS, ("", "alpha", "beta"))]
    chunks = list(stub.GenerateStream(pb.GenerateRequest(prompt=PROMPTS[0], params=greedy(5)), timeout=120))
    _code(stub.Generate, pb.GenerateRequest(prompt="hi", adapter_id="nope"), timeout=30)
    after = server.metrics_text()
    completion = sum(r.usage.completion_tokens for r in resps) + chunks[-1].usage.completion_tokens
    prompt = sum(r.usage.prompt_tokens for r in resps) + chunks[-1].usage.prompt_tokens
    assert delta(after, "loraserve_requests_total", {"method": "Generate", "code": "OK"}) == 3
    assert delta(after, "loraserve_requests_total", {"method": "GenerateStream", "code": "OK"}) == 1
    assert delta(after, "loraserve_requests_total", {"method": "Generate", "code": "NOT_FOUND"}) == 1
    gen = sum(delta(after, "loraserve_generated_tokens_total", {"adapter": a}) for a in ("base", "alpha", "beta"))
    assert gen == completion
    assert delta(after, "loraserve_generated_tokens_total", {"adapter": "alpha"}) == resps[1].usage.completion_tokens
    assert delta(after, "loraserve_prompt_tokens_total") == prompt
    assert delta(after, "loraserve_time_to_first_token_seconds_count") == 4
    assert delta(after, "loraserve_request_duration_seconds_count") == 4
    assert delta(after, "loraserve_inter_token_latency_seconds_count") == completion - 4
    assert delta(after, "loraserve_request_duration_seconds_sum") > 0
    for name in ("loraserve_kv_blocks_capacity", "loraserve_adapter_slots", "loraserve_adapters_on_device",
                 "loraserve_adapter_loads_total"):
        assert parse_metric(after, name) >= 1, name
    assert "loraserve_adapters_in_host_memory" in after and "loraserve_adapter_evictions_total" in after
    assert "loraserve_adapter_load_seconds_total" in after and "loraserve_batch_size" in after
    # One structured log line per request, with the fields an operator greps for.
    lines = server.request_lines()
    assert len(lines) >= 5
    assert {"request_id", "adapter", "prompt_tokens", "completion_tokens", "latency_s", "status"} <= set(lines[-1])
