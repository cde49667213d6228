"""Stalled streams: a client that stops reading must not hold KV blocks and an adapter slot forever.

HTTP/2 flow control already bounds what a stream buffers: once the client's window is full, the
server's write for that stream waits (our per-stream queue behind it is bounded too, see
`server.engine.types.RequestStream`). What flow control cannot do is give up. A streaming servicer
marks each write with `StreamWatch.writing()` / `written()`; the monitor's one task looks every
`tick` seconds and calls `on_stall()` for a write that has waited longer than `timeout_s`. The
servicer's `on_stall` aborts the engine request (its KV blocks and slot pin are freed at the
engine's next turn) and ends the RPC with RESOURCE_EXHAUSTED. Protocol-neutral: an HTTP streaming
response uses it the same way around its own writes.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable, Optional

log = logging.getLogger("loraserve.stalls")


class StreamWatch:
    """One streaming response's writes, as the monitor sees them."""

    __slots__ = ("since", "on_stall", "stalled")

    def __init__(self, on_stall: Callable[[], None]):
        self.since: Optional[float] = None
        self.on_stall = on_stall
        self.stalled = False

    def writing(self) -> None:
        self.since = time.monotonic()

    def written(self) -> None:
        self.since = None


class StallMonitor:
    """Aborts streams whose current write has waited longer than `timeout_s` (0 = never)."""

    def __init__(self, timeout_s: float, on_abort: Optional[Callable[[], None]] = None):
        self.timeout_s = float(timeout_s)
        self.tick = min(1.0, max(self.timeout_s / 4, 0.05))
        self.on_abort = on_abort  # e.g. a metrics counter
        self.aborted = 0
        self._watches: set[StreamWatch] = set()
        self._task: Optional[asyncio.Task] = None

    @property
    def enabled(self) -> bool:
        return self.timeout_s > 0

    @property
    def message(self) -> str:
        """What an aborted stream's request is ended and logged with (either protocol)."""
        return (f"stream stalled: the client read nothing for {self.timeout_s:g}s, so the request was "
                "aborted (--stalled-stream-timeout)")

    def watch(self, on_stall: Callable[[], None]) -> StreamWatch:
        w = StreamWatch(on_stall)
        if self.enabled:
            self._watches.add(w)
        return w

    def forget(self, w: StreamWatch) -> None:
        self._watches.discard(w)

    def start(self) -> None:
        if self.enabled and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="loraserve-stall-monitor")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    def check(self, now: Optional[float] = None) -> int:
        """Abort every stream stalled past the timeout; returns how many (the task calls this each tick)."""
        now = time.monotonic() if now is None else now
        stalled = [w for w in self._watches if w.since is not None and now - w.since > self.timeout_s]
        for w in stalled:
            self._watches.discard(w)
            w.stalled = True
            self.aborted += 1
            try:
                w.on_stall()
            except Exception:  # noqa: BLE001 - one stream's cleanup must not stop the monitor
                log.exception("aborting a stalled stream failed")
            if self.on_abort is not None:
                self.on_abort()
        return len(stalled)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.tick)
            self.check()
