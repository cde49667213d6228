"""Which threads may run multi-threaded torch ops on CPU: the engine loop only.

torch's CPU ops run on OpenMP (GNU libgomp), and every host thread that ever opens a
parallel region keeps its own pool of worker threads for the rest of its life. Once
the workers of all pools outnumber the CPUs, libgomp stops spinning at barriers and
puts workers to sleep at once, so every small parallel op pays a futex wake-up. A
decode step is thousands of small ops: measured on the 2-core CI machine, 4,000 small
matmuls took 3.3 ms on a lone thread and 42 ms on a thread started after the main
thread had run one large matmul; the LoRA part of a decode step went from 27 ms to
61-78 ms while the adapter loader's idle thread was alive.

So: the engine loop sets its thread count when it starts (`use_compute_threads`), and
every other thread that touches tensors (model loading, adapter loads, registry
validation, garbage collection) is short-lived: `run_in_fresh_thread` for one call,
`ShortLivedThreads` for a queue of them, whose workers exit as soon as the queue is
empty, taking their OpenMP pools along. Making helpers single-threaded instead does not
work: `torch.set_num_threads(1)` in a helper halved the engine's throughput (measured).
"""
from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Executor, Future
from typing import Any, Callable, Optional, TypeVar

import torch

T = TypeVar("T")

# torch's own default (physical cores, or OMP_NUM_THREADS), captured before anyone changes it.
DEFAULT_COMPUTE_THREADS = torch.get_num_threads()


def use_compute_threads(threads: int = 0) -> int:
    """Give the calling thread (the engine loop) `threads` intra-op threads (0: torch's default)."""
    n = threads if threads > 0 else DEFAULT_COMPUTE_THREADS
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


class ShortLivedThreads(Executor):
    """An executor whose worker threads exit whenever its queue runs dry (at most `max_workers` at once)."""

    def __init__(self, max_workers: int, thread_name_prefix: str):
        if max_workers < 1:
            raise ValueError("max_workers must be at least 1")
        self._max, self._prefix = max_workers, thread_name_prefix
        self._queue: deque[tuple[Future, Callable[..., Any], tuple, dict]] = deque()
        self._active = 0
        self._started = 0
        self._shutdown = False
        # Re-entrant, and no thread is started while it is held: submit() is called from weakref finalizers
        # (the registry's), which the garbage collector runs in whichever thread allocates, also inside this
        # lock or in a new worker's bootstrap while its starter waits for it (a deadlock the soak found).
        self._idle = threading.Condition(threading.RLock())

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> "Future[T]":
        fut: Future = Future()
        with self._idle:
            if self._shutdown:
                raise RuntimeError("cannot schedule new work after shutdown")
            self._queue.append((fut, fn, args, kwargs))
            start = self._active < self._max
            if start:
                self._active += 1
                self._started += 1
                name = f"{self._prefix}_{self._started}"
        if start:
            threading.Thread(target=self._work, name=name, daemon=True).start()
        return fut

    def _work(self) -> None:
        while True:
            with self._idle:
                if not self._queue:
                    self._active -= 1
                    self._idle.notify_all()
                    return
                fut, fn, args, kwargs = self._queue.popleft()
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args, **kwargs))
            except BaseException as e:  # noqa: BLE001 - delivered through the future
                fut.set_exception(e)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._idle:
            self._shutdown = True
            if cancel_futures:
                while self._queue:
                    self._queue.popleft()[0].cancel()
            if wait:
                self._idle.wait_for(lambda: self._active == 0)

    @property
    def live_threads(self) -> int:
        with self._idle:
            return self._active


def run_in_fresh_thread(fn: Callable[..., T], *args: Any, threads: int = 0, name: str = "loraserve-load") -> T:
    """Run `fn(*args)` with full intra-op threads in a thread that exits afterwards, taking its pool along."""
    box: dict[str, Any] = {}

    def work() -> None:
        use_compute_threads(threads)
        try:
            box["result"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            box["error"] = e

    th = threading.Thread(target=work, name=name, daemon=True)
    th.start()
    th.join()
    err: Optional[BaseException] = box.get("error")
    if err is not None:
        raise err
    return box["result"]
