"""Uvicorn inside the server's own event loop, beside grpc.aio: no thread, no second process.

We bind the socket ourselves (so port 0 reports the port actually bound) and drive uvicorn's
startup / main loop / shutdown without its signal handling: SIGTERM belongs to the server's
drain (server/api/server.py), which stops HTTP after gRPC's grace period like gRPC itself.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from typing import Any, Optional

import uvicorn

from server.api.http.streaming import AbandonedResponseFilter
from server.core.errors import StartupError

log = logging.getLogger("loraserve.http")
logging.getLogger("uvicorn.error").addFilter(AbandonedResponseFilter())

# After the drain's grace period, connections still open get this long before their tasks are cancelled.
SHUTDOWN_TIMEOUT_S = 1.0


class HttpServer:
    ALPN = ("http/1.1",)  # uvicorn's h11 protocol

    def __init__(self, app: Any):
        self.app = app
        self.port = 0
        self._server: Optional[uvicorn.Server] = None
        self._sock: Optional[socket.socket] = None
        self._loop_task: Optional[asyncio.Future] = None

    async def start(self, host: str, port: int, ssl_context: Optional[ssl.SSLContext] = None) -> int:
        """Listen on host:port (0 = any free port) and serve, over TLS with `ssl_context` (the server's, which
        follows SIGHUP reloads: server/api/tls.py); returns the port bound."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host.strip("[]"), port))
        except OSError as e:
            sock.close()
            raise StartupError(f"cannot bind HTTP to {host}:{port}: {e.strerror} (--host, --http-port)") from None
        sock.listen(2048)
        sock.setblocking(False)
        config = uvicorn.Config(self.app, lifespan="off", log_config=None, access_log=False,
                                timeout_graceful_shutdown=SHUTDOWN_TIMEOUT_S, server_header=False,
                                ssl_context_factory=(lambda _config, _default: ssl_context) if ssl_context else None)
        config.load()
        server = uvicorn.Server(config)
        server.lifespan = config.lifespan_class(config)
        await server.startup(sockets=[sock])
        self._server, self._sock = server, sock
        self.port = int(sock.getsockname()[1])
        self._loop_task = asyncio.ensure_future(server.main_loop())
        return self.port

    async def stop(self) -> None:
        """Stop listening, let responses in progress end (SHUTDOWN_TIMEOUT_S), then cancel the rest."""
        server = self._server
        if server is None:
            return
        self._server = None
        server.should_exit = True
        if self._loop_task is not None:
            await self._loop_task
        await server.shutdown(sockets=[self._sock] if self._sock is not None else None)
