"""A `loraserve serve` child process on loopback, for the tools that start their own server (the benchmarks,
the trainer's demo).

Ports come from the server's "listening" log line (port 0 asks for any free one), readiness from its
"serving" line: the protocol the tests read too. Every line of its JSON log is written to `log_path` as it
arrives and kept in `events` when it parses.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Optional, Sequence

REPO = Path(__file__).resolve().parents[2]
# Listening flags the caller does not set itself: loopback, every port picked free by the server.
_DEFAULT_FLAGS = (("--host", "127.0.0.1"), ("--port", "0"), ("--http-port", "0"), ("--metrics-port", "0"))


def serve_command(args: Sequence[str]) -> list[str]:
    """`python -m server.cli serve` with `args`, and the loopback/free-port flags `args` leaves out."""
    given = {a.split("=", 1)[0] for a in args if a.startswith("--")}
    defaults = [x for flag, value in _DEFAULT_FLAGS if flag not in given for x in (flag, value)]
    return [sys.executable, "-m", "server.cli", "serve", *defaults, *args]


class LocalServer:
    def __init__(self, args: Sequence[str], log_path: Path, env: Optional[dict[str, str]] = None):
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                    "PYTHONPATH": str(REPO), **(env or {})}
        self.proc = subprocess.Popen(serve_command(args), cwd=REPO, env=full_env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, bufsize=1)
        self.port = 0
        self.http_port = 0
        self.metrics_port = 0
        self.events: list[dict] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._pump, name="server-log", daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        with open(self.log_path, "w") as log:
            for line in self.proc.stderr:
                log.write(line)
                log.flush()
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(rec, dict):
                    continue
                with self._cond:
                    if rec.get("event") == "listening":
                        self.port = int(rec["grpc_port"])
                        self.http_port = int(rec.get("http_port") or 0)
                        self.metrics_port = int(rec.get("metrics_port") or 0)
                    self.events.append(rec)
                    self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_serving(self, timeout: float = 900.0) -> None:
        """Block until the server logs "serving"; raise (with its log's tail) if it exits or times out first."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not any(e.get("event") == "serving" for e in self.events):
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the server exited ({self.proc.returncode}); see {self.log_path}:\n"
                                       f"{self.log_tail()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"the server was not serving after {timeout:.0f} s; see {self.log_path}:\n"
                                       f"{self.log_tail()}")
                self._cond.wait(min(left, 1.0))

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics as {'name{labels}': value}."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=30) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out

    def rss_mb(self) -> float:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return 0.0

    def request_lines(self) -> list[dict]:
        with self._cond:
            return [e for e in self.events if e.get("event") == "request"]

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout: float = 120.0) -> Optional[int]:
        return stop_process(self.proc, timeout)


def stop_process(proc: subprocess.Popen, timeout: float) -> Optional[int]:
    """SIGTERM, `timeout` seconds to exit (a server drains), then SIGKILL; the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode
