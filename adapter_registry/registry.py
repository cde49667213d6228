"""The adapter registry: what the server resolves adapter ids through.

Disk (content-addressed objects + an index) -> host LRU (`HostCache`) -> device slots
(the engine's pool, keyed by the same digest). `resolve` turns an adapter id (parsed into
an `AdapterSelector`) into the server's one adapter identity, `AdapterVersion`, whose
`load` reads through the host tier; the engine calls it in a worker thread. Index rows
(`VersionRow`) become AdapterVersions in one place, `_identity`.
Pins are the device pool's (`is_pinned`, by digest): the registry asks it to report a
version as pinned and to refuse deleting one, and keeps no pin state of its own (so on a
fleet a pin is per replica: it holds that replica's slot, and refuses deletes made there).

The index is SQLite inside the registry directory, or PostgreSQL shared by a fleet of
replicas with the objects on a shared folder (`backends.py`); there, a change feed keeps a
resolve cache (the whole index, in memory) current on every replica, which also serves the
adapters it knows while the database is unreachable.

Deleting a version removes its index row at once (it can no longer be resolved), but its
files stay until the last AdapterVersion handed out for it is gone (and, on a shared folder, a
grace period has passed), so requests that resolved it before the delete still finish on it.
"""
from __future__ import annotations

import logging
import os
import threading
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

from server.core.threads import ShortLivedThreads
from server.core.identity import AdapterVersion, version_ref
from server.core.quotas import Quotas, QuotaSource
from server.core.stats import RegistryStats, SharedIndexStats, added
from server.core.errors import (AdapterInUseError, AdapterLoadError, AdapterNotFoundError, AdapterRejectedError,
                           InvalidRequestError, PermissionDeniedError, UnavailableError)
from server.lora.weights import CONFIG_NAME, WEIGHTS_NAME, LoraWeights
from server.model.config import ModelConfig

from .backends import open_backend
from .cache import HostCache
from .collector import ObjectCollector, Periodic
from .ids import AdapterSelector, check_name, check_tenant, parse_adapter_id
from .index_api import Change, VersionRow, adapters_quota_error, versions_quota_error
from .store import content_digest
from .validate import BIN_HINT, RegistryLimits, load_validated, validate_adapter

log = logging.getLogger("loraserve.registry")


@dataclass(frozen=True)
class AdapterVersionInfo:
    tenant: str
    name: str
    version: int
    digest: str
    rank: int
    targets: tuple[str, ...]
    size_bytes: int
    created_at: float
    metadata: dict[str, str]
    base_fingerprint: str
    in_host_memory: bool = False
    pinned: bool = False

    @property
    def ref(self) -> str:
        """`name@N` (as `AdapterVersion.ref`)."""
        return version_ref(self.name, self.version)


@dataclass(frozen=True)
class AdapterInfo:
    tenant: str
    name: str
    latest_version: int
    versions: list[AdapterVersionInfo] = field(default_factory=list)


class _Loader:
    """The `load` of an AdapterVersion. While one is alive its version's files are kept on disk."""

    def __init__(self, registry: "Registry", digest: str, ref: str):
        self._registry = registry
        self.digest = digest
        self.ref = ref

    def __call__(self) -> LoraWeights:
        return self._registry._load_weights(self.digest, self.ref)


class Registry:
    """Persistent, versioned, validated, tenant-scoped adapters (see the module docstring).

    `root`: a registry directory, or a `postgresql://` URL with `objects` the shared folder.
    `is_pinned(digest)`: whether the device holds that content pinned (the engine pool's
    `is_pinned`); without a device nothing is pinned.
    """

    def __init__(self, root: "Path | str", model_config: ModelConfig, base_fingerprint: str, max_rank: int,
                 import_dirs: Sequence[Path] = (), host_cache_bytes: int = 2 << 30,
                 limits: RegistryLimits = RegistryLimits(), tenants: Optional[QuotaSource] = None,
                 is_pinned: Callable[[str], bool] = lambda digest: False, *,
                 objects: Optional[Path] = None, object_grace_s: float = 600.0, resync_interval_s: float = 30.0):
        self.model_config = model_config
        self.base_fingerprint = base_fingerprint
        self.max_rank = int(max_rank)
        self.limits = limits
        self.tenants = tenants
        self.is_pinned = is_pinned
        self.import_dirs = tuple(Path(d).resolve() for d in import_dirs)
        self._counters = RegistryStats()         # frozen; versions_stored, host and shared are filled in by stats()
        self._remote_changes = 0
        self._closed = False
        self._versions_stored = 0  # last count read from the index (kept while a shared one is down)
        self._backend = open_backend(root, objects, object_grace_s, resync_interval_s, self._on_remote_change)
        self.index = self._backend.index
        self.store = self._backend.store
        self.root = self.store.root
        self.cache = HostCache(host_cache_bytes)
        self._publish_lock = threading.RLock()   # store + index changes, so GC never races a publish
        self._state_lock = threading.RLock()    # `_live` and the counters
        self._live: dict[str, int] = {}         # digest -> AdapterVersions alive for it
        # Removing files of deleted versions (fsync, rmtree) happens here, never in the thread that
        # happened to drop the last AdapterVersion (often the engine's loop thread).
        self._gc = ShortLivedThreads(1, "registry-gc")
        self._collector = ObjectCollector(self.store, self.index, self._backend.grace_s, self._in_use,
                                          self.cache.discard)
        self._periodic: Optional[Periodic] = None
        if self.index.shared:  # another replica may be publishing into the folder right now
            swept = self._collector.collect()
            swept = {"temp": swept["temp"], "orphan_objects": swept["objects"]}
            every = min(max(self._backend.grace_s / 2, 5.0), 300.0)
            self._periodic = Periodic(every, self._collect_soon, "registry-collector")
        else:
            swept = self.store.sweep(self.index.all_digests())
        self._count(startup_temp_removed=swept["temp"], startup_orphans_removed=swept["orphan_objects"])
        if swept["temp"] or swept["orphan_objects"]:
            log.warning("registry start-up removed %d unfinished publishes and %d orphan objects",
                        swept["temp"], swept["orphan_objects"])

    def close(self) -> None:
        if self._closed:
            return
        if self._periodic is not None:
            self._periodic.stop()
        self._gc.shutdown(wait=True)
        with self._publish_lock:
            self._closed = True
        self._backend.close()

    # ---- fleet: propagation and clean-up -----------------------------------------------------

    def _on_remote_change(self, change: Change) -> None:
        """A publish or delete committed by any replica (this one's included), from the change feed."""
        with self._state_lock:
            self._remote_changes += 1
        log.debug("registry change %s %s/%s %s", change.op, change.tenant, change.name, list(change.versions))

    def _changed_here(self, op: str, tenant: str, name: str, versions: list[int]) -> None:
        """Our own publish or delete is visible to our resolves before the call returns, not a notification later."""
        if self._backend.cache is not None:
            self._backend.cache.apply(Change(op, tenant, name, tuple(versions)))

    def _in_use(self, digest: str) -> bool:
        with self._state_lock:
            return digest in self._live

    def _collect_soon(self) -> None:
        try:
            self._gc.submit(self.collect_garbage)
        except RuntimeError:
            pass  # closing

    def collect_garbage(self) -> dict[str, int]:
        """Remove unused objects and abandoned temp dirs past the grace period (periodic on a shared folder)."""
        with self._publish_lock:
            if self._closed:
                return {"objects": 0, "temp": 0}
        out = self._collector.collect()
        self._count(objects_removed=out["objects"])
        return out

    # ---- publish -----------------------------------------------------------------------------

    def register_bytes(self, tenant: str, name: str, config_json: bytes, weights: bytes,
                       metadata: Optional[Mapping[str, str]] = None, *,
                       reuse_identical_latest: bool = False) -> AdapterVersionInfo:
        """Validate, store and index a new version of `name`; nothing is visible until all passed.

        `reuse_identical_latest`: when the newest version already has exactly these bytes,
        return it instead of adding a version (for start-up flags replayed at every restart).
        """
        check_tenant(tenant)
        check_name(name)
        if reuse_identical_latest:
            latest = self.index.get_version(tenant, name, None)
            if latest is not None and latest.digest == content_digest(config_json, weights) \
                    and latest.base_fingerprint == self.base_fingerprint:
                return self._info(latest)
        meta = self._check_metadata(metadata or {})
        self._precheck_quota(tenant, name)
        try:
            v = validate_adapter(bytes(config_json), bytes(weights), self.model_config, self.max_rank, self.limits)
        except AdapterRejectedError:
            self._count(rejected=1)
            raise
        digest = content_digest(config_json, weights)
        quotas = self._quotas(tenant)
        cfg_bytes, w_bytes = bytes(config_json), bytes(weights)
        self.store.publish(digest, cfg_bytes, w_bytes)
        with self._publish_lock:
            try:
                # The object is checked (and written again if a collector removed it meanwhile) inside
                # the index transaction, where no removal of it can run.
                row = self.index.publish(tenant, name, digest, self.base_fingerprint, v.rank, v.targets,
                                         len(config_json) + len(weights), meta,
                                         max_names=quotas.max_adapters, max_versions=quotas.max_adapter_versions,
                                         ensure_object=lambda: self.store.publish(digest, cfg_bytes, w_bytes))
            except BaseException:
                self._maybe_remove_object(digest)
                raise
        self._changed_here("publish", tenant, name, [row.version])
        self.cache.put(digest, v.weights)
        self._count(registered=1)
        info = self._info(row)
        log.info("registered %s/%s digest=%s rank=%d targets=%s", tenant, info.ref, digest[:12],
                 v.rank, ",".join(v.targets))
        return info

    def register_path(self, tenant: str, name: str, path: Path, metadata: Optional[Mapping[str, str]] = None,
                      *, allow_any_path: bool = False, reuse_identical_latest: bool = False) -> AdapterVersionInfo:
        """Register a PEFT directory on the server's disk.

        Only inside `import_dirs` (after resolving symlinks, for the directory and each file),
        unless `allow_any_path` (the server's own `--adapter NAME=PATH` flags at start-up).
        """
        cfg_path, st_path = self._import_paths(Path(path), allow_any_path)
        cfg = self._read_bounded(cfg_path, self.limits.max_config_bytes, CONFIG_NAME)
        weights = self._read_bounded(st_path, self.limits.max_weights_bytes, WEIGHTS_NAME)
        return self.register_bytes(tenant, name, cfg, weights, metadata,
                                   reuse_identical_latest=reuse_identical_latest)

    def _import_paths(self, path: Path, allow_any: bool) -> tuple[Path, Path]:
        if not allow_any and not self.import_dirs:
            raise PermissionDeniedError("server_path: registering from server-side paths is disabled "
                                        "(start the server with --import-dir DIR)")
        denied = PermissionDeniedError(
            f"server_path: {str(path)[:200]!r} is not an adapter directory inside an import directory")

        def inside(p: Path) -> bool:
            return allow_any or any(p == d or d in p.parents for d in self.import_dirs)

        try:
            d = path.resolve(strict=True)
        except (OSError, RuntimeError):
            # The operator's own path (`--adapter`) is told what is wrong; a caller's learns nothing of the disk.
            raise (AdapterRejectedError(f"{path} does not exist") if allow_any else denied) from None
        if not inside(d) or not d.is_dir():
            raise AdapterRejectedError(f"{path} is not a directory") if allow_any else denied
        st = d / WEIGHTS_NAME
        if not st.exists():
            if (d / "adapter_model.bin").exists():
                raise AdapterRejectedError(f"adapter_model.bin: {BIN_HINT}")
            raise AdapterRejectedError(f"{WEIGHTS_NAME} not found in {path}")
        out = []
        for f in (d / CONFIG_NAME, st):
            try:
                r = f.resolve(strict=True)
            except (OSError, RuntimeError):
                raise AdapterRejectedError(f"{f.name} not found in {path}") from None
            if not inside(r):  # a symlink pointing out of the import directory
                raise denied
            if not r.is_file():
                raise AdapterRejectedError(f"{f.name} in {path} is not a regular file")
            out.append(r)
        return out[0], out[1]

    @staticmethod
    def _read_bounded(path: Path, limit: int, what: str) -> bytes:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > limit:
                raise AdapterRejectedError(f"{what}: {size} bytes exceeds the limit of {limit}")
            data = f.read(limit + 1)
        if len(data) > limit:
            raise AdapterRejectedError(f"{what}: exceeds the limit of {limit} bytes")
        return data

    def _check_metadata(self, metadata: Mapping[str, str]) -> dict[str, str]:
        if len(metadata) > self.limits.max_metadata_entries:
            raise InvalidRequestError("metadata", f"{len(metadata)} entries; at most "
                                      f"{self.limits.max_metadata_entries} are allowed")
        total = 0
        for k, v in metadata.items():
            if not isinstance(k, str) or not isinstance(v, str) or not k:
                raise InvalidRequestError("metadata", "keys and values must be strings, keys non-empty")
            total += len(k.encode()) + len(v.encode())
        if total > self.limits.max_metadata_bytes:
            raise InvalidRequestError("metadata", f"{total} bytes; at most {self.limits.max_metadata_bytes} "
                                      "are allowed")
        return dict(metadata)

    def _quotas(self, tenant: str):
        return self.tenants.quotas_of(tenant) if self.tenants is not None else Quotas()

    def _precheck_quota(self, tenant: str, name: str) -> None:
        """Refuse an over-quota upload before validating it (the index re-checks atomically)."""
        q = self._quotas(tenant)
        if q.max_adapter_versions is not None and self.index.count_versions(tenant) >= q.max_adapter_versions:
            raise versions_quota_error(tenant, q.max_adapter_versions)
        if q.max_adapters is not None and not self.index.versions(tenant, name):
            names = {r.name for r in self.index.versions(tenant)}
            if len(names) >= q.max_adapters:
                raise adapters_quota_error(tenant, q.max_adapters)

    # ---- lookup ------------------------------------------------------------------------------

    def _row(self, tenant: str, adapter_id: str, cached: bool = False) -> tuple[AdapterSelector, VersionRow]:
        """`cached`: through the resolve cache (the request path), else straight from the index."""
        sel = parse_adapter_id(adapter_id)
        check_tenant(tenant)
        row = (self._backend.lookup if cached else self.index).get_version(tenant, sel.name, sel.version)
        if row is None:
            raise AdapterNotFoundError(adapter_id)  # same message for another tenant's adapter
        return sel, row

    def resolve(self, tenant: str, adapter_id: str) -> AdapterVersion:
        """The immutable version `adapter_id` names for `tenant` right now, ready for the engine."""
        _, row = self._row(tenant, adapter_id, cached=True)
        if row.base_fingerprint != self.base_fingerprint:
            raise AdapterRejectedError(
                f"adapter {adapter_id!r} was registered for base model {row.base_fingerprint[:16]}, "
                f"but this server serves {self.base_fingerprint[:16]}; register it again for this base")
        self._count(resolves=1)
        return self._identity(row)

    def _identity(self, row: VersionRow) -> AdapterVersion:
        """The one place an index row becomes the shared identity (its loader keeps the files alive)."""
        ref = version_ref(row.name, row.version)
        return AdapterVersion(tenant=row.tenant, name=row.name, version=row.version, digest=row.digest,
                              load=self._loader(row.digest, ref))

    def _loader(self, digest: str, ref: str) -> _Loader:
        loader = _Loader(self, digest, ref)
        with self._state_lock:
            self._live[digest] = self._live.get(digest, 0) + 1
        weakref.finalize(loader, self._release, digest)
        return loader

    def _release(self, digest: str) -> None:
        """The last AdapterVersion of `digest` is gone (runs in whichever thread dropped it: keep it cheap)."""
        with self._state_lock:
            n = self._live.get(digest, 0) - 1
            if n > 0:
                self._live[digest] = n
                return
            self._live.pop(digest, None)
        try:
            self._gc.submit(self._maybe_remove_object, digest)
        except RuntimeError:
            pass  # closed: the next start-up sweep removes what no row points at

    def _maybe_remove_object(self, digest: str) -> None:
        """Remove an object once no index row and no live AdapterVersion needs it (see collector.py)."""
        with self._publish_lock:
            if self._closed:
                return
            try:
                removed = self._collector.remove_if_unused(digest)
            except UnavailableError as e:  # the shared index is down: the periodic collector tries later
                log.warning("not removing object %s now: %s", digest[:12], e)
                return
            if removed:
                self._count(objects_removed=1)

    def _load_weights(self, digest: str, ref: str) -> LoraWeights:
        def from_disk() -> LoraWeights:
            try:
                cfg, weights = self.store.read(digest)
            except OSError as e:
                raise AdapterLoadError(f"adapter {ref!r}: stored files are unreadable ({e})") from None
            if content_digest(cfg, weights) != digest:
                raise AdapterLoadError(f"adapter {ref!r}: stored files do not match digest "
                                       f"{digest[:16]} (disk corruption); register it again")
            try:
                return load_validated(cfg, weights, self.model_config, self.max_rank, self.limits)
            except AdapterRejectedError as e:
                raise AdapterLoadError(f"adapter {ref!r}: {e}") from None

        return self.cache.get_or_load(digest, from_disk)

    def _info(self, row: VersionRow) -> AdapterVersionInfo:
        return AdapterVersionInfo(row.tenant, row.name, row.version, row.digest, row.rank, row.targets,
                                  row.size_bytes, row.created_at, dict(row.metadata), row.base_fingerprint,
                                  in_host_memory=row.digest in self.cache, pinned=self.is_pinned(row.digest))

    def list(self, tenant: str) -> list[AdapterInfo]:
        check_tenant(tenant)
        by_name: dict[str, list[AdapterVersionInfo]] = {}
        for row in self.index.versions(tenant):
            by_name.setdefault(row.name, []).append(self._info(row))
        return [AdapterInfo(tenant, n, vs[-1].version, vs) for n, vs in sorted(by_name.items())]

    def get(self, tenant: str, name: str) -> AdapterInfo:
        """All versions of `name`, or just one for `name@N` / `name@latest`."""
        sel = parse_adapter_id(name)
        check_tenant(tenant)
        rows = self.index.versions(tenant, sel.name)
        if not rows:
            raise AdapterNotFoundError(name)
        latest = rows[-1].version
        if "@" in name:
            want = latest if sel.version is None else sel.version
            rows = [r for r in rows if r.version == want]
            if not rows:
                raise AdapterNotFoundError(name)
        return AdapterInfo(tenant, sel.name, latest, [self._info(r) for r in rows])

    # ---- delete ------------------------------------------------------------------------------

    def delete(self, tenant: str, adapter_id: str) -> list[int]:
        """Delete `name@N` (or `name@latest`), or every version for a bare `name`.

        Refused with AdapterInUseError while a targeted version is pinned on the device. Requests that
        already resolved a deleted version keep it until they finish. Returns the versions.
        """
        sel = parse_adapter_id(adapter_id)
        check_tenant(tenant)
        if "@" in adapter_id:
            _, row = self._row(tenant, adapter_id)
            rows = [row]
        else:
            rows = self.index.versions(tenant, sel.name)
            if not rows:
                raise AdapterNotFoundError(adapter_id)
        pinned = [version_ref(r.name, r.version) for r in rows if self.is_pinned(r.digest)]
        if pinned:
            raise AdapterInUseError(f"adapter {', '.join(pinned)} is pinned; unload (unpin) it before deleting")
        with self._publish_lock:
            gone = self.index.delete(tenant, sel.name, [r.version for r in rows])
        self._changed_here("delete", tenant, sel.name, gone)
        for digest in {r.digest for r in rows}:
            self._maybe_remove_object(digest)
        self._count(deleted_versions=len(rows))
        log.info("deleted %s/%s versions %s", tenant, sel.name, [r.version for r in rows])
        return [r.version for r in rows]

    def _count(self, **increments: int) -> None:
        with self._state_lock:
            self._counters = added(self._counters, **increments)

    def stats(self) -> RegistryStats:
        """Counters, size, the host tier's stats (a disk read is a host tier `load`) and, for an index shared
        by a fleet, what this replica sees of it; for the metrics module."""
        try:
            self._versions_stored = self.index.count_versions()
        except UnavailableError:
            pass  # the shared index is down: keep exporting the last count
        with self._state_lock:
            counters, remote_changes = self._counters, self._remote_changes
        return replace(counters, versions_stored=self._versions_stored, host=self.cache.stats(),
                       shared=self._shared_stats(remote_changes))

    def _shared_stats(self, remote_changes: int) -> Optional[SharedIndexStats]:
        """The shared index's health as this replica sees it (None for a local registry)."""
        cache, feed = self._backend.cache, self._backend.feed
        if cache is None or feed is None:
            return None
        return SharedIndexStats(remote_changes=remote_changes, resyncs=feed.resyncs, disconnects=feed.disconnects,
                                resolve=cache.stats())
