"""Content-addressed, immutable adapter files with crash-safe publish.

Layout under the registry root (no user-supplied string ever becomes a path component):

    objects/<d[:2]>/<digest>/adapter_config.json
    objects/<d[:2]>/<digest>/adapter_model.safetensors
    tmp/<random>/                       a publish in progress (an orphan once its writer is gone)

Publish order: write both files into a fresh temp dir, fsync each file and the dir,
rename the dir to its final name, fsync the parent. Only then does the caller add the
index row. A kill at any point leaves either nothing visible (a temp dir, or an object
no row points at: both orphans, removed by `sweep`) or the whole version.

The folder may be shared by many replicas (`--objects` on NFS or a ReadWriteMany volume):
objects are immutable and named by digest, so two writers of one object write the same
bytes. There, orphans are only removed once older than a grace period (`min_age_s`), so
another replica's publish in progress is never swept; a publish of an object that already
exists refreshes its modification time for the same reason.
"""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
import struct
import time
import uuid
from pathlib import Path
from typing import Iterable

from server.core.errors import StorageFullError
from server.lora.weights import CONFIG_NAME, WEIGHTS_NAME

_DOMAIN = b"loraserve-adapter-v1\0"


def content_digest(config_json: bytes, weights: bytes) -> str:
    """sha256 over the config and the weights together: two versions that differ only in
    lora_alpha must never share a device slot, so the config is part of the identity."""
    h = hashlib.sha256(_DOMAIN)
    h.update(struct.pack("<Q", len(config_json)))
    h.update(config_json)
    h.update(weights)
    return h.hexdigest()


FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def storage_full(root: Path, doing: str, e: OSError) -> StorageFullError:
    return StorageFullError(f"the registry's disk is full ({e.strerror}) at {root} while {doing}; nothing was "
                            "stored; free space (or delete old adapter versions) and retry")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


class ObjectStore:
    """Immutable adapter versions on disk, addressed by `content_digest`."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.objects = self.root / "objects"
        self.tmp = self.root / "tmp"
        for d in (self.root, self.objects, self.tmp):
            d.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"not a sha256 hex digest: {digest!r}")
        return self.objects / digest[:2] / digest

    def exists(self, digest: str) -> bool:
        p = self.path(digest)
        return (p / CONFIG_NAME).is_file() and (p / WEIGHTS_NAME).is_file()

    def publish(self, digest: str, config_json: bytes, weights: bytes) -> Path:
        """Make the object durable under its final name; idempotent for equal content."""
        final = self.path(digest)
        if self.exists(digest):
            self.touch(digest)  # "in use from now": a collector elsewhere must wait another grace period
            return final
        work = self.tmp / uuid.uuid4().hex
        try:
            work.mkdir()
            _write_synced(work / CONFIG_NAME, config_json)
            _write_synced(work / WEIGHTS_NAME, weights)
            _fsync_dir(work)
            final.parent.mkdir(exist_ok=True)
            try:
                os.rename(work, final)
            except OSError:
                if not self.exists(digest):  # not a concurrent publish of the same content
                    raise
            _fsync_dir(final.parent)
            _fsync_dir(self.objects)
        except OSError as e:
            if e.errno in FULL_ERRNOS:
                raise storage_full(self.root, "writing the adapter's files", e) from None
            raise
        finally:
            if work.exists():
                shutil.rmtree(work, ignore_errors=True)
        return final

    def touch(self, digest: str) -> None:
        try:
            os.utime(self.path(digest))
        except FileNotFoundError:
            pass

    def age(self, digest: str) -> float:
        """Seconds since the object was written or last published again (0 when it is missing)."""
        try:
            return max(0.0, time.time() - os.stat(self.path(digest)).st_mtime)
        except FileNotFoundError:
            return 0.0

    def read(self, digest: str) -> tuple[bytes, bytes]:
        """(config bytes, weights bytes) of an object; raises OSError when missing."""
        p = self.path(digest)
        return (p / CONFIG_NAME).read_bytes(), (p / WEIGHTS_NAME).read_bytes()

    def remove(self, digest: str) -> None:
        """Drop an object: renamed into tmp first, so a crash never leaves a half-deleted one."""
        p = self.path(digest)
        if not p.exists():
            return
        grave = self.tmp / f"del-{uuid.uuid4().hex}"
        try:
            os.rename(p, grave)
        except FileNotFoundError:
            return  # another replica removed it first
        _fsync_dir(p.parent)
        shutil.rmtree(grave, ignore_errors=True)

    def digests(self) -> Iterable[str]:
        for shard in self.objects.iterdir():
            if shard.is_dir():
                for obj in shard.iterdir():
                    yield obj.name

    def sweep_temp(self, min_age_s: float = 0.0) -> int:
        """Remove temp entries (unfinished publishes, half-removed objects) older than `min_age_s`."""
        removed = 0
        for entry in list(self.tmp.iterdir()):
            if min_age_s > 0 and _age(entry) < min_age_s:
                continue
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
            removed += 1
        return removed

    def sweep(self, referenced: set[str]) -> dict[str, int]:
        """Start-up cleanup of a folder one process owns: every temp dir and object no index row points at.

        A shared folder is never swept like this: `collector.ObjectCollector` removes what is unused there.
        """
        removed_tmp = self.sweep_temp()
        removed_obj = 0
        for shard in list(self.objects.iterdir()):
            if not shard.is_dir():
                shard.unlink(missing_ok=True)
                continue
            for obj in list(shard.iterdir()):
                if obj.name not in referenced:
                    shutil.rmtree(obj, ignore_errors=True) if obj.is_dir() else obj.unlink(missing_ok=True)
                    removed_obj += 1
        if removed_tmp or removed_obj:
            _fsync_dir(self.objects)
        return {"temp": removed_tmp, "orphan_objects": removed_obj}


def _age(path: Path) -> float:
    try:
        return max(0.0, time.time() - os.stat(path).st_mtime)
    except FileNotFoundError:
        return float("inf")
