"""How a replica hears of every publish and delete in the fleet without polling the world.

One thread, one dedicated connection: `LISTEN loraserve_registry`, then each notification
(sent by `pg_index.PgIndex` inside the committing transaction, delivered at commit) becomes
a `Change` for the registry. Two safety nets:

- on every (re)connect, after LISTEN is in place, `on_sync` tells the cache to distrust all it
  holds, and `on_snapshot` hands it every live version, read in one query on this connection
  (anything committed while we were not listening is in it; what commits later is notified);
- every `resync_interval_s`, the change counter is read (one row); if it is still past the last
  change we heard of at the next check (a transaction between its number and its commit is
  not lost, only late), a notification was lost somehow and `on_sync` runs again. The same
  query is the liveness check of the connection.

When the connection fails, `on_down` runs at once (the cache then serves what it knows and
refuses what it does not) and the thread reconnects with a backoff capped at `reconnect_max_s`.
The thread waits on its connection's socket and on a wake-up pipe together, so `stop` (every registry
close) returns at once instead of after the rest of a poll interval.
"""
from __future__ import annotations

import json
import logging
import os
import select
import threading
import time
from typing import Any, Callable, Optional

import psycopg

from .index_api import Change, VersionRow
from .pg_index import CHANNEL, read_all_versions, read_change_seq, redacted

log = logging.getLogger("loraserve.registry.pg")

POLL_S = 0.25  # longest wait between the resync checks' clock reads; notifications and stop end a wait at once


def parse_change(payload: str) -> Optional[Change]:
    try:
        d = json.loads(payload)
        return Change(op=str(d["op"]), tenant=str(d["tenant"]), name=str(d["name"]),
                      versions=tuple(int(v) for v in d.get("versions", ())), seq=int(d.get("seq", 0)))
    except (ValueError, KeyError, TypeError):
        return None


class ChangeListener:
    """The LISTEN thread (see the module docstring). Callbacks run in this thread: keep them short."""

    def __init__(self, url: str, kwargs: dict[str, Any], on_change: Callable[[Change], None],
                 on_sync: Callable[[], int], on_snapshot: Callable[[list[VersionRow], int], int],
                 on_down: Callable[[str], None], resync_interval_s: float = 30.0, reconnect_max_s: float = 1.0,
                 poll_s: Optional[float] = None):
        self.url = url
        self.where = redacted(url)
        self.kwargs = dict(kwargs)
        self.on_change, self.on_sync, self.on_snapshot, self.on_down = on_change, on_sync, on_snapshot, on_down
        self.resync_interval_s = resync_interval_s
        self.reconnect_max_s = reconnect_max_s
        self.poll_s = POLL_S if poll_s is None else poll_s
        self.connected = threading.Event()
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe()  # a byte written here ends the wait in `_serve` at once
        self._last_seq = 0
        self.changes_received = 0
        self.resyncs = 0          # times the whole index was read (every connect, and a gap in the changes)
        self.disconnects = 0
        self._thread = threading.Thread(target=self._run, name="registry-listener", daemon=True)

    def start(self, wait_s: float = 5.0) -> bool:
        """Start listening; True once connected (within `wait_s`)."""
        self._thread.start()
        return self.connected.wait(wait_s)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._wake_w >= 0:
            os.write(self._wake_w, b"x")
        self._thread.join(timeout)
        if not self._thread.is_alive():
            for fd in (self._wake_r, self._wake_w):
                os.close(fd)
            self._wake_r = self._wake_w = -1

    def _run(self) -> None:
        backoff = 0.05
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.url, **self.kwargs) as conn:
                    self._listen(conn)
                    backoff = 0.05
                    self._serve(conn)
            except psycopg.Error as e:
                reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
                if self.connected.is_set():
                    self.connected.clear()
                    self.disconnects += 1
                    log.warning("lost the registry change feed from %s (%s); serving cached adapters, "
                                "reconnecting", self.where, reason)
                self.on_down(reason)
            except Exception:  # noqa: BLE001 - a callback bug must not end propagation for good
                log.exception("registry change listener failed; restarting it")
                self.connected.clear()
                self.on_down("listener error")
            if self._stop.wait(backoff):
                break
            backoff = min(backoff * 2, self.reconnect_max_s)
        self.connected.clear()

    def _listen(self, conn: psycopg.Connection) -> None:
        conn.execute(f"LISTEN {CHANNEL}")
        self._last_seq = read_change_seq(conn)  # after LISTEN: nothing committed later can be missed
        was = self.disconnects
        self._resync(conn)
        self.connected.set()
        if was:
            log.info("registry change feed from %s is back; the index was read again", self.where)

    def _serve(self, conn: psycopg.Connection) -> None:
        next_check = time.monotonic() + self.resync_interval_s
        suspect = 0  # a change number seen in the counter but not yet heard of
        while not self._stop.is_set():
            for note in conn.notifies(timeout=0):  # what arrived, also during the queries below
                change = parse_change(note.payload)
                if change is None:
                    log.warning("ignoring a malformed registry notification: %.200s", note.payload)
                    continue
                self.changes_received += 1
                self._last_seq = max(self._last_seq, change.seq)
                self.on_change(change)
            ready, _, _ = select.select([conn.fileno(), self._wake_r], [], [], self.poll_s)
            if self._wake_r in ready:
                return
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + self.resync_interval_s
                seq = read_change_seq(conn)
                if suspect > self._last_seq:
                    log.warning("registry changes up to %d were not heard of (last heard %d); resyncing",
                                suspect, self._last_seq)
                    self._last_seq = max(self._last_seq, suspect)
                    self._resync(conn)
                suspect = seq if seq > self._last_seq else 0

    def _resync(self, conn: psycopg.Connection) -> None:
        epoch = self.on_sync()
        t0 = time.monotonic()
        kept = self.on_snapshot(read_all_versions(conn), epoch)
        self.resyncs += 1
        log.info("registry index snapshot: %d adapter names in %.3fs", kept, time.monotonic() - t0)
