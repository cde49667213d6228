"""Helper threads that touch tensors must not outlive their work (server.core.threads)."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from server.core.threads import ShortLivedThreads, run_in_fresh_thread, use_compute_threads


def _wait_until(cond, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def test_workers_exit_when_the_queue_runs_dry():
    ex = ShortLivedThreads(2, "t")
    futs = [ex.submit(lambda i=i: torch.ones(64, 64).sum().item() + i) for i in range(6)]
    assert [f.result(timeout=5) for f in futs] == [4096.0 + i for i in range(6)]
    assert _wait_until(lambda: ex.live_threads == 0)
    assert not [t for t in threading.enumerate() if t.name.startswith("t_")]
    ex.shutdown()


def test_concurrency_is_bounded_and_errors_reach_the_caller():
    ex = ShortLivedThreads(2, "b")
    gate = threading.Event()
    running = []
    lock = threading.Lock()

    def job():
        with lock:
            running.append(1)
            peak = len(running)
        gate.wait(5)
        with lock:
            running.pop()
        return peak

    futs = [ex.submit(job) for _ in range(5)]
    time.sleep(0.1)
    assert ex.live_threads == 2
    gate.set()
    assert max(f.result(timeout=5) for f in futs) <= 2
    bad = ex.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        bad.result(timeout=5)
    ex.shutdown(wait=True)
    assert ex.live_threads == 0
    with pytest.raises(RuntimeError):
        ex.submit(lambda: 1)


def test_shutdown_can_cancel_queued_work():
    ex = ShortLivedThreads(1, "c")
    gate = threading.Event()
    first = ex.submit(gate.wait, 5)
    assert _wait_until(first.running)
    queued = ex.submit(lambda: "never")
    ex.shutdown(wait=False, cancel_futures=True)
    gate.set()
    assert first.result(timeout=5) is True
    assert queued.cancelled()


def test_run_in_fresh_thread_returns_and_raises():
    assert run_in_fresh_thread(lambda a, b: a + b, 2, 3) == 5
    with pytest.raises(ValueError, match="boom"):
        run_in_fresh_thread(lambda: (_ for _ in ()).throw(ValueError("boom")))


def test_use_compute_threads_sets_the_callers_threads():
    before = torch.get_num_threads()
    try:
        assert run_in_fresh_thread(lambda: (use_compute_threads(1), torch.get_num_threads())) == (1, 1)
    finally:
        torch.set_num_threads(before)
