"""How an engine step's tokens reach async consumers: one wake-up per loop a step, and a consumer that
falls behind catching up in one merged delta (gRPC) or delta by delta (HTTP's one event a token)."""
from __future__ import annotations

import asyncio
import threading

import pytest

from server.engine.types import Delta, DeltaBatch, RequestStream, TokenLogprob


def _d(tok: int, reason=None, error=None, logprob=False) -> Delta:
    lps = [TokenLogprob(tok, -1.0 * tok)] if logprob else None
    return Delta("r", [tok], f"<{tok}>", reason, 3, tok, None, error, lps)


def test_a_step_wakes_each_loop_once_and_keeps_order():
    async def main():
        loop = asyncio.get_running_loop()
        streams = [RequestStream(f"r{i}", loop) for i in range(4)]
        calls = 0
        real = loop.call_soon_threadsafe

        def counting(*a, **k):
            nonlocal calls
            calls += 1
            return real(*a, **k)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]

        held = []  # wake-ups seen before each step's flush

        def engine_step(toks, reason=None):
            batch = DeltaBatch()
            before = calls
            for s in streams:
                s.put(_d(toks, reason), batch)
            held.append(calls - before)  # nothing handed over before the flush
            batch.flush()

        def engine():
            engine_step(1)
            engine_step(2, "length")

        t = threading.Thread(target=engine)
        t.start()
        got = [[d.token_ids for d in [x async for x in s]] for s in streams]
        t.join()
        return calls, held, got

    calls, held, got = asyncio.run(asyncio.wait_for(main(), 30))
    assert held == [0, 0]
    assert calls == 2  # two steps, one loop: two wake-ups for eight deltas
    assert got == [[[1], [2]]] * 4


def test_coalesced_merges_what_waits_and_async_for_does_not():
    async def main(coalesce: bool):
        loop = asyncio.get_running_loop()
        s = RequestStream("r", loop)
        for t in (1, 2, 3):
            s.put(_d(t, logprob=True))
        await asyncio.sleep(0)  # the three are queued before the consumer looks
        it = s.coalesced() if coalesce else s.__aiter__()
        first = await it.__anext__()
        s.put(_d(4, "length", logprob=True))
        rest = [d async for d in it]
        return [first, *rest]

    merged = asyncio.run(asyncio.wait_for(main(True), 30))
    assert [d.token_ids for d in merged] == [[1, 2, 3], [4]]
    assert merged[0].text == "<1><2><3>" and [lp.token_id for lp in merged[0].logprobs] == [1, 2, 3]
    assert merged[0].completion_tokens == 3 and merged[-1].finish_reason == "length"
    assert [d.token_ids for d in asyncio.run(asyncio.wait_for(main(False), 30))] == [[1], [2], [3], [4]]


def test_coalesced_delivers_the_tokens_before_an_error_then_raises_it():
    async def main():
        s = RequestStream("r", asyncio.get_running_loop())
        s.put(_d(1))
        s.put(_d(2))
        s.put(Delta("r", [], "", "error", error=RuntimeError("boom")))
        await asyncio.sleep(0)
        seen = []
        with pytest.raises(RuntimeError, match="boom"):
            async for d in s.coalesced():
                seen.append(d.token_ids)
        return seen

    assert asyncio.run(asyncio.wait_for(main(), 30)) == [[1, 2]]
