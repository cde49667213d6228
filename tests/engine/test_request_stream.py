"""The engine -> consumer stream is bounded: a consumer that stops reading gets merged chunks later, in order,
and never makes the queue grow past its bound or the engine thread wait."""
from __future__ import annotations

import asyncio
import threading

from server.core.identity import AdapterVersion
from server.engine.types import Delta, RequestStream, TokenLogprob

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


def test_a_consumer_that_keeps_up_sees_every_delta_on_its_own():
    async def main():
        stream = RequestStream("r", asyncio.get_running_loop(), max_queued=4)
        got = []

        async def consume():
            async for d in stream:
                got.append(d)

        task = asyncio.ensure_future(consume())
        for i in range(50):
            stream.put(_delta(i, i == 49))
            await asyncio.sleep(0)  # the consumer runs between puts
        await asyncio.wait_for(task, 5)
        assert len(got) == 50 and stream.merged == 0

    asyncio.run(main())


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
