"""The soak's traffic: tenants, adapters, and every kind of request it sends, each with the statuses it allows.

A request's outcome is "expected" when its status is one its kind allows (and, where given, the message
says the right thing): a normal request must succeed (initech may also meet its concurrency quota), a
cancelled stream ends CANCELLED, an expired deadline DEADLINE_EXCEEDED, and each bad request gets the
status docs/api.md's tables give it. Anything else is unexpected, and the soak fails on the first one.

Normal requests go over gRPC and, a fifth of them, over the OpenAI-compatible HTTP API (with
`return_token_ids`, so their greedy answers join the replay check); bad requests cover both protocols.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import random
import secrets
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Optional

import grpc
import httpx
import torch
from safetensors.torch import save

from server.api.gen.loraserve.v1 import adapters_pb2 as apb
from server.api.gen.loraserve.v1 import adapters_pb2_grpc as apb_grpc
from server.api.gen.loraserve.v1 import inference_pb2 as ipb
from server.api.gen.loraserve.v1 import inference_pb2_grpc as ipb_grpc
from server.client.sse import sse_data
from server.model.config import TARGET_MODULES, ModelConfig

OK = grpc.StatusCode.OK
TENANT_ADAPTERS = {"acme": 16, "globex": 14, "initech": 10}  # 40 adapters in all
HOT = [f"hot-{i}" for i in range(4)]  # acme's adapters that get a new version every few seconds
HOT_VARIANTS = 6                      # weight sets the hot versions cycle through (bounded disk)
PROMPTS = ["The capital of France is", "Write a haiku about rivers.", "List three prime numbers:",
           "Once upon a time", "def fibonacci(n):", "Translate to French: good morning",
           "The quick brown fox", "Explain what a GPU does in one sentence."]
MAX_NEW = (8, 12, 16)
HTTP_SHARE = 0.2                      # of normal requests, sent over the HTTP API


def make_lora(mc: ModelConfig, rank: int, targets: tuple[str, ...], seed: int) -> tuple[bytes, bytes]:
    """(adapter_config.json, adapter_model.safetensors) of a random PEFT LoRA for `mc`, stored in bf16."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(mc.num_layers):
        for t in targets:
            out_f, in_f = mc.target_shape(t)
            block = "self_attn" if t in ("q", "k", "v", "o") else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{TARGET_MODULES[t]}"
            tensors[f"{prefix}.lora_A.weight"] = (torch.randn(rank, in_f, generator=g) * 0.05).to(torch.bfloat16)
            tensors[f"{prefix}.lora_B.weight"] = (torch.randn(out_f, rank, generator=g) * 0.05).to(torch.bfloat16)
    cfg = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "bias": "none", "task_type": "CAUSAL_LM",
           "target_modules": [TARGET_MODULES[t] for t in targets]}
    return json.dumps(cfg).encode(), save(tensors)


def tenants_toml(keys: dict[str, str]) -> str:
    """Three tenants: initech may run 2 requests at once, globex may store 15 adapter names."""
    limits = {"acme": "", "globex": "max_adapters = 15\n", "initech": "max_concurrent_requests = 2\n"}
    out = []
    for name, key in keys.items():
        out.append(f'[tenants.{name}]\napi_keys = ["sha256:{hashlib.sha256(key.encode()).hexdigest()}"]\n'
                   f"{limits[name]}")
    return "\n".join(out)


def upload(name: str, cfg: bytes, weights: bytes, chunk: int = 1 << 20, total_size: Optional[int] = None,
           **header: Any):
    yield apb.RegisterAdapterRequest(header=apb.RegisterAdapterHeader(
        name=name, adapter_config_json=cfg.decode(), total_size=len(weights) if total_size is None else total_size,
        **header))
    for i in range(0, len(weights), chunk):
        yield apb.RegisterAdapterRequest(chunk=weights[i:i + chunk])


@dataclass
class Outcome:
    kind: str
    tenant: str
    allowed: tuple[grpc.StatusCode, ...]
    code: grpc.StatusCode = OK
    details: str = ""
    must_say: str = ""          # a word the refusal's message must contain
    allowed_http: tuple[int, ...] = ()  # an HTTP API call: the HTTP statuses it may get
    http_status: int = 0
    started: float = 0.0
    latency_s: float = 0.0
    ttft_s: Optional[float] = None
    adapter_id: str = ""
    version: int = 0
    request: Optional[ipb.GenerateRequest] = None
    token_ids: list[int] = field(default_factory=list)

    @property
    def status(self) -> str:
        """The gRPC code's name, or HTTP_<n> for an HTTP answer other than 200."""
        return f"HTTP_{self.http_status}" if self.http_status not in (0, 200) else self.code.name

    @property
    def expected(self) -> bool:
        if self.allowed_http:
            if self.http_status not in self.allowed_http:
                return False
            return self.http_status == 200 or not self.must_say or self.must_say in self.details
        if self.code not in self.allowed:
            return False
        return self.code == OK or not self.must_say or self.must_say in self.details

    @property
    def greedy_ok(self) -> bool:
        return (self.code == OK and self.kind == "normal" and self.request is not None
                and self.request.params.temperature == 0)


class Traffic:
    """Sends the soak's requests over one channel; every call returns an Outcome."""

    def __init__(self, channel: grpc.aio.Channel, keys: dict[str, str], mc: ModelConfig, context_len: int,
                 rng: random.Random, http_base: str, base_model: str):
        self.channel, self.keys, self.mc, self.context_len, self.rng = channel, keys, mc, context_len, rng
        self.http = httpx.AsyncClient(base_url=http_base, timeout=600)
        self.base_model = base_model  # the HTTP API's id for the base model
        self.inference = ipb_grpc.InferenceStub(channel)
        self.adapters = apb_grpc.AdaptersStub(channel)
        self.names = {t: [f"{t}-{i:02d}" for i in range(n)] for t, n in TENANT_ADAPTERS.items()}
        self.hot_versions: dict[str, int] = {}
        self.bad_index = 0
        self._catalogue: Optional[list] = None
        self.quota_names = 0
        self.registrations: list[float] = []

    def md(self, tenant: str) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.keys[tenant]}")]

    # ---- set-up ----------------------------------------------------------------------------------
    async def register_all(self) -> None:
        for tenant, names in self.names.items():
            for i, name in enumerate(names):
                cfg, w = make_lora(self.mc, 4, ("q", "v"), seed=zlib.crc32(f"{tenant}-{i}".encode()))
                await self.adapters.RegisterAdapter(upload(name, cfg, w), metadata=self.md(tenant), timeout=300)
        for h in HOT:
            await self.hot_swap(h)
        # An operator pin on one adapter: deleting it must be refused (FAILED_PRECONDITION) throughout.
        await self.adapters.LoadAdapter(apb.LoadAdapterRequest(adapter_id="acme-00", pin=True),
                                        metadata=self.md("acme"), timeout=300)

    async def hot_swap(self, name: str) -> Outcome:
        """A new version of a hot adapter, its weights one of HOT_VARIANTS sets (new bytes than the last)."""
        v = self.hot_versions.get(name, 0) + 1
        cfg, w = make_lora(self.mc, 4, ("q", "v", "o"), seed=50_000 + HOT.index(name) * 100 + v % HOT_VARIANTS)
        out = Outcome("hot_swap", "acme", (OK,), started=time.monotonic())
        try:
            r = await self.adapters.RegisterAdapter(upload(name, cfg, w), metadata=self.md("acme"), timeout=300)
            self.hot_versions[name] = r.version.version
            out.adapter_id, out.version = name, r.version.version
        except grpc.aio.AioRpcError as e:
            out.code, out.details = e.code(), e.details() or ""
        out.latency_s = time.monotonic() - out.started
        self.registrations.append(out.latency_s)
        return out

    # ---- inference -------------------------------------------------------------------------------
    def _request(self, tenant: str, greedy: bool) -> ipb.GenerateRequest:
        r = self.rng.random()
        if r < 0.1:
            adapter = ""
        elif r < 0.3 and tenant == "acme":
            adapter = self.rng.choice(HOT)
        else:
            adapter = self.rng.choice(self.names[tenant])
        params = ipb.SamplingParams(max_new_tokens=self.rng.choice(MAX_NEW), ignore_eos=True)
        if not greedy:
            params.temperature, params.top_p, params.seed = 0.8, 0.9, self.rng.randrange(1 << 30)
        prompt = self.rng.choice(PROMPTS)
        if self.rng.random() < 0.25:
            msgs = ipb.ChatMessages(messages=[ipb.ChatMessage(role="user", content=prompt)])
            return ipb.GenerateRequest(adapter_id=adapter, messages=msgs, params=params)
        return ipb.GenerateRequest(adapter_id=adapter, prompt=prompt, params=params)

    async def generate(self, out: Outcome, req: ipb.GenerateRequest, stream: bool, timeout: float = 600,
                       cancel_after_first: bool = False) -> Outcome:
        out.request, out.started = req, time.monotonic()
        md = self.md(out.tenant)
        try:
            if stream:
                call = self.inference.GenerateStream(req, metadata=md, timeout=timeout)
                async for chunk in call:
                    if chunk.token_ids and out.ttft_s is None:
                        out.ttft_s = time.monotonic() - out.started
                    out.token_ids.extend(chunk.token_ids)
                    out.adapter_id = chunk.adapter_id or out.adapter_id
                    out.version = chunk.adapter_version or out.version
                    if cancel_after_first:
                        call.cancel()
                        break
                out.code = await call.code()
                out.details = await call.details() or ""
            else:
                r = await self.inference.Generate(req, metadata=md, timeout=timeout)
                out.token_ids, out.adapter_id, out.version = list(r.token_ids), r.adapter_id, r.adapter_version
        except grpc.aio.AioRpcError as e:
            out.code, out.details = e.code(), e.details() or ""
        except asyncio.CancelledError:
            out.code = grpc.StatusCode.CANCELLED
        out.latency_s = time.monotonic() - out.started
        return out

    def _normal_allowed(self, tenant: str) -> tuple[tuple[grpc.StatusCode, ...], str]:
        if tenant == "initech":  # its bursts hold both of its concurrency slots now and then
            return (OK, grpc.StatusCode.RESOURCE_EXHAUSTED), "max_concurrent_requests"
        return (OK,), ""

    async def normal(self) -> Outcome:
        tenant = self.rng.choice(list(TENANT_ADAPTERS))
        allowed, say = self._normal_allowed(tenant)
        req = self._request(tenant, greedy=self.rng.random() < 0.6)
        out = Outcome("normal", tenant, allowed, must_say=say)
        if self.rng.random() < HTTP_SHARE:
            out.allowed_http = (200, 429) if grpc.StatusCode.RESOURCE_EXHAUSTED in allowed else (200,)
            return await self.generate_http(out, req, self.rng.random() < 0.5)
        return await self.generate(out, req, self.rng.random() < 0.5)

    async def generate_http(self, out: Outcome, req: ipb.GenerateRequest, stream: bool) -> Outcome:
        """`req` as the OpenAI API states it (completions or chat), token ids returned: the replay can check it."""
        out.request, out.started = req, time.monotonic()
        p = req.params
        body: dict[str, Any] = {"model": req.adapter_id or self.base_model, "max_tokens": p.max_new_tokens,
                                "temperature": p.temperature, "ignore_eos": True, "return_token_ids": True,
                                "stream": stream}
        if p.temperature:
            body.update(top_p=p.top_p, seed=p.seed)
        if req.HasField("messages"):
            path = "/v1/chat/completions"
            body["messages"] = [{"role": m.role, "content": m.content} for m in req.messages.messages]
        else:
            path, body["prompt"] = "/v1/completions", req.prompt
        headers = {"Authorization": f"Bearer {self.keys[out.tenant]}"}
        try:
            if stream:
                async with self.http.stream("POST", path, json=body, headers=headers) as r:
                    out.http_status = r.status_code
                    if r.status_code != 200:
                        out.details = _http_message((await r.aread()).decode("utf-8", "replace"))
                    else:
                        async for data in sse_data(r):
                            if data.startswith("{"):
                                self._http_chunk(out, json.loads(data))
            else:
                r = await self.http.post(path, json=body, headers=headers)
                out.http_status = r.status_code
                if r.status_code != 200:
                    out.details = _http_message(r.text)
                else:
                    self._http_chunk(out, r.json())
        except httpx.HTTPError as e:
            out.http_status, out.details = -1, f"{type(e).__name__}: {e}"
        if out.http_status != 200:
            out.code = grpc.StatusCode.UNKNOWN  # not OK: the HTTP status says what it was
        out.latency_s = time.monotonic() - out.started
        return out

    @staticmethod
    def _http_chunk(out: Outcome, chunk: dict[str, Any]) -> None:
        if "error" in chunk:  # an error after the stream began
            out.http_status, out.details = int(chunk["error"].get("code") or 500), chunk["error"].get("message", "")
            return
        for choice in chunk.get("choices") or ():
            ids = choice.get("token_ids") or []
            if ids and out.ttft_s is None:
                out.ttft_s = time.monotonic() - out.started
            out.token_ids.extend(ids)
        name, _, version = str(chunk.get("model", "")).partition("@")
        if version:  # "name@N": an adapter served it; the base model's id has no version
            out.adapter_id, out.version = name, int(version)

    async def cancelled(self) -> Outcome:
        tenant = self.rng.choice(["acme", "globex"])
        req = self._request(tenant, greedy=True)
        req.params.max_new_tokens = 64
        out = Outcome("cancelled", tenant, (grpc.StatusCode.CANCELLED, OK))
        return await self.generate(out, req, stream=True, cancel_after_first=True)

    async def deadline(self) -> Outcome:
        tenant = self.rng.choice(["acme", "globex"])
        req = self._request(tenant, greedy=True)
        req.params.max_new_tokens = 128
        out = Outcome("deadline", tenant, (grpc.StatusCode.DEADLINE_EXCEEDED,))
        return await self.generate(out, req, stream=self.rng.random() < 0.5, timeout=0.05)

    async def burst(self) -> list[Outcome]:
        """initech sends 5 at once against its quota of 2 concurrent requests."""
        reqs = [self._request("initech", greedy=True) for _ in range(5)]
        for r in reqs:
            r.params.max_new_tokens = 16
        return list(await asyncio.gather(*(self.generate(
            Outcome("quota_burst", "initech", (OK, grpc.StatusCode.RESOURCE_EXHAUSTED),
                    must_say="max_concurrent_requests"), r, stream=False) for r in reqs)))

    async def over_name_quota(self) -> Outcome:
        """globex stores 14 names of its 15; a 16th name is refused (the 15th succeeds once)."""
        self.quota_names += 1
        cfg, w = make_lora(self.mc, 2, ("q",), seed=70_000 + self.quota_names)
        out = Outcome("quota_names", "globex", (OK, grpc.StatusCode.RESOURCE_EXHAUSTED), must_say="max_adapters",
                      started=time.monotonic())
        try:
            await self.adapters.RegisterAdapter(upload(f"extra-{self.quota_names}", cfg, w),
                                                metadata=self.md("globex"), timeout=300)
        except grpc.aio.AioRpcError as e:
            out.code, out.details = e.code(), e.details() or ""
        out.latency_s = time.monotonic() - out.started
        return out

    # ---- bad requests: every row of docs/api.md's status tables -----------------------------------
    def bad_catalogue(self) -> list[tuple[str, Any, str, Callable[[], Awaitable[Any]]]]:
        """(name, gRPC status or HTTP status, a word its message must contain, the call); built once."""
        if self._catalogue is None:
            self._catalogue = self._build_catalogue()
        return self._catalogue

    def _build_catalogue(self) -> list[tuple[str, Any, str, Callable[[], Awaitable[Any]]]]:
        A, I = self.adapters, self.inference
        acme = self.md("acme")

        def gen(adapter: str = "acme-01", metadata=None, **params: Any):
            p = ipb.SamplingParams(max_new_tokens=params.pop("max_new_tokens", 4), **params)
            return lambda: I.Generate(ipb.GenerateRequest(adapter_id=adapter, prompt="hi", params=p),
                                      metadata=metadata or acme, timeout=60)

        def gen_ids(ids: list[int]):
            return lambda: I.Generate(ipb.GenerateRequest(prompt_token_ids=ipb.TokenIds(ids=ids),
                                                          params=ipb.SamplingParams(max_new_tokens=2)),
                                      metadata=acme, timeout=60)

        def reg(name: str, cfg: bytes, w: bytes, messages=None, **header: Any):
            msgs = messages if messages is not None else list(upload(name, cfg, w, **header))
            return lambda: A.RegisterAdapter(iter(msgs), metadata=acme, timeout=60)

        good_cfg, good_w = make_lora(self.mc, 2, ("q",), seed=1)
        nan_w = bytearray(good_w)
        nan_w[-2:] = b"\xc0\x7f"  # the last bf16 value becomes NaN
        dora = json.dumps({**json.loads(good_cfg), "use_dora": True}).encode()
        lm_head = json.dumps({**json.loads(good_cfg), "target_modules": ["lm_head"]}).encode()
        header = apb.RegisterAdapterRequest(header=apb.RegisterAdapterHeader(name="x", adapter_config_json="{}"))
        chunk = apb.RegisterAdapterRequest(chunk=b"abc")
        raw = self.channel.unary_unary("/loraserve.v1.Inference/Generate")
        post = self._http_refusal
        IA, NF, RE = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED
        cat = [
            ("unknown adapter", NF, "not found", gen("no-such-adapter")),
            ("another tenant's adapter", NF, "not found", gen("globex-01")),
            ("temperature out of range", IA, "temperature", gen(temperature=200.0)),
            ("top_k out of range", IA, "top_k", gen(top_k=-1)),
            ("max_new_tokens past the context", IA, "max_new_tokens", gen(max_new_tokens=self.context_len + 10)),
            ("token id out of range", IA, "prompt_token_ids", gen_ids([self.mc.vocab_size + 5])),
            ("empty input", IA, "prompt", gen_ids([])),
            ("request over --max-request-bytes", RE, "larger than max",
             lambda: I.Tokenize(ipb.TokenizeRequest(prompt="x" * (5 << 20)), metadata=acme, timeout=60)),
            ("undecodable request bytes", IA, "do not decode",
             lambda: raw(b"\xff\xff\xff\xff\x0f", metadata=acme, timeout=60)),
            ("no API key", grpc.StatusCode.UNAUTHENTICATED, "missing API key", gen(metadata=[("x", "y")])),
            ("wrong API key", grpc.StatusCode.UNAUTHENTICATED, "invalid API key",
             gen(metadata=[("authorization", "Bearer " + secrets.token_hex(8))])),
            ("acting for another tenant", grpc.StatusCode.PERMISSION_DENIED, "may not act",
             gen(metadata=acme + [("x-loraserve-tenant", "globex")])),
            ("delete while pinned", grpc.StatusCode.FAILED_PRECONDITION, "pinned",
             lambda: A.DeleteAdapter(apb.DeleteAdapterRequest(adapter_id="acme-00"), metadata=acme, timeout=60)),
            ("upload: first message not a header", IA, "header", reg("x", b"", b"", messages=[chunk])),
            ("upload: empty stream", IA, "header", reg("x", b"", b"", messages=[])),
            ("upload: two headers", IA, "header", reg("x", b"", b"", messages=[header, header])),
            ("upload: truncated", IA, "truncated", reg("x", good_cfg, good_w, total_size=len(good_w) + 7)),
            ("upload: header only", IA, "no adapter_model.safetensors", reg("x", good_cfg, b"")),
            ("upload: server_path without --import-dir", grpc.StatusCode.PERMISSION_DENIED, "import",
             reg("x", b"", b"", messages=[apb.RegisterAdapterRequest(header=apb.RegisterAdapterHeader(
                 name="x", server_path="/etc"))])),
            ("upload: pickle .bin bytes", IA, "pickle", reg("x", good_cfg, b"PK\x03\x04" + b"\0" * 64)),
            ("upload: truncated safetensors", IA, "truncated", reg("x", good_cfg, good_w[:5])),
            ("upload: NaN in a weight", IA, "NaN", reg("x", good_cfg, bytes(nan_w))),
            ("upload: DoRA", IA, "DoRA", reg("x", dora, good_w)),
            ("upload: lm_head target", IA, "lm_head", reg("x", lm_head, good_w)),
            ("upload: bad name", IA, "name", reg("Bad Name", good_cfg, good_w)),
        ]
        cat += [(f"malformed id {bad!r}", IA, "adapter_id", gen(bad))
                for bad in ("../x", "A", "n@0", "n@01", "n@x", "a" * 65, "n@2147483648")]
        cat += [
            ("top_logprobs without logprobs", IA, "top_logprobs", gen(top_logprobs=3)),
            ("top_logprobs over 20", IA, "top_logprobs", gen(logprobs=True, top_logprobs=21)),
            ("prompt longer than the context", IA, "prompt", gen_ids([1] * (self.context_len + 1))),
        ]
        # The same refusals over the HTTP API, with the HTTP statuses docs/api.md gives them.
        body = {"model": "acme-01", "prompt": "hi", "max_tokens": 4}
        cat += [
            ("HTTP: no API key", 401, "missing API key", post(body, key="")),
            ("HTTP: wrong API key", 401, "invalid API key", post(body, key=secrets.token_hex(8))),
            ("HTTP: acting for another tenant", 403, "may not act", post(body, tenant="globex")),
            ("HTTP: unknown model", 404, "not found", post({**body, "model": "no-such-adapter"})),
            ("HTTP: another tenant's adapter", 404, "not found", post({**body, "model": "globex-01"})),
            ("HTTP: body not JSON", 400, "JSON", post(content=b'{"model": ')),
            ("HTTP: unknown field", 400, "not a field", post({**body, "frobnicate": 1})),
            ("HTTP: temperature out of range", 400, "temperature", post({**body, "temperature": 200})),
            ("HTTP: malformed model id (one answer with unknown ones)", 404, "not found",
             post({**body, "model": "n@0"})),
            ("HTTP: body over --max-request-bytes", 413, "max-request-bytes",
             post({**body, "prompt": "x" * (5 << 20)})),
        ]
        return cat

    def _http_refusal(self, body: Optional[dict] = None, content: Optional[bytes] = None, key: Optional[str] = None,
                      tenant: str = "") -> Callable[[], Awaitable[tuple[int, str]]]:
        """A POST /v1/completions as acme (or with `key`): returns (HTTP status, the error's message)."""
        headers = {"Authorization": f"Bearer {self.keys['acme'] if key is None else key}"} if key != "" else {}
        if tenant:
            headers["x-loraserve-tenant"] = tenant

        async def call() -> tuple[int, str]:
            r = await self.http.post("/v1/completions", json=body, content=content,
                                     headers={**headers, "Content-Type": "application/json"})
            return r.status_code, _http_message(r.text)

        return call

    async def bad(self) -> Outcome:
        cat = self.bad_catalogue()
        name, code, say, call = cat[self.bad_index % len(cat)]
        self.bad_index += 1
        if isinstance(code, int):  # an HTTP API call
            out = Outcome(f"bad: {name}", "acme", (), must_say=say, allowed_http=(code,), started=time.monotonic())
            try:
                out.http_status, out.details = await call()
            except httpx.HTTPError as e:
                out.http_status, out.details = -1, f"{type(e).__name__}: {e}"
            out.code = OK if out.http_status == 200 else grpc.StatusCode.UNKNOWN
        else:
            out = Outcome(f"bad: {name}", "acme", (code,), must_say=say, started=time.monotonic())
            try:
                await call()
            except grpc.aio.AioRpcError as e:
                out.code, out.details = e.code(), e.details() or ""
        out.latency_s = time.monotonic() - out.started
        return out

    async def close(self) -> None:
        await self.http.aclose()


def _http_message(text: str) -> str:
    """The OpenAI-shaped error's message (or the raw body when it is not one)."""
    try:
        return str(json.loads(text)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return text[:300]
