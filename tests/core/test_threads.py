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


def test_submit_from_a_finalizer_the_garbage_collector_runs_never_deadlocks():
    """The registry submits from weakref finalizers; the collector runs them in any allocating thread, also in a
    new worker's bootstrap while its starter holds the executor's lock (a deadlock the soak found)."""
    import gc
    import random
    import weakref

    ex = ShortLivedThreads(1, "gc")
    fired: list[int] = []

    class Node:
        pass

    def cyclic_garbage_with_finalizer() -> None:
        a, b = Node(), Node()
        a.other, b.other = b, a
        weakref.finalize(a, lambda: (fired.append(1), ex.submit(int)))

    def churn() -> None:
        rng = random.Random(0)
        for _ in range(1500):
            for _ in range(rng.randrange(1, 20)):
                cyclic_garbage_with_finalizer()
            while ex.live_threads:  # every submit below starts a worker
                time.sleep(0.0002)
            ex.submit(int)

    old = gc.get_threshold()
    gc.set_threshold(3, 1000, 1000)  # collect often, so collections land inside submit() and thread starts
    try:
        worker = threading.Thread(target=churn, daemon=True)
        worker.start()
        worker.join(120)
    finally:
        gc.set_threshold(*old)
    assert not worker.is_alive(), f"deadlocked after {len(fired)} finalizers"
    assert len(fired) > 1000
