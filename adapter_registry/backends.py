"""Which index and objects folder a registry uses, chosen by what `--registry` names.

- a directory (the embedded default): SQLite index and objects inside it, one process at a time
  (an exclusive lock on `DIR/.lock`), unused objects removed at once;
- `postgresql://...`: the shared index in PostgreSQL, objects in `--objects DIR` (a folder every
  replica mounts), no single-writer lock, a change feed that keeps a resolve cache current, and
  unused objects removed only after a grace period.
"""
from __future__ import annotations

import fcntl
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Protocol, Union

from server.core.errors import InvalidRequestError, UnavailableError

from .index import Index
from .index_api import Change, IndexBackend, VersionRow, is_index_url
from .store import ObjectStore

if TYPE_CHECKING:
    from .pg_listener import ChangeListener
    from .resolve_cache import ResolveCache

log = logging.getLogger("loraserve.registry")


class Lookup(Protocol):
    def get_version(self, tenant: str, name: str, version: Optional[int]) -> Optional[VersionRow]: ...


@dataclass
class Backend:
    index: IndexBackend
    store: ObjectStore
    lookup: Lookup                # what `resolve` reads: the index itself, or a cache in front of it
    grace_s: float                # how long unused objects and temp dirs are kept
    feed: Optional["ChangeListener"] = None   # a shared index's change feed
    cache: Optional["ResolveCache"] = None    # ... and the resolve cache it keeps current
    lock_fd: int = -1                         # the directory lock of a local registry

    def close(self) -> None:
        if self.feed is not None:
            self.feed.stop()
        self.index.close()
        if self.lock_fd >= 0:
            os.close(self.lock_fd)  # releases the flock
            self.lock_fd = -1


def open_backend(location: Union[str, Path], objects: Optional[Path], grace_s: float, resync_interval_s: float,
                 on_change: Callable[[Change], None]) -> Backend:
    if is_index_url(location):
        return _open_shared(str(location), objects, grace_s, resync_interval_s, on_change)
    return _open_local(Path(location), objects)


def _open_local(root: Path, objects: Optional[Path]) -> Backend:
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise UnavailableError(f"registry {root} is in use by another loraserve process") from None
    try:
        index = Index(root / "index.sqlite")
        store = ObjectStore(Path(objects) if objects else root)
    except BaseException:
        os.close(fd)
        raise
    return Backend(index, store, index, grace_s=0.0, lock_fd=fd)


def _open_shared(url: str, objects: Optional[Path], grace_s: float, resync_interval_s: float,
                 on_change: Callable[[Change], None]) -> Backend:
    from .pg_index import PgIndex
    from .pg_listener import ChangeListener
    from .resolve_cache import ResolveCache

    if objects is None:
        raise InvalidRequestError("objects", "a PostgreSQL registry needs --objects DIR: the folder of adapter "
                                  "files every replica mounts (NFS, a ReadWriteMany volume)")
    store = ObjectStore(Path(objects))
    index = PgIndex(url)
    cache = ResolveCache(index.versions, index.describe())

    def changed(change: Change) -> None:  # in the listener's thread
        cache.apply(change)
        cache.refresh(change.tenant, change.name)  # so no request waits for this read
        on_change(change)

    feed = ChangeListener(url, index.kwargs, on_change=changed, on_sync=cache.synced,
                          on_snapshot=cache.load_snapshot, on_down=cache.down, resync_interval_s=resync_interval_s)
    if not feed.start(wait_s=10.0):
        feed.stop()
        index.close()
        raise UnavailableError(f"cannot listen for registry changes on {index.describe()}")
    log.info("registry index %s, objects in %s (shared; unused objects kept %.0fs)", index.describe(), objects,
             grace_s)
    return Backend(index, store, cache, grace_s=grace_s, feed=feed, cache=cache)
