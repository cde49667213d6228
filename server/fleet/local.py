"""A whole fleet on loopback: PostgreSQL (the shared registry index), N replicas sharing one objects
folder, and HAProxy in front with adapter affinity. What `make fleet`, the fleet tests and the fleet
benchmark start; `stop` (or leaving the `with` block) stops everything it started.
"""
from __future__ import annotations

import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional, Sequence

import grpc

from server.api.gen.loraserve.v1 import adapters_pb2_grpc
from server.client.admin import register
from server.client.routing import routing_metadata
from server.fleet.haproxy import AFFINITY, Haproxy
from server.fleet.ports import free_port
from server.fleet.postgres import PostgresCluster
from server.fleet.replica import Replica, metric_value, parse_samples


class LocalFleet:
    def __init__(self, replicas: int = 3, model: str = "default", workdir: Optional[Path] = None,
                 balance: str = AFFINITY, serve_args: Sequence[str] = (), durable: bool = False,
                 drain_delay: float = 1.5, env: Optional[dict[str, str]] = None,
                 registry_url: str = "", objects: Optional[Path] = None, balance_factor: Optional[int] = None):
        """`registry_url` + `objects`: use an existing registry (its PostgreSQL stays up); else start one."""
        self.n = replicas
        self.model = model
        self.own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="loraserve-fleet-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.balance = balance
        self.balance_factor = balance_factor
        self.serve_args = list(serve_args)
        self.durable = durable
        self.drain_delay = drain_delay
        self.env = env
        self.pg: Optional[PostgresCluster] = None
        self.registry_url = registry_url
        self.objects = Path(objects) if objects else self.workdir / "objects"
        self.replicas: list[Replica] = []
        self.proxy: Optional[Haproxy] = None

    # ---- lifecycle -------------------------------------------------------------------------------
    def start(self, timeout: float = 300.0) -> "LocalFleet":
        try:
            if not self.registry_url:
                self.pg = PostgresCluster(durable=self.durable).start()
                self.registry_url = self.pg.create_database("loraserve")
            args = ["--model", self.model, "--registry", self.registry_url, "--objects", str(self.objects),
                    "--drain-delay", str(self.drain_delay), *self.serve_args]
            self.replicas = [Replica(f"r{i + 1}", self.workdir, args, self.env) for i in range(self.n)]
            for r in self.replicas:
                r.start()
            for r in self.replicas:
                r.wait_serving(timeout)
            self.proxy = Haproxy(f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}",
                                 [r.target for r in self.replicas], self.workdir / "haproxy.log", self.balance,
                                 balance_factor=self.balance_factor, http_bind=f"127.0.0.1:{free_port()}",
                                 http_replicas=[r.http_address for r in self.replicas])
            self.proxy.start()
            self.proxy.wait_states({r.name: "UP" for r in self.replicas})
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.proxy is not None:
            self.proxy.stop()
        threads = [threading.Thread(target=r.stop, args=(30.0,)) for r in self.replicas]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if self.pg is not None:
            self.pg.destroy()
            self.pg = None
        if self.own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "LocalFleet":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def target(self) -> str:
        """Where gRPC clients connect: the proxy."""
        assert self.proxy is not None
        return self.proxy.bind

    @property
    def base_url(self) -> str:
        """Where OpenAI-style HTTP clients connect: the proxy (add /v1)."""
        assert self.proxy is not None
        return f"http://{self.proxy.http_bind}"

    def replica(self, name: str) -> Replica:
        return next(r for r in self.replicas if r.name == name)

    def restart(self, name: str, timeout: float = 300.0) -> float:
        """Start a stopped (or killed) replica again on its ports; seconds until the proxy routes to it."""
        r = self.replica(name)
        t0 = time.monotonic()
        r.start()
        r.wait_serving(timeout)
        assert self.proxy is not None
        self.proxy.wait_states({name: "UP"})
        return time.monotonic() - t0

    # ---- adapters and what served them -----------------------------------------------------------
    def register(self, name: str, adapter_dir: Path, api_key: str = "") -> str:
        """Upload through the proxy (routed like the adapter's requests); returns `name@version`."""
        md = ([("authorization", f"Bearer {api_key}")] if api_key else []) + routing_metadata(name)
        with grpc.insecure_channel(self.target) as ch:
            resp = register(adapters_pb2_grpc.AdaptersStub(ch), name, Path(adapter_dir), {"source": "fleet"},
                            False, md=md, timeout=120)
        return resp.adapter_id

    def served_by(self) -> dict[str, dict[str, int]]:
        """{adapter name: {replica: finished generate requests}} from each live replica's /metrics."""
        out: dict[str, dict[str, int]] = {}
        for r in self.replicas:
            if not r.alive():
                continue
            for labels, v in parse_samples(r.metrics_text(), "loraserve_adapter_requests_total"):
                if v:
                    out.setdefault(labels.get("adapter", "?"), {})[r.name] = int(v)
        return out

    def slot_counters(self) -> dict[str, dict[str, float]]:
        """Per live replica: device-slot hits, misses and loads so far."""
        out = {}
        for r in self.replicas:
            if r.alive():
                text = r.metrics_text()
                out[r.name] = {k: metric_value(text, f"loraserve_adapter_slot_{k}_total") for k in ("hits", "misses")}
                out[r.name]["loads"] = metric_value(text, "loraserve_adapter_loads_total")
        return out
