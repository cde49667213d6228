"""TLS and mutual TLS through the real server, on every listener (gRPC, the OpenAI-compatible HTTP API,
/metrics), with a CA and certificates generated in the test.

Our clients (`generate`, `adapters`, `bench` over gRPC and over HTTP, the trainer's registration) reach a
TLS server with `--tls-ca`; a plaintext client and one trusting another CA are refused; with
`--tls-client-ca` a client without a certificate, or with one from another CA, is refused; SIGHUP serves a
new certificate to new connections on every port while streams opened before it run to their end.
"""
from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import signal
import socket
import ssl
import urllib.request
from pathlib import Path

import grpc
import httpx
import pytest

from server import cli
from server.api.gen.loraserve.v1 import inference_pb2 as ipb
from server.api.gen.loraserve.v1 import inference_pb2_grpc as ipb_grpc
from server.client.channel import ClientTls, open_channel
from tests.certs import Issued, issue, make_ca
from tests.e2e.conftest import start_server
from tests.registry.adapters import make_adapter
from tests.reliability.conftest import TINY_SERVER_ARGS, tiny_config  # noqa: F401 - fixture

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _request(n: int = 3) -> ipb.GenerateRequest:
    return ipb.GenerateRequest(prompt="hello", params=ipb.SamplingParams(max_new_tokens=n, ignore_eos=True))


def _status(channel: grpc.Channel) -> grpc.StatusCode:
    try:
        ipb_grpc.InferenceStub(channel).Generate(_request(), timeout=10)
    except grpc.RpcError as e:
        return e.code()
    finally:
        channel.close()
    return grpc.StatusCode.OK


def _served_fingerprint(port: int, ca: Issued, client: Issued | None = None, tmp: Path | None = None,
                        alpn: str = "h2") -> str:
    """sha256 of the certificate a fresh TLS connection to `port` is shown (ALPN h2 as gRPC speaks, or
    http/1.1 as the HTTP API does)."""
    ctx = ssl.create_default_context(cadata=ca.cert_pem.decode())
    ctx.set_alpn_protocols([alpn])
    if client is not None and tmp is not None:
        ctx.load_cert_chain(*client.write(tmp, "probe"))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            return hashlib.sha256(s.getpeercert(binary_form=True)).hexdigest()


def _completion(base_url: str, verify: ssl.SSLContext | bool, model: str = "sec", stream: bool = False,
                max_tokens: int = 3) -> httpx.Response:
    """POST /v1/completions over HTTPS (no auth: the server has no tenants file)."""
    with httpx.Client(base_url=base_url, verify=verify, timeout=30) as client:
        return client.post("/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": max_tokens,
                                                    "ignore_eos": True, "stream": stream})


def _https(ca: Issued, client: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=ca.cert_pem.decode())
    if client is not None:
        ctx.load_cert_chain(*client)
    return ctx


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca, other_ca, client_ca = make_ca("serving CA"), make_ca("another CA"), make_ca("client CA")
    files = {"ca_pem": d / "ca.pem", "other_ca_pem": d / "other_ca.pem", "client_ca_pem": d / "client_ca.pem"}
    files["ca_pem"].write_bytes(ca.cert_pem)
    files["other_ca_pem"].write_bytes(other_ca.cert_pem)
    files["client_ca_pem"].write_bytes(client_ca.cert_pem)
    server = issue(ca, "loraserve")
    files["cert"], files["key"] = server.write(d, "server")
    files["client_cert"], files["client_key"] = issue(client_ca, "alice", server=False).write(d, "alice")
    files["rogue_cert"], files["rogue_key"] = issue(other_ca, "mallory", server=False).write(d, "mallory")
    return {"dir": d, "ca": ca, "other_ca": other_ca, "client_ca": client_ca, "server": server, **files}


def test_tls_end_to_end_refusals_and_sighup_rotation(tmp_path, tiny_dir, tiny_config, pki, capsys):
    tls_dir = tmp_path / "tls"  # this test rewrites its certificate files: its own copies
    cert, key = pki["server"].write(tls_dir, "server")
    sp = start_server(tmp_path, "--model", str(tiny_dir), *TINY_SERVER_ARGS, "--tls-cert", str(cert),
                      "--tls-key", str(key), "--metrics-tls", env={"LORASERVE_HOME": str(tmp_path / "home")})
    try:
        listening = next(r for r in sp.lines if r.get("event") == "listening")
        assert listening["tls"]["fingerprint_sha256"] == pki["server"].fingerprint
        assert listening["tls"]["mutual_tls"] is False and listening["metrics_tls"] is True
        trusted = ClientTls(True, ca=str(pki["ca_pem"]))

        # Every client of ours, over TLS.
        adapter = tmp_path / "adapter"
        adapter.mkdir()
        cfg, weights = make_adapter(model=tiny_config, seed=3)
        (adapter / "adapter_config.json").write_bytes(cfg)
        (adapter / "adapter_model.safetensors").write_bytes(weights)
        tls_flags = ["--target", sp.target, "--tls-ca", str(pki["ca_pem"])]
        assert cli.main(["adapters", "register", "sec", str(adapter), *tls_flags]) == 0
        assert cli.main(["generate", "--adapter", "sec", "--prompt", "hi", "--max-new-tokens", "3", "--json",
                         *tls_flags]) == 0
        out = json.loads(capsys.readouterr().out.split("\n", 1)[1])
        assert out["adapter_id"] == "sec" and len(out["token_ids"]) == 3
        assert cli.main(["bench", "--requests", "2", "--concurrency", "2", "--max-new-tokens", "2",
                         "--min-new-tokens", "2", "--adapters", "sec", *tls_flags]) == 0
        from trainer.register import register_adapter

        reg = register_adapter(adapter, sp.target, "sec", tls=trusted)
        assert reg.adapter_id == "sec@2"
        # /metrics over TLS too; plain HTTP gets nothing.
        https = ssl.create_default_context(cadata=pki["ca"].cert_pem.decode())
        with urllib.request.urlopen(f"https://127.0.0.1:{sp.metrics_port}/metrics", context=https, timeout=10) as r:
            assert b"loraserve_requests_total" in r.read()
        with pytest.raises((OSError, http.client.HTTPException)):  # reset, or no HTTP status line
            urllib.request.urlopen(f"http://127.0.0.1:{sp.metrics_port}/metrics", timeout=5).read()
        # The HTTP API speaks HTTPS only, and the HTTP load generator takes the same --tls-ca.
        https_url = f"https://127.0.0.1:{sp.http_port}"
        assert listening["http_url"] == f"{https_url}/v1"
        r = _completion(https_url, _https(pki["ca"]))
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        assert cli.main(["bench", "--protocol", "http", "--base-url", https_url, "--requests", "2",
                         "--concurrency", "2", "--max-new-tokens", "2", "--min-new-tokens", "2", "--adapters", "sec",
                         "--tls-ca", str(pki["ca_pem"]), "--output", str(tmp_path / "bench_http.json")]) == 0
        assert json.loads((tmp_path / "bench_http.json").read_text())["ok"] == 2
        for verify in (True, _https(pki["other_ca"])):  # the system's CAs, another CA: neither trusts ours
            with pytest.raises(httpx.ConnectError):
                _completion(https_url, verify)
        with pytest.raises(httpx.HTTPError):  # plaintext HTTP to the TLS port: no answer
            _completion(f"http://127.0.0.1:{sp.http_port}", False)

        # Refused: a plaintext client, and a client that trusts another CA.
        assert _status(grpc.insecure_channel(sp.target)) == grpc.StatusCode.UNAVAILABLE
        assert _status(open_channel(sp.target, ClientTls(True, ca=str(pki["other_ca_pem"])))) == \
            grpc.StatusCode.UNAVAILABLE
        assert cli.main(["adapters", "list", "--target", sp.target, "--tls-ca", str(pki["other_ca_pem"]),
                         "--timeout", "10"]) == 1

        # Rotation: a stream opened before SIGHUP finishes; new connections see the new certificate.
        held = open_channel(sp.target, trusted)
        stream = ipb_grpc.InferenceStub(held).GenerateStream(_request(200), timeout=120)
        first = next(stream)
        held_http = contextlib.ExitStack()
        http_client = held_http.enter_context(httpx.Client(base_url=https_url, verify=_https(pki["ca"]), timeout=120))
        body = {"model": "sec", "prompt": "hi", "max_tokens": 200, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        sse = held_http.enter_context(http_client.stream("POST", "/v1/completions", json=body))
        sse_lines = sse.iter_lines()
        first_event = next(line for line in sse_lines if line.startswith("data: {"))
        rotated = issue(pki["ca"], "loraserve rotated")
        rotated.write(tls_dir, "server")  # same paths, new contents, as an operator's renewal does
        sp.proc.send_signal(signal.SIGHUP)
        event = sp.wait_event("tls_reloaded", timeout=30)
        assert event["fingerprint_sha256"] == rotated.fingerprint
        assert _served_fingerprint(sp.port, pki["ca"]) == rotated.fingerprint
        https_port_fp = _served_fingerprint(sp.metrics_port, pki["ca"])
        assert https_port_fp == rotated.fingerprint
        assert _served_fingerprint(sp.http_port, pki["ca"], alpn="http/1.1") == rotated.fingerprint
        assert _completion(https_url, _https(pki["ca"])).status_code == 200
        events = [first_event] + [line for line in sse_lines if line.startswith("data: {")]
        held_http.close()
        # The SSE stream opened on the old certificate ran to its end too.
        assert json.loads(events[-1][6:])["usage"]["completion_tokens"] == 200
        rest = list(stream)  # the stream opened on the old certificate was not dropped
        assert len(first.token_ids) + sum(len(c.token_ids) for c in rest) == 200
        assert rest[-1].finish_reason
        assert _status(held) == grpc.StatusCode.OK  # and its connection still serves
        assert _status(open_channel(sp.target, trusted)) == grpc.StatusCode.OK

        # A bad renewal (key of another certificate) is refused; the current certificate stays.
        wrong_key = issue(pki["ca"], "other")
        key.write_bytes(wrong_key.key_pem)
        sp.proc.send_signal(signal.SIGHUP)
        failed = sp.wait_event("tls_reload_failed", timeout=30)
        assert failed["kept_fingerprint_sha256"] == rotated.fingerprint
        assert _served_fingerprint(sp.port, pki["ca"]) == rotated.fingerprint
        assert _served_fingerprint(sp.http_port, pki["ca"], alpn="http/1.1") == rotated.fingerprint
        assert _status(open_channel(sp.target, trusted)) == grpc.StatusCode.OK
    finally:
        assert sp.stop() == 0, sp.log_tail()


def test_mutual_tls_refuses_clients_without_a_certificate_from_the_client_ca(tmp_path, tiny_dir, pki):
    base_model = tiny_dir.name  # the HTTP API's id for the base model: the model directory's name
    sp = start_server(tmp_path, "--model", str(tiny_dir), *TINY_SERVER_ARGS, "--tls-cert", str(pki["cert"]),
                      "--tls-key", str(pki["key"]), "--tls-client-ca", str(pki["client_ca_pem"]), "--metrics-tls",
                      env={"LORASERVE_HOME": str(tmp_path / "home")})
    try:
        with_cert = ClientTls(True, ca=str(pki["ca_pem"]), cert=str(pki["client_cert"]), key=str(pki["client_key"]))
        assert _status(open_channel(sp.target, with_cert)) == grpc.StatusCode.OK
        assert cli.main(["adapters", "list", "--target", sp.target, "--tls-ca", str(pki["ca_pem"]), "--tls-cert",
                         str(pki["client_cert"]), "--tls-key", str(pki["client_key"])]) == 0
        no_cert = ClientTls(True, ca=str(pki["ca_pem"]))
        rogue = ClientTls(True, ca=str(pki["ca_pem"]), cert=str(pki["rogue_cert"]), key=str(pki["rogue_key"]))
        for refused in (no_cert, rogue):
            assert _status(open_channel(sp.target, refused)) == grpc.StatusCode.UNAVAILABLE
        assert _status(grpc.insecure_channel(sp.target)) == grpc.StatusCode.UNAVAILABLE
        # /metrics asks for the same client certificate.
        https = ssl.create_default_context(cadata=pki["ca"].cert_pem.decode())
        with pytest.raises((OSError, http.client.HTTPException)):  # the handshake refused (URLError, SSLError)
            urllib.request.urlopen(f"https://127.0.0.1:{sp.metrics_port}/metrics", context=https, timeout=5).read()
        https.load_cert_chain(pki["client_cert"], pki["client_key"])
        with urllib.request.urlopen(f"https://127.0.0.1:{sp.metrics_port}/metrics", context=https, timeout=10) as r:
            assert b"loraserve_requests_total" in r.read()
        # The HTTP API asks for it too.
        https_url = f"https://127.0.0.1:{sp.http_port}"
        client_pair = (pki["client_cert"], pki["client_key"])
        assert _completion(https_url, _https(pki["ca"], client_pair), model=base_model).status_code == 200
        for refused_pair in (None, (pki["rogue_cert"], pki["rogue_key"])):
            with pytest.raises(httpx.HTTPError):  # the handshake (or the first read after it) fails
                _completion(https_url, _https(pki["ca"], refused_pair), model=base_model)
        # The plaintext/other-CA attempts never reached a handler: nothing served them.
        ok = [r for r in sp.request_lines() if r["status"] == "OK"]
        assert len(ok) == 2
    finally:
        assert sp.stop() == 0, sp.log_tail()


def test_a_mismatched_key_stops_start_up_with_a_message(tmp_path, tiny_dir, pki):
    """Exit code 2 and one line saying what is wrong (tests/api/test_tls.py covers every bad-file case)."""
    from tests.e2e.conftest import start_refused

    wrong_key = issue(pki["ca"], "x").write(tmp_path, "x")[1]
    error = start_refused("--model", str(tiny_dir), "--port", "0", "--metrics-port", "-1", "--registry",
                          str(tmp_path / "reg"), "--tls-cert", str(pki["cert"]), "--tls-key", str(wrong_key))
    assert "does not belong to the certificate" in error
