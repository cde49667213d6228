"""The real server and SmolLM2 driven by the official `openai` client, side by side with gRPC.

One server (tenants, two adapters for one tenant, one for another, `--quantize none`): the
client's completions, chat, streaming, `n`, logprobs and models list; its typed exceptions; a
greedy request gives the same tokens over HTTP and gRPC, adapters and base mixed in concurrent
batches; and the real /metrics output (both ports) passes `promtool check metrics`.
"""
from __future__ import annotations

import concurrent.futures as cf
import hashlib
import shutil
import subprocess
import urllib.request
from pathlib import Path

import openai
import pytest

from server.api.gen.loraserve.v1 import inference_pb2 as pb
from server.api.gen.loraserve.v1 import inference_pb2_grpc as pb_grpc

from .conftest import ServerProcess, start_server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

KEYS = {"acme": "acme-secret", "other": "other-secret", "small": "small-secret"}
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time,"]
N_NEW = 6


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, peft_adapters: dict[str, Path]) -> ServerProcess:
    tmp = tmp_path_factory.mktemp("http")
    tenants = tmp / "tenants.toml"
    tenants.write_text("".join(
        f'[tenants.{t}]\napi_keys = ["sha256:{hashlib.sha256(k.encode()).hexdigest()}"]\n'
        + ("max_tokens_per_minute = 1\n" if t == "small" else "") for t, k in KEYS.items()))
    sp = start_server(tmp, "--quantize", "none", "--dtype", "float32", "--device", "cpu", "--max-batch-size", "8",
                      "--max-model-len", "512", "--kv-cache-tokens", "4096", "--tenants", str(tenants),
                      "--adapter", f"acme/alpha={peft_adapters['alpha']}",
                      "--adapter", f"acme/beta={peft_adapters['beta']}",
                      "--adapter", f"other/gamma={peft_adapters['beta']}")
    yield sp
    assert sp.stop() == 0, sp.log_tail()


def client(server: ServerProcess, tenant: str = "acme") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=KEYS.get(tenant, tenant), max_retries=0,
                         timeout=300)


def grpc_tokens(stub: pb_grpc.InferenceStub, adapter: str, prompt: str) -> list[int]:
    req = pb.GenerateRequest(adapter_id=adapter, prompt=prompt,
                             params=pb.SamplingParams(max_new_tokens=N_NEW, ignore_eos=True))
    return list(stub.Generate(req, metadata=(("authorization", f"Bearer {KEYS['acme']}"),), timeout=300).token_ids)


def http_tokens(c: openai.OpenAI, adapter: str, prompt: str) -> list[int]:
    out = c.completions.create(model=adapter or "default", prompt=prompt, max_tokens=N_NEW, temperature=0,
                               extra_body={"ignore_eos": True, "return_token_ids": True})
    assert out.model == (f"{adapter}@1" if adapter else "default")
    return out.choices[0].model_extra["token_ids"]


def test_greedy_tokens_identical_over_http_and_grpc_in_mixed_batches(server: ServerProcess) -> None:
    c = client(server)
    jobs = [(a, p) for p in PROMPTS[:2] for a in ("", "alpha", "beta")]
    with server.channel() as ch, cf.ThreadPoolExecutor(len(jobs) * 2) as pool:
        stub = pb_grpc.InferenceStub(ch)
        over_http = [pool.submit(http_tokens, c, a, p) for a, p in jobs]
        over_grpc = [pool.submit(grpc_tokens, stub, a, p) for a, p in jobs]
        for (a, p), h, g in zip(jobs, over_http, over_grpc):
            assert h.result() == g.result() and len(g.result()) == N_NEW, (a, p)


def test_the_openai_client_end_to_end(server: ServerProcess) -> None:
    c = client(server)
    ids = [m.id for m in c.models.list().data]
    assert ids == ["default", "alpha", "alpha@1", "beta", "beta@1"]
    assert c.models.retrieve("beta").root == "beta@1"
    two = c.completions.create(model="alpha", prompt=PROMPTS[0], n=2, max_tokens=6, temperature=0.8, seed=3,
                               logprobs=2, extra_body={"ignore_eos": True})
    assert two.model == "alpha@1" and [ch.index for ch in two.choices] == [0, 1]
    assert two.usage.completion_tokens == 12 and two.usage.prompt_tokens > 0
    for ch in two.choices:
        assert len(ch.logprobs.token_logprobs) == 6 and all(lp <= 0 for lp in ch.logprobs.token_logprobs)
    # Chat, streamed; the first chunk names the role, the last the finish reason.
    stream = c.chat.completions.create(model="beta", messages=[{"role": "user", "content": "Say hi."}], max_tokens=6,
                                       temperature=0, stream=True, stream_options={"include_usage": True},
                                       logprobs=True, top_logprobs=3)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].usage.completion_tokens >= 1
    content = [ch for ch in chunks if ch.choices and ch.choices[0].logprobs]
    assert content and all(len(t.top_logprobs) == 3 for ch in content for t in ch.choices[0].logprobs.content)
    assert chunks[-2].choices[0].finish_reason in ("stop", "length") and chunks[-2].model == "beta@1"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    same = c.chat.completions.create(model="beta@1", messages=[{"role": "user", "content": "Say hi."}], max_tokens=6,
                                     temperature=0)
    assert same.choices[0].message.content == text


def test_typed_exceptions(server: ServerProcess) -> None:
    with pytest.raises(openai.AuthenticationError):
        client(server, "not-a-key").models.list()
    with pytest.raises(openai.NotFoundError) as e:  # another tenant's adapter: the same as a missing one
        client(server).completions.create(model="gamma", prompt="x", max_tokens=2)
    assert e.value.code == "model_not_found" and e.value.body["message"] == "model 'gamma' not found"
    with pytest.raises(openai.BadRequestError) as e:
        client(server).chat.completions.create(model="alpha", messages=[{"role": "user", "content": "x"}],
                                               temperature=500)
    assert e.value.param == "temperature"
    small = client(server, "small")
    small.completions.create(model="default", prompt="x", max_tokens=1)
    with pytest.raises(openai.RateLimitError) as e:
        small.completions.create(model="default", prompt="x", max_tokens=1)
    assert "max_tokens_per_minute" in e.value.message
    with pytest.raises(openai.NotFoundError):  # tenant isolation holds for the models list too
        client(server, "other").models.retrieve("alpha")
    assert [m.id for m in client(server, "other").models.list().data] == ["default", "gamma", "gamma@1"]


def test_real_metrics_pass_promtool_on_both_ports(server: ServerProcess) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: install Debian's prometheus package (make install does)"
    with urllib.request.urlopen(server.base_url + "/health", timeout=10) as r:
        assert r.status == 200
    for url in (f"http://127.0.0.1:{server.metrics_port}/metrics", server.base_url + "/metrics"):
        with urllib.request.urlopen(url, timeout=10) as r:
            text = r.read().decode()
        for name in ("loraserve_requests_waiting", "loraserve_requests_running", "loraserve_kv_cache_usage_ratio",
                     "loraserve_lora_requests_info", "loraserve_cache_config_info"):
            assert f"\n{name}" in text, name
        assert 'max_lora="8"' in text
        check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True,
                               timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr
