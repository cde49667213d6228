"""Server-sent events as the spec reads them: what an OpenAI-style stream's `data:` fields carry.

Lines end at CRLF, LF or CR, and nowhere else. httpx's `aiter_lines` also ends a line at the other
characters `str.splitlines` breaks on (U+2028, U+0085, U+001C, ...), which a server may send raw inside
a JSON string (llama-server does, for the text it generates): the JSON then arrives cut in two.
"""
from __future__ import annotations

import re
from typing import Any, AsyncIterator

_EOL = re.compile(r"\r\n|\r|\n")


class SSEDecoder:
    """Text in, in chunks cut anywhere; each finished event's data out (its `data:` lines joined by LF)."""

    def __init__(self) -> None:
        self._pending = ""  # text after the last line end (a CR held back: an LF may follow it)
        self._data: list[str] = []

    def feed(self, text: str) -> list[str]:
        """The data of the events this chunk completes."""
        text = self._pending + text
        lines = _EOL.split(text)
        self._pending = lines.pop()  # the unfinished line, maybe ""
        if text.endswith("\r"):  # a CR that may be the first half of CRLF: decide with the next chunk
            self._pending = lines.pop() + "\r"
        events = []
        for line in lines:
            if not line:  # a blank line dispatches the event, if it has data
                if self._data:
                    events.append("\n".join(self._data))
                    self._data = []
            elif line.startswith("data:"):
                value = line[5:]
                self._data.append(value[1:] if value.startswith(" ") else value)
            # comments (":...") and the other fields (event, id, retry) carry nothing we read
        return events

    def close(self) -> list[str]:
        """The data of an event the stream ended without a blank line after (a lenient end)."""
        events = self.feed("\n\n") if self._pending.rstrip("\r") or self._data else []
        self._pending, self._data = "", []
        return events


async def sse_data(response: Any) -> AsyncIterator[str]:
    """Each event's data of a streamed httpx response, in order."""
    dec = SSEDecoder()
    async for text in response.aiter_text():
        for data in dec.feed(text):
            yield data
    for data in dec.close():
        yield data
