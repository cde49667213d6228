"""The deployment files stay valid and agree with each other (fast: no replicas started).

deploy/haproxy/haproxy.cfg is also run for real by test_fleet.py; the Kubernetes and Envoy files
are checked here only: parsed, HAProxy's config in the ConfigMap validated by `haproxy -c`, and
their routing, health and drain settings compared with what the tested file does.
"""
from __future__ import annotations

import re
import subprocess

import pytest
import yaml

from server.client.routing import ADAPTER_HEADER
from server.fleet.haproxy import CONFIG, ROUND_ROBIN, Haproxy, find_haproxy, grpc_health_check_bytes

DEPLOY = CONFIG.parents[1]
K8S = DEPLOY / "k8s"


def k8s_docs() -> dict[tuple[str, str], dict]:
    out = {}
    for f in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            if doc and "kind" in doc and doc["kind"] != "Kustomization":
                out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


def backend_rules(cfg: str) -> list[str]:
    """The lines of `backend replicas` that decide routing and health, without addresses and intervals."""
    body = re.split(r"\n(?:frontend|backend|listen|defaults|global)\b", cfg.split("\nbackend replicas\n", 1)[1])[0]
    rules = []
    for line in body.splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith(("balance hdr", "hash-type", "hash-balance-factor 150", "option tcp-check", "tcp-check")):
            rules.append(line)
        elif line.startswith("default-server"):
            rules.append(re.sub(r" inter \S+", "", line))
    return rules


@pytest.mark.parametrize("replicas,balance,http", [(2, None, False), (3, None, True), (8, None, True),
                                                    (3, ROUND_ROBIN, False)])
def test_haproxy_cfg_is_valid(tmp_path, replicas, balance, http):
    addrs = [f"127.0.0.1:{10 + i}" for i in range(replicas)]
    hp = Haproxy("127.0.0.1:1", "127.0.0.1:2", addrs, tmp_path / "log", **({"balance": balance} if balance else {}),
                 **({"http_bind": "127.0.0.1:3", "http_replicas": [f"127.0.0.1:{30 + i}" for i in range(replicas)]}
                    if http else {}))
    hp.check_config()


def test_the_http_frontend_routes_on_the_same_ring():
    """Same header, hash, bounded loads and server ids as the gRPC backend: an adapter's HTTP and gRPC
    requests reach the same replica."""
    cfg = CONFIG.read_text()
    grpc_part, http_part = cfg.split("\nbackend replicas_http\n", 1)
    grpc_rules = [r.replace(" proto h2", "") for r in backend_rules(grpc_part) if not r.startswith(("option tcp",
                                                                                                    "tcp-check"))]
    assert backend_rules("\nbackend replicas\n" + http_part) == grpc_rules and len(grpc_rules) == 4
    assert "option httpchk GET /health" in http_part and "http-check expect status 200" in http_part
    for i in range(1, 9):
        assert f'server r{i} "${{LORASERVE_REPLICA{i}}}" id {i}' in cfg
        assert f'server r{i} "${{LORASERVE_REPLICA{i}_HTTP}}" id {i}' in http_part


def test_the_health_check_bytes_are_grpc_health_check(tmp_path):
    want = grpc_health_check_bytes().hex()
    assert want.startswith("505249202a20485454502f322e30")  # the h2c preface
    assert f"tcp-check send-binary {want}" in CONFIG.read_text()


def test_k8s_haproxy_has_the_same_routing_health_and_retries(tmp_path):
    cm = k8s_docs()[("ConfigMap", "loraserve-haproxy")]["data"]["haproxy.cfg"]
    (tmp_path / "k8s.cfg").write_text(cm)
    r = subprocess.run([find_haproxy(), "-c", "-q", "-f", str(tmp_path / "k8s.cfg")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    tested = CONFIG.read_text()
    assert backend_rules(cm) == backend_rules(tested)
    assert f"balance hdr({ADAPTER_HEADER})" in backend_rules(cm)
    # The HTTP API: the same routing and health as the tested file's replicas_http, on the replicas' --http-port.
    def http_rules(cfg: str) -> list[str]:
        body = cfg.split("\nbackend replicas_http\n", 1)[1]
        return [ln.strip() for ln in body.splitlines() if ln.strip().startswith(
            ("balance hdr", "hash-type", "hash-balance-factor 150", "option httpchk", "http-check"))]

    assert http_rules(cm) == http_rules(tested) and len(http_rules(tested)) == 5
    replica = k8s_docs()[("Deployment", "loraserve")]["spec"]["template"]["spec"]["containers"][0]
    http_port = next(p["containerPort"] for p in replica["ports"] if p["name"] == "http")
    assert f"--http-port={http_port}" in replica["args"]
    assert f"loraserve-replicas.loraserve.svc.cluster.local:{http_port} " in cm
    for line in ("retries 2", "retry-on conn-failure", "option redispatch 1", "timeout server 10m", "timeout check 5s"):
        assert line in cm and line in tested


def test_k8s_replicas_probe_grpc_drain_and_share_the_registry():
    docs = k8s_docs()
    dep = docs[("Deployment", "loraserve")]
    pod = dep["spec"]["template"]
    c = pod["spec"]["containers"][0]
    port = next(p["containerPort"] for p in c["ports"] if p["name"] == "grpc")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == port
    assert any(a == f"--port={port}" for a in c["args"])
    env = {e["name"]: e for e in c["env"]}
    ref = env["LORASERVE_REGISTRY"]["valueFrom"]["secretKeyRef"]
    secret = docs[("Secret", ref["name"])]
    assert secret["stringData"][ref["key"]].startswith("postgresql://")
    objects = next(v for v in pod["spec"]["volumes"] if v["name"] == "objects")
    pvc = docs[("PersistentVolumeClaim", objects["persistentVolumeClaim"]["claimName"])]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    mount = next(m for m in c["volumeMounts"] if m["name"] == "objects")["mountPath"]
    assert f"--objects={mount}" in c["args"]
    ann = pod["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and f"--metrics-port={ann['prometheus.io/port']}" in c["args"]
    # preStop sleep + drain delay + grace period fit in the termination grace period
    pre = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    args = dict(a[2:].split("=", 1) for a in c["args"] if a.startswith("--") and "=" in a)
    assert pre + float(args["drain-delay"]) + float(args["grace-period"]) + 10 <= \
        pod["spec"]["terminationGracePeriodSeconds"]
    svc = docs[("Service", "loraserve-replicas")]
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    cm = docs[("ConfigMap", "loraserve-haproxy")]["data"]["haproxy.cfg"]
    assert "loraserve-replicas.loraserve.svc.cluster.local:50051" in cm
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kust["resources"]) == sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def test_envoy_routes_on_the_same_header_with_a_ring_hash():
    cfg = yaml.safe_load((DEPLOY / "envoy" / "envoy.yaml").read_text())
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    route = hcm["route_config"]["virtual_hosts"][0]["routes"][0]["route"]
    assert route["hash_policy"] == [{"header": {"header_name": ADAPTER_HEADER}}]
    assert set(route["retry_policy"]["retry_on"].split(",")) == {"connect-failure", "refused-stream"}
    cluster = cfg["static_resources"]["clusters"][0]
    assert cluster["name"] == route["cluster"] and cluster["lb_policy"] == "RING_HASH"
    assert "grpc_health_check" in cluster["health_checks"][0]
    opts = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "http2_protocol_options" in opts["explicit_http_config"]
