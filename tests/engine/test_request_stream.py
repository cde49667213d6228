"""How the engine's deltas reach a consumer: bounded (a consumer that stops reading gets merged chunks later, in
order, and never makes the queue grow past its bound or the engine thread wait), one wake-up per loop a step, and
a consumer that falls behind catching up in one merged delta (gRPC) or delta by delta (HTTP's one event a token)."""
from __future__ import annotations

import asyncio
import threading

import pytest

from server.core.identity import AdapterVersion
from server.engine.types import Delta, DeltaBatch, RequestStream, TokenLogprob

ADAPTER = AdapterVersion("t", "ad", 2, "digest", load=lambda: None)


def _delta(i: int, last: bool = False) -> Delta:
    return Delta("r", [i], f"<{i}>", "length" if last else None, 3, i + 1, ADAPTER,
                 logprobs=[TokenLogprob(i, -0.5)])


def test_a_stalled_consumer_leaves_at_most_the_bound_queued_and_loses_nothing():
    async def main():
        stream = RequestStream("r", asyncio.get_running_loop(), max_queued=8)
        producer = threading.Thread(target=lambda: [stream.put(_delta(i, i == 999)) for i in range(1000)])
        producer.start()
        producer.join(10)  # the engine side never waits for the consumer
        assert not producer.is_alive()
        await asyncio.sleep(0.05)
        assert stream.queued <= 10 and stream.merged == 1000 - 9
        got = [d async for d in stream]
        assert sum(len(d.token_ids) for d in got) == 1000
        assert [t for d in got for t in d.token_ids] == list(range(1000))
        assert "".join(d.text for d in got) == "".join(f"<{i}>" for i in range(1000))
        assert len(got) == 10 and got[-1].finish_reason == "length" and got[-1].completion_tokens == 1000
        assert got[-1].adapter == ADAPTER
        assert [lp.token_id for d in got for lp in d.logprobs] == list(range(1000))  # one per token, merged too

    asyncio.run(main())


def _kept_up(n: int, **stream_args) -> tuple[list[Delta], RequestStream]:
    """n one-token deltas (the last finishing) put with the consumer running between puts; what it saw."""
    async def main():
        stream = RequestStream("r", asyncio.get_running_loop(), **stream_args)
        got: list[Delta] = []

        async def consume():
            async for d in stream:
                got.append(d)

        task = asyncio.ensure_future(consume())
        for i in range(n):
            stream.put(_delta(i, i == n - 1))
            await asyncio.sleep(0)  # the consumer runs between puts
        await asyncio.wait_for(task, 5)
        return got, stream

    return asyncio.run(main())


def test_a_consumer_that_keeps_up_sees_every_delta_on_its_own():
    got, stream = _kept_up(50, max_queued=4)
    assert len(got) == 50 and stream.merged == 0


def test_an_error_after_a_backlog_still_reaches_the_consumer():
    async def main():
        stream = RequestStream("r", asyncio.get_running_loop(), max_queued=2)
        for i in range(5):
            stream.put(_delta(i))
        stream.put(Delta("r", [], "", "error", error=RuntimeError("boom")))
        seen = []
        try:
            async for d in stream:
                seen.extend(d.token_ids)
        except RuntimeError as e:
            assert str(e) == "boom"
        else:
            raise AssertionError("the error was swallowed")
        assert seen == [0, 1, 2, 3, 4]  # every token, then the error, as an unbounded queue would deliver them

    asyncio.run(main())


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
        got = []
        for s in streams:  # not a comprehension around `async for`: Python 3.10 refuses that
            got.append([d.token_ids async for d in s])
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


def test_coalesced_after_a_stall_gets_every_token_in_order_in_few_messages():
    async def main():
        s = RequestStream("r", asyncio.get_running_loop(), max_queued=8)
        for i in range(1000):
            s.put(_d(i, "length" if i == 999 else None))
        await asyncio.sleep(0.05)
        return [d async for d in s.coalesced()]

    got = asyncio.run(asyncio.wait_for(main(), 30))
    assert [t for d in got for t in d.token_ids] == list(range(1000))
    assert len(got) <= 2 and got[-1].finish_reason == "length"


def test_a_stream_interval_sends_the_first_token_at_once_then_groups_and_flushes_the_last():
    """--stream-interval 3: a keeping-up consumer sees the first token alone, then three at a time, then the rest
    with the finish; nothing lost or reordered, the finish never held back."""
    got, _ = _kept_up(8, stream_interval=3)
    assert [d.token_ids for d in got] == [[0], [1, 2, 3], [4, 5, 6], [7]]
    assert "".join(d.text for d in got) == "".join(f"<{i}>" for i in range(8))
    assert got[-1].finish_reason == "length" and got[-1].completion_tokens == 8
    assert [lp.token_id for d in got for lp in d.logprobs] == list(range(8))


def test_a_stream_interval_hands_over_held_tokens_before_an_error():
    s = RequestStream("r", None, stream_interval=4)
    for i in range(3):
        s.put(_delta(i))
    s.put(Delta("r", [], "", "error", error=RuntimeError("boom")))
    seen = []
    with pytest.raises(RuntimeError, match="boom"):
        for d in s:
            seen.append(d.token_ids)
    assert seen == [[0], [1, 2]]


def test_a_stream_read_to_its_end_says_so_when_read_again_instead_of_waiting_forever():
    sync = RequestStream("r")
    for i in range(3):
        sync.put(_delta(i, i == 2))
    assert sync.collect().token_ids == [0, 1, 2]
    with pytest.raises(RuntimeError, match="'r' was already read to its end"):
        list(sync)

    async def main():
        stream = RequestStream("r", asyncio.get_running_loop())
        for i in range(3):
            stream.put(_delta(i, i == 2))
        await asyncio.sleep(0)
        assert [t async for d in stream.coalesced() for t in d.token_ids] == [0, 1, 2]
        for again in (stream.coalesced(), stream.__aiter__()):
            with pytest.raises(RuntimeError, match="read once"):
                await asyncio.wait_for(again.__anext__(), 1)

    asyncio.run(main())


def test_a_consumer_that_stops_early_reads_on_where_it_left_off():
    stream = RequestStream("r")
    for i in range(4):
        stream.put(_delta(i, i == 3))
    for d in stream:
        assert d.token_ids == [0]
        break
    assert [t for d in stream for t in d.token_ids] == [1, 2, 3]
