"""`make fleet` (python -m server.fleet) on the tiny model: the demo runs, and Ctrl-C stops all it started."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from server.fleet.replica import REPO, replica_env

pytestmark = pytest.mark.slow


def processes_under(workdir: Path) -> list[str]:
    """Command lines of live processes that name `workdir` (replicas, PostgreSQL's data dir is elsewhere)."""
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(workdir) in cmd:
                out.append(cmd)
    return out


def test_the_demo_runs_and_ctrl_c_stops_everything(tiny_dir, tmp_path):
    workdir = tmp_path / "fleet"
    cmd = [sys.executable, "-m", "server.fleet", "--model", str(tiny_dir), "--replicas", "2", "--adapters", "2",
           "--requests", "6", "--concurrency", "2", "--workdir", str(workdir),
           "--", "--quantize", "none", "--dtype", "float32", "--max-rank", "16", "--cpu-threads", "1"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=replica_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("Ctrl-C stops everything"):
                break
        out = "".join(lines)
        assert "registered demo-0@1 through the proxy" in out and "registered demo-1@1" in out, out
        assert "6/6 ok (errors: none)" in out and "which replica served which adapter" in out, out
        assert "x-loraserve-adapter: demo-0" in out, out  # how to call it over HTTP
        assert processes_under(workdir), "no replica running while the fleet serves"
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends
        rest, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    assert proc.returncode == 0, out + rest
    assert "stopped: HAProxy, the replicas and PostgreSQL" in rest, rest
    deadline = time.monotonic() + 10
    while processes_under(workdir) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not processes_under(workdir), processes_under(workdir)
