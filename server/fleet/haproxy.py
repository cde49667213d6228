"""HAProxy as a fleet's front (deploy/haproxy/haproxy.cfg), run as a process on loopback.

Also builds the bytes of the gRPC health check the config sends (HAProxy's http-check cannot send
a body with NUL bytes, so the check is raw HTTP/2 over tcp-check); a test keeps the file in step.
"""
from __future__ import annotations

import csv
import io
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Optional, Sequence

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "deploy" / "haproxy" / "haproxy.cfg"
AFFINITY = "hdr(x-loraserve-adapter)"
ROUND_ROBIN = "roundrobin"
INSTALL_HINT = "haproxy not found: install Debian's `haproxy` package (`make install` and .ci/run do it where missing)"


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def _literal(index: int, value: str) -> bytes:
    """HPACK literal header field without indexing, name from the static table (no Huffman)."""
    v = value.encode()
    head = bytes([index]) if index < 15 else bytes([0x0F, index - 15])
    return head + bytes([len(v)]) + v


def _literal_new(name: str, value: str) -> bytes:
    n, v = name.encode(), value.encode()
    return b"\x00" + bytes([len(n)]) + n + bytes([len(v)]) + v


def grpc_health_check_bytes(authority: str = "loraserve") -> bytes:
    """An h2c connection that asks grpc.health.v1.Health/Check for service "" and ends its stream."""
    headers = (b"\x83"                                       # :method POST
               + b"\x86"                                     # :scheme http
               + _literal(4, "/grpc.health.v1.Health/Check")  # :path
               + _literal(1, authority)                      # :authority
               + _literal(31, "application/grpc")            # content-type
               + _literal_new("te", "trailers"))
    empty_request = b"\x00" + (0).to_bytes(4, "big")        # gRPC frame: uncompressed, 0-byte message
    return (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
            + _frame(0x4, 0x0, 0, b"")                       # SETTINGS (defaults)
            + _frame(0x1, 0x4, 1, headers)                   # HEADERS, END_HEADERS
            + _frame(0x0, 0x1, 1, empty_request))            # DATA, END_STREAM


def find_haproxy() -> str:
    path = shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)
    if path is None:
        raise RuntimeError(INSTALL_HINT)
    return path


class Haproxy:
    """`haproxy -f deploy/haproxy/haproxy.cfg` with the addresses in its environment."""

    def __init__(self, bind: str, admin: str, replicas: list[str], log_path: Path, balance: str = AFFINITY,
                 config: Path = CONFIG, balance_factor: Optional[int] = None, http_bind: str = "",
                 http_replicas: Sequence[str] = ()):
        """`http_bind` + `http_replicas` (the replicas' --http-port addresses, in the same order): also route
        the OpenAI-compatible HTTP API, on the same header and ring."""
        if not 2 <= len(replicas) <= 8:
            raise ValueError("the config names 2 to 8 replicas")
        if http_bind and len(http_replicas) != len(replicas):
            raise ValueError("one HTTP address per replica")
        self.bind, self.admin, self.replicas, self.balance = bind, admin, list(replicas), balance
        self.http_bind, self.http_replicas = http_bind, list(http_replicas) if http_bind else []
        self.config = config
        self.balance_factor = balance_factor
        self.log_path = Path(log_path)
        self.proc: Optional[subprocess.Popen] = None

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("LORASERVE_REPLICA", "LORASERVE_HASH_BALANCE_FACTOR", "LORASERVE_PROXY_HTTP"))}
        if self.balance_factor is not None:  # else the config's default (150)
            env["LORASERVE_HASH_BALANCE_FACTOR"] = str(self.balance_factor)
        env.update({"LORASERVE_PROXY_BIND": self.bind, "LORASERVE_PROXY_ADMIN": self.admin,
                    "LORASERVE_BALANCE": self.balance})
        env.update({f"LORASERVE_REPLICA{i + 1}": a for i, a in enumerate(self.replicas)})
        if self.http_bind:
            env["LORASERVE_PROXY_HTTP_BIND"] = self.http_bind
            env.update({f"LORASERVE_REPLICA{i + 1}_HTTP": a for i, a in enumerate(self.http_replicas)})
        return env

    def check_config(self) -> None:
        r = subprocess.run([find_haproxy(), "-c", "-q", "-f", str(self.config)], env=self.env(),
                           capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise RuntimeError(f"haproxy -c {self.config} failed: {r.stderr.strip()}")

    def start(self) -> "Haproxy":
        self.check_config()
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([find_haproxy(), "-f", str(self.config)], env=self.env(), stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        return self

    def stop(self, timeout: float = 5) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # hard stop: the replicas behind it drain their own calls
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def server_states(self, backend: str = "replicas") -> dict[str, str]:
        """{'r1': 'UP', 'r2': 'DOWN', ...} from HAProxy's own stats (what it routes by right now);
        `backend` "replicas_http" for the HTTP API's."""
        with urllib.request.urlopen(f"http://{self.admin}/stats;csv", timeout=5) as r:
            text = r.read().decode().lstrip("# ")
        out = {}
        for row in csv.DictReader(io.StringIO(text)):
            if row.get("pxname") == backend and row.get("svname", "").startswith("r"):
                out[row["svname"]] = row.get("status", "").split(" ")[0]
        return out

    def wait_states(self, want: dict[str, str], timeout: float = 30) -> float:
        """Wait until each named server has the wanted status ('UP'/'DOWN'), in the HTTP backend too when
        there is one; returns the seconds it took."""
        t0 = time.monotonic()
        last: dict[str, dict[str, str]] = {}
        backends = ("replicas", "replicas_http") if self.http_bind else ("replicas",)
        while time.monotonic() - t0 < timeout:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"haproxy exited ({self.proc.returncode}):\n{self.log_tail()}")
            try:
                last = {b: self.server_states(b) for b in backends}
            except OSError:
                last = {b: {} for b in backends}
            if all(st.get(k) == v for st in last.values() for k, v in want.items()):
                return time.monotonic() - t0
            time.sleep(0.05)
        raise TimeoutError(f"haproxy servers {last} did not reach {want} in {timeout}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""
