"""Domain types that cross the engine boundary: what a caller submits and what it streams back.

Protobuf types never reach this far: `server/api/` translates to and from these.
"""
from __future__ import annotations

import asyncio
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Iterator, Optional

from server.core.errors import InvalidRequestError
from server.core.identity import AdapterVersion


FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_ABORT = "abort"
FINISH_ERROR = "error"
MAX_LOGPROBS = 20  # most alternatives a request may ask for per generated token (OpenAI's bound)


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings; temperature 0 means greedy."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: Optional[int] = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    # None = no log-probabilities; k >= 0 = each generated token's own plus the k most likely alternatives.
    logprobs: Optional[int] = None

    def validate(self, prompt_len: int, max_context: int) -> None:
        """Raise InvalidRequestError naming the first field out of its range."""
        if prompt_len < 1:
            raise InvalidRequestError("prompt", "must contain at least one token")
        if prompt_len >= max_context:
            raise InvalidRequestError(
                "prompt", f"is {prompt_len} tokens; the model's context is {max_context}, "
                f"so a prompt may have at most {max_context - 1}")
        if not 1 <= self.max_new_tokens <= max_context - prompt_len:
            raise InvalidRequestError(
                "max_new_tokens", f"is {self.max_new_tokens}; allowed range is "
                f"[1, {max_context - prompt_len}] for this {prompt_len}-token prompt "
                f"(context {max_context})")
        if not (math.isfinite(self.temperature) and 0.0 <= self.temperature <= 100.0):
            raise InvalidRequestError("temperature", f"is {self.temperature}; allowed range is [0, 100]")
        if not (math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise InvalidRequestError("top_p", f"is {self.top_p}; allowed range is (0, 1]")
        if not 0 <= self.top_k <= 1_000_000:
            raise InvalidRequestError("top_k", f"is {self.top_k}; allowed range is [0, 1000000] (0 = off)")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise InvalidRequestError("seed", f"is {self.seed}; allowed range is [0, 2^63)")
        if len(self.stop) > 16 or any(not s or len(s) > 256 for s in self.stop):
            raise InvalidRequestError("stop", "at most 16 non-empty strings of at most 256 characters")
        if len(self.stop_token_ids) > 64:
            raise InvalidRequestError("stop_token_ids", "at most 64 ids")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise InvalidRequestError("logprobs", f"is {self.logprobs}; allowed range is [0, {MAX_LOGPROBS}]")


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability and the most likely alternatives at its position.

    Taken from the model's raw next-token distribution, log_softmax of the logits before
    temperature, top-k and top-p shape them for sampling, so the numbers are the same whatever
    sampling settings a request uses (and, for a greedy request, the chosen token is the top one).
    """

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, log-probability), most likely first


@dataclass(frozen=True)
class LoraActivity:
    """The adapters of the running batch and of the waiting queue: what routers read for LoRA affinity."""

    running: tuple[tuple[str, str], ...]  # (tenant, adapter name), each pair once, in batch order
    waiting: tuple[tuple[str, str], ...]  # the same for queued requests, in admission order
    max_lora: int                         # adapters the device holds at once whatever their ranks


@dataclass
class Request:
    prompt_token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    adapter: Optional[AdapterVersion] = None  # None: the bare base model
    request_id: str = ""
    tenant: str = "default"
    arrival_time: float = field(default_factory=time.monotonic)


@dataclass
class Delta:
    """One increment of a request's output; the last one has `finish_reason` set."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: Optional[str] = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    adapter: Optional[AdapterVersion] = None  # the version that served the request (None: the base)
    error: Optional[BaseException] = None
    logprobs: Optional[list[TokenLogprob]] = None  # one per entry of token_ids, when the request asked

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


MAX_QUEUED_DELTAS = 64


def merge_deltas(first: Delta, then: Delta) -> Delta:
    """One delta saying what `first` and `then` said, in order (for a consumer that fell behind)."""
    logprobs = None
    if first.logprobs is not None or then.logprobs is not None:
        logprobs = (first.logprobs or []) + (then.logprobs or [])
    return Delta(then.request_id, first.token_ids + then.token_ids, first.text + then.text, then.finish_reason,
                 then.prompt_tokens, then.completion_tokens, then.adapter or first.adapter, then.error or first.error,
                 logprobs)


def _deliver(items: list[tuple[asyncio.Queue, Delta]]) -> None:
    for aq, delta in items:
        aq.put_nowait(delta)


class DeltaBatch:
    """The deltas one engine step puts for consumers on event loops, handed over with one wake-up per
    loop at `flush` instead of one per delta (8 streams: 8 cross-thread calls and self-pipe writes a
    step become 1)."""

    def __init__(self) -> None:
        self._by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Delta]]] = {}

    def add(self, loop: asyncio.AbstractEventLoop, aq: asyncio.Queue, delta: Delta) -> None:
        self._by_loop.setdefault(loop, []).append((aq, delta))

    def flush(self) -> None:
        by_loop, self._by_loop = self._by_loop, {}
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # loop closed: its consumers are gone
                pass


class RequestStream:
    """The per-request channel from the engine thread to one consumer.

    The engine thread calls `put`; a consumer either iterates synchronously or,
    when the stream was made with an event loop, with `async for`. An error
    delta is raised to the consumer as its exception.

    The async queue is bounded: at most `max_queued` deltas wait for the consumer; past that the
    engine merges what it produces into one pending delta, which the consumer takes after the
    queued ones. A consumer that falls behind (a client that reads slowly or not at all) thus gets
    bigger chunks, never an unbounded number of objects, and the engine thread never waits for it.
    `coalesced()` is the async iteration for consumers that can take several tokens at once: the
    deltas waiting when it looks come merged into one, so one behind catches up in one message.
    """

    def __init__(self, request_id: str, loop: Optional[asyncio.AbstractEventLoop] = None,
                 max_queued: int = MAX_QUEUED_DELTAS, stream_interval: int = 1):
        self.request_id = request_id
        # After the first token, the engine's deltas are handed over stream_interval tokens at a time (the last at
        # once): fewer wake-ups of the consumer's loop and fewer messages, each carrying several tokens.
        self._interval = max(1, int(stream_interval))
        self._held: Optional[Delta] = None  # what the interval holds back (engine thread only)
        self._first_out = False
        self._loop = loop
        self._aq: Optional[asyncio.Queue] = asyncio.Queue() if loop is not None else None
        self._q: "queue.SimpleQueue[Delta]" = queue.SimpleQueue()
        self._done = threading.Event()
        self._max_queued = max(1, int(max_queued))
        self._lock = threading.Lock()
        self._queued = 0                      # handed to the loop, not yet taken by the consumer
        self._pending: Optional[Delta] = None  # what arrived while the queue was full, merged
        self._final: Optional[Delta] = None    # the last delta, kept apart so an error follows the tokens
        self.merged = 0                       # deltas folded into a pending one (how far behind it fell)
        self._drained = False                 # the consumer has taken the last delta (or the error)

    def put(self, delta: Delta, batch: Optional[DeltaBatch] = None) -> None:
        """Hand `delta` to the consumer; with `batch`, at the batch's flush (async consumers only)."""
        if self._done.is_set():
            return
        if self._interval > 1:
            if delta.error is not None:  # the tokens before an error still reach the consumer, then the error
                if self._held is not None:
                    self._hand(self._held, batch)
                    self._held = None
            else:
                held = delta if self._held is None else merge_deltas(self._held, delta)
                if self._first_out and not held.finished and len(held.token_ids) < self._interval:
                    self._held = held
                    return
                self._held, delta = None, held
                self._first_out = self._first_out or bool(delta.token_ids)
        self._hand(delta, batch)

    def _hand(self, delta: Delta, batch: Optional[DeltaBatch]) -> None:
        if delta.finished:
            self._done.set()
        if self._aq is not None and self._loop is not None:
            with self._lock:
                if self._pending is not None or self._queued >= self._max_queued:
                    if delta.finished:
                        self._final = delta
                    else:
                        self._pending = delta if self._pending is None else merge_deltas(self._pending, delta)
                        self.merged += 1
                    return
                self._queued += 1
            if batch is not None:
                batch.add(self._loop, self._aq, delta)
                return
            try:
                self._loop.call_soon_threadsafe(self._aq.put_nowait, delta)
            except RuntimeError:  # loop closed: the consumer is gone
                pass
        else:
            self._q.put(delta)

    @property
    def queued(self) -> int:
        """Deltas waiting for the consumer (a pending merged one counts as one)."""
        with self._lock:
            return self._queued + (self._pending is not None) + (self._final is not None)

    async def _next(self) -> Delta:
        assert self._aq is not None, "stream was created without an event loop"
        d = self._next_nowait()
        if d is not None:
            return d
        d = await self._aq.get()
        with self._lock:
            self._queued -= 1
        return d

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def _take(self, d: Delta) -> Delta:
        """Note that the consumer took `d`; the last one (or an error) ends the stream for good."""
        if d.finished or d.error is not None:
            self._drained = True
        return d

    def _check_readable(self) -> None:
        """A stream has one consumer and is read once: reading it again after its end would wait forever."""
        if self._drained:
            raise RuntimeError(f"the stream of request {self.request_id!r} was already read to its end; "
                               "a RequestStream is read once (keep the deltas, or use collect() once)")

    def __iter__(self) -> Iterator[Delta]:
        self._check_readable()
        while True:
            d = self._take(self._q.get())
            if d.error is not None:
                raise d.error
            yield d
            if d.finished:
                return

    async def __aiter__(self) -> AsyncIterator[Delta]:
        assert self._aq is not None, "stream was created without an event loop"
        self._check_readable()
        while True:
            d = self._take(await self._next())
            if d.error is not None:
                raise d.error
            yield d
            if d.finished:
                return

    def _next_nowait(self) -> Optional[Delta]:
        """The next delta if one is already here, else None: the queued ones first, then the pending merged
        one, then the final one."""
        assert self._aq is not None
        with self._lock:
            if self._queued > 0:
                if self._aq.empty():  # handed to the loop, not yet delivered
                    return None
                self._queued -= 1
                return self._aq.get_nowait()
            if self._pending is not None:
                d, self._pending = self._pending, None
                return d
            if self._final is not None:
                d, self._final = self._final, None
                return d
        return None

    async def coalesced(self) -> AsyncIterator[Delta]:
        """Like `async for`, with the deltas already waiting merged into the one yielded."""
        assert self._aq is not None, "stream was created without an event loop"
        self._check_readable()
        while True:
            d = self._take(await self._next())
            failed: Optional[Delta] = None
            while d.error is None and not d.finished:
                nxt = self._next_nowait()
                if nxt is None:
                    break
                if nxt.error is not None:
                    failed = self._take(nxt)
                    break
                d = self._take(merge_deltas(d, nxt))
            if d.error is not None:
                raise d.error
            yield d
            if d.finished:
                return
            if failed is not None:
                raise failed.error  # type: ignore[misc]

    def collect(self) -> Delta:
        """Block until finished and merge all deltas into one (for unary calls and tests)."""
        ids: list[int] = []
        texts: list[str] = []
        logprobs: Optional[list[TokenLogprob]] = None
        last: Optional[Delta] = None
        for d in self:
            ids.extend(d.token_ids)
            texts.append(d.text)
            if d.logprobs is not None:
                logprobs = (logprobs or []) + d.logprobs
            last = d
        assert last is not None
        return Delta(last.request_id, ids, "".join(texts), last.finish_reason, last.prompt_tokens,
                     last.completion_tokens, last.adapter, logprobs=logprobs)
