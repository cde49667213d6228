"""One `loraserve serve` replica as a child process on fixed loopback ports (kept across restarts,
so the proxy's address for it, and its place on the hash ring, stay the same)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Optional, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.core.paths import HOME_ENV, KERNEL_CACHE_ENV
from server.fleet.ports import free_port

REPO = Path(__file__).resolve().parents[2]


def replica_env(extra: Optional[dict[str, str]] = None) -> dict[str, str]:
    kept = (HOME_ENV, KERNEL_CACHE_ENV)  # where this machine's files are, not how a replica serves
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORASERVE_") or k in kept}
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "TOKENIZERS_PARALLELISM": "false"})
    env.update(extra or {})
    return env


class Replica:
    def __init__(self, name: str, workdir: Path, serve_args: Sequence[str], env: Optional[dict[str, str]] = None):
        self.name = name
        self.grpc_port = free_port()
        self.http_port = free_port()
        self.metrics_port = free_port()
        self.serve_args = list(serve_args)
        self.env = replica_env(env)
        self.log_path = Path(workdir) / f"{name}.log"
        self.proc: Optional[subprocess.Popen] = None
        self.starts = 0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_address(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(self.grpc_port),
                "--http-port", str(self.http_port), "--metrics-port", str(self.metrics_port), *self.serve_args]

    def start(self) -> "Replica":
        with open(self.log_path, "ab") as log:
            log.write(f"==== start {self.starts + 1}: {' '.join(self.command())}\n".encode())
            self.proc = subprocess.Popen(self.command(), cwd=REPO, env=self.env, stdout=subprocess.DEVNULL,
                                         stderr=log, start_new_session=True)
        self.starts += 1
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def health(self, timeout: float = 2.0) -> str:
        """'SERVING', 'NOT_SERVING', or 'UNREACHABLE'."""
        try:
            with grpc.insecure_channel(self.target) as ch:
                r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
            return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
        except grpc.RpcError:
            return "UNREACHABLE"

    def wait_serving(self, timeout: float = 300.0) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if not self.alive():
                raise RuntimeError(f"replica {self.name} exited ({self.proc and self.proc.returncode}) "
                                   f"before serving:\n{self.log_tail()}")
            if self.health() == "SERVING":
                return time.monotonic() - t0
            time.sleep(0.2)
        raise TimeoutError(f"replica {self.name} not serving after {timeout}s:\n{self.log_tail()}")

    def stop(self, timeout: float = 60.0) -> Optional[int]:
        """SIGTERM (the replica drains: see --drain-delay and --grace-period) and wait for its exit."""
        if not self.alive():
            return self.proc.returncode if self.proc else None
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return self.kill()

    def kill(self) -> Optional[int]:
        """SIGKILL: a crash, nothing drained."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        return self.proc.returncode if self.proc else None

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as r:
            return r.read().decode()

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def parse_samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """Every sample of metric `name` in Prometheus text: (labels, value)."""
    out = []
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, lab = head.partition("{")
        if metric != name:
            continue
        labels = {}
        for part in filter(None, lab.rstrip("}").split(",")):
            k, _, v = part.partition("=")
            labels[k] = v.strip('"')
        out.append((labels, float(value)))
    return out


def metric_value(text: str, name: str, labels: Optional[dict[str, str]] = None) -> float:
    """The sum of the samples of `name` whose labels include `labels` (0 when none)."""
    want = labels or {}
    return sum(v for lab, v in parse_samples(text, name) if all(lab.get(k) == x for k, x in want.items()))
