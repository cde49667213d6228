"""The deltas of several generations (the `n` choices) as one stream, and server-sent events.

Closing the merged stream (the client went away, the server stops) cancels its pumps and
closes every generation, which aborts their engine requests at once.
"""
from __future__ import annotations

import asyncio
import contextvars
import json
import logging
from typing import Any, AsyncIterator, Optional, Sequence

from server.api.generation import Generation
from server.api.stalls import StreamWatch
from server.engine.types import Delta

_END = object()
DONE = b"data: [DONE]\n\n"


def sse(obj: Any) -> bytes:
    """One server-sent event carrying a JSON object."""
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


async def merged(gens: Sequence[Generation]) -> AsyncIterator[tuple[int, Delta]]:
    """(choice index, delta) as each generation produces them; the first engine error is raised."""
    try:
        if len(gens) == 1:
            async for delta in gens[0].deltas():
                yield 0, delta
            return
        queue: asyncio.Queue[tuple[int, Optional[Delta], Any]] = asyncio.Queue()

        async def pump(i: int, gen: Generation) -> None:
            try:
                async for delta in gen.deltas():
                    queue.put_nowait((i, delta, None))
            except asyncio.CancelledError:
                pass
            except Exception as e:  # noqa: BLE001 - handed to the consumer
                queue.put_nowait((i, None, e))
            finally:
                queue.put_nowait((i, None, _END))

        tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(gens)]
        try:
            left = len(gens)
            while left:
                i, delta, err = await queue.get()
                if err is _END:
                    left -= 1
                elif err is not None:
                    raise err
                else:
                    assert delta is not None
                    yield i, delta
        finally:
            for t in tasks:
                t.cancel()
    finally:
        for g in gens:
            g.close()


async def until_disconnected(receive: Any) -> None:
    """Return when the client has gone (the ASGI server reports `http.disconnect`)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


def watched(send: Any, watch: StreamWatch) -> Any:
    """`send` with each write marked for the stall monitor (its wait is the client's not reading)."""
    async def send_watched(message: Any) -> None:
        watch.writing()
        try:
            await send(message)
        finally:
            watch.written()

    return send_watched


# Set in the ASGI task of a response ended because its client stopped reading: uvicorn then reports that the
# app "returned without completing response" (and closes the connection, which is what we want); the filter
# below drops that one line for such responses, whose own warning says what happened.
_ABANDONED: contextvars.ContextVar[bool] = contextvars.ContextVar("loraserve_http_abandoned", default=False)
_INCOMPLETE = "ASGI callable returned without completing response."


def abandon_response() -> None:
    _ABANDONED.set(True)


class AbandonedResponseFilter(logging.Filter):
    """Drops uvicorn's error line for a response we ended on purpose (a stalled stream), and only for it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (_ABANDONED.get() and record.getMessage() == _INCOMPLETE)
