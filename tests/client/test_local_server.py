"""The local server the benchmarks and the demo start: loopback and free ports unless the caller sets its own."""
from __future__ import annotations

import sys

from server.client.local_server import serve_command


def test_free_loopback_ports_unless_the_caller_chose_them():
    assert serve_command(["--model", "default"]) == [
        sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", "0", "--http-port", "0",
        "--metrics-port", "0", "--model", "default"]
    cmd = serve_command(["--http-port", "-1", "--metrics-port=-1", "--model", "default"])
    assert cmd[4:] == ["--host", "127.0.0.1", "--port", "0", "--http-port", "-1", "--metrics-port=-1",
                       "--model", "default"]
