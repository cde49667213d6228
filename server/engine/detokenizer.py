"""Incremental detokenization that never emits half a UTF-8 character, with stop strings.

Text is released only when a token completes its characters (no trailing U+FFFD),
and the last `max(len(stop)) - 1` characters are held back while stop strings
are configured, so a stop string is cut out before any of it reaches a client.
"""
from __future__ import annotations

from typing import Optional, Sequence


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # start of the window re-decoded each step (gives context for merges)
        self._read = 0    # tokens before this are already turned into text
        self.text = ""    # all text decoded so far
        self._emitted = 0  # characters of `text` already handed out
        self._stop = tuple(stop)
        self._hold = max((len(s) for s in self._stop), default=1) - 1

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> tuple[str, bool]:
        """Feed one token; returns (text to emit now, whether a stop string was hit)."""
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(self._ids)
        return self._release(final=False)

    def finish(self) -> str:
        """Everything still held back (without a dangling partial character)."""
        tail = self._decode(self._ids[self._prefix:])
        before = self._decode(self._ids[self._prefix:self._read])
        if len(tail) > len(before):
            self.text += tail[len(before):].rstrip("\ufffd")
            self._prefix = self._read = len(self._ids)
        text, _ = self._release(final=True)
        return text

    def _release(self, final: bool) -> tuple[str, bool]:
        cut: Optional[int] = None
        if self._stop:
            start = max(0, self._emitted - self._hold)
            hits = [i for i in (self.text.find(s, start) for s in self._stop) if i >= 0]
            if hits:
                cut = min(hits)
        if cut is not None:
            self.text = self.text[:cut]
            out = self.text[self._emitted:]
            self._emitted = len(self.text)
            return out, True
        end = len(self.text) if final else max(self._emitted, len(self.text) - self._hold)
        out = self.text[self._emitted:end]
        self._emitted = end
        return out, False
