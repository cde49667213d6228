"""The stall monitor aborts a stream only while one of its writes has waited past the timeout."""
from __future__ import annotations

import asyncio

from server.api.stalls import StallMonitor


def test_only_a_write_waiting_past_the_timeout_is_aborted():
    aborted, counted = [], []
    m = StallMonitor(2.0, on_abort=lambda: counted.append(1))
    idle, slow, quick = (m.watch(lambda n=n: aborted.append(n)) for n in ("idle", "slow", "quick"))
    slow.writing()
    quick.writing()
    slow.since = quick.since - 10.0  # its write has waited 10 s
    quick.written()
    assert m.check(now=slow.since + 2.5) == 1
    assert aborted == ["slow"] and counted == [1] and slow.stalled and not idle.stalled
    assert m.check(now=slow.since + 100) == 0  # once aborted, forgotten


def test_zero_means_never_and_the_task_runs_checks():
    off = StallMonitor(0)
    w = off.watch(lambda: None)
    w.writing()
    assert not off.enabled and off.check(now=w.since + 1e9) == 0

    async def main():
        hits = []
        m = StallMonitor(0.1)
        m.start()
        w = m.watch(lambda: hits.append(1))
        w.writing()
        await asyncio.sleep(0.5)
        await m.stop()
        return hits, m.aborted

    assert asyncio.run(main()) == ([1], 1)
