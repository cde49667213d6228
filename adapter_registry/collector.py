"""Removing adapter files nothing needs any more, safely when many replicas write one folder.

An object may go when no index row references it, no request of this process holds it, and,
on a shared folder, a grace period has passed since it was last written, published again or
released by a delete (whichever is latest). The grace period is what lets another replica's
publish in progress, and another replica's requests that resolved a version just before it was
deleted, finish on it. The index's `removal_guard` closes the last gap: a publish of the same
bytes commits its row either before the removal (then the object stays) or after it (then it
writes the object again inside its transaction). Temp dirs follow the same grace period.

With a folder one process owns (SQLite), the grace period is 0 and the removal is immediate.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from .index_api import IndexBackend
from .store import ObjectStore

log = logging.getLogger("loraserve.registry")


class ObjectCollector:
    def __init__(self, store: ObjectStore, index: IndexBackend, grace_s: float,
                 in_use: Callable[[str], bool], on_removed: Callable[[str], None]):
        self.store = store
        self.index = index
        self.grace_s = max(0.0, float(grace_s))
        self.in_use = in_use
        self.on_removed = on_removed

    def _young(self, digest: str) -> bool:
        if self.grace_s <= 0:
            return False
        if self.store.age(digest) < self.grace_s:
            return True
        released = self.index.released_at(digest)
        return released is not None and time.time() - released < self.grace_s

    def remove_if_unused(self, digest: str) -> bool:
        """Remove `digest`'s object if nothing needs it (see the module docstring); True if removed."""
        if self.in_use(digest) or self._young(digest):
            return False
        with self.index.removal_guard(digest) as free:
            if not free or self.in_use(digest):
                return False
            self.on_removed(digest)  # e.g. drop it from the host cache
            if not self.store.exists(digest):
                return False
            self.store.remove(digest)
        return True

    def collect(self) -> dict[str, int]:
        """One pass over the folder: unused objects and abandoned temp dirs past the grace period."""
        referenced = self.index.all_digests()
        removed = 0
        for digest in list(self.store.digests()):
            if digest not in referenced:
                try:
                    removed += self.remove_if_unused(digest)
                except ValueError:  # not a digest: nothing of ours
                    continue
        temp = self.store.sweep_temp(self.grace_s)
        if removed or temp:
            log.info("registry collector removed %d unused objects and %d abandoned temp dirs", removed, temp)
        return {"objects": removed, "temp": temp}


class Periodic:
    """Calls `fn` every `interval_s` seconds in its own daemon thread until `stop`."""

    def __init__(self, interval_s: float, fn: Callable[[], object], name: str):
        self.interval_s = interval_s
        self.fn = fn
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.fn()
            except Exception as e:  # noqa: BLE001 - the next round tries again
                log.warning("%s failed: %s", self._thread.name, e)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5.0)
