"""A real `LoraServer` (gRPC + HTTP, tiny model, real registry) on its own event loop thread, for API tests."""
from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from pathlib import Path
from typing import Any, Coroutine

from server.api.server import LoraServer
from server.core.config import Config, ServerConfig
from server.core.engine_config import EngineConfig

KEYS = {"acme": "acme-key", "other": "other-key", "small": "small-key"}


def write_tenants(path: Path) -> Path:
    """acme and other (users), small (a 1-token-per-minute quota: its second request is refused)."""
    lines = []
    for name, key in KEYS.items():
        lines += [f"[tenants.{name}]", f'api_keys = ["sha256:{hashlib.sha256(key.encode()).hexdigest()}"]']
        if name == "small":
            lines.append("max_tokens_per_minute = 1")
    path.write_text("\n".join(lines) + "\n")
    return path


class InProcessServer:
    def __init__(self, tmp: Path, model_dir: Path, adapters: dict[str, Path], tenants: bool = True, **server: Any):
        cfg = Config(
            server=ServerConfig(host="127.0.0.1", port=0, http_port=0, metrics_port=-1, registry=str(tmp / "reg"),
                                adapters=[f"{n}={p}" for n, p in adapters.items()], grace_period=30.0,
                                tenants=str(write_tenants(tmp / "tenants.toml")) if tenants else "", **server),
            engine=EngineConfig(model=str(model_dir), quantize="none", dtype="float32", device="cpu", max_rank=16,
                                max_adapters_on_device=4, kv_cache_tokens=4096, home=str(tmp / "home")))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-server-loop", daemon=True)
        self.thread.start()
        self.server = LoraServer(cfg)
        self.call(self.server.start())
        self.call(self.server.load(), timeout=300)

    def call(self, coro: Coroutine, timeout: float = 120) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def spawn(self, coro: Coroutine) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.http_port}"

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def wait_idle(self, timeout: float = 10.0) -> None:
        """No generation in flight, nothing running or waiting in the engine, every KV block free."""
        engine = self.server.engine
        deadline = time.monotonic() + timeout
        while True:
            s = engine.stats()
            now = (self.server.state.in_flight, s.running, s.waiting, s.kv_blocks_used)
            if now == (0, 0, 0, 0):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"not idle: in_flight, running, waiting, kv_used = {now}")
            time.sleep(0.02)

    def stop(self) -> None:
        try:
            self.call(self.server.drain(), timeout=60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
