"""What the registry needs from an index, whichever database keeps it.

Two implementations: `index.Index` (SQLite in the registry directory: one process, the
embedded default) and `pg_index.PgIndex` (PostgreSQL: every replica of a fleet shares it).
Both allocate a version number and insert its row in one transaction, never reuse version
numbers, and raise `UnavailableError` when the database cannot be reached.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol

from server.core.errors import QuotaExceededError

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def adapters_quota_error(tenant: str, limit: int) -> QuotaExceededError:
    """The refusal of a new adapter name past the tenant's `max_adapters` (the registry's early check and
    both indexes' atomic one say the same)."""
    return QuotaExceededError(f"tenant {tenant!r} is at its quota of {limit} stored adapters (max_adapters); "
                              "delete one first")


def versions_quota_error(tenant: str, limit: int) -> QuotaExceededError:
    """The refusal of one more version past the tenant's `max_adapter_versions`."""
    return QuotaExceededError(f"tenant {tenant!r} is at its quota of {limit} stored adapter versions "
                              "(max_adapter_versions); delete old versions first")


def is_index_url(location: object) -> bool:
    """True when `--registry` names a PostgreSQL database rather than a local directory."""
    return isinstance(location, str) and location.startswith(POSTGRES_SCHEMES)


@dataclass(frozen=True)
class VersionRow:
    """One row of `versions`; the registry turns it into the shared `AdapterVersion` identity."""

    tenant: str
    name: str
    version: int
    digest: str
    base_fingerprint: str
    rank: int
    targets: tuple[str, ...]
    size_bytes: int
    created_at: float
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Change:
    """One committed publish or delete, as other replicas hear of it."""

    op: str                      # "publish" | "delete"
    tenant: str
    name: str
    versions: tuple[int, ...]
    seq: int = 0                 # the index's change counter when it committed (0: not known)


class IndexBackend(Protocol):
    """The index interface `Registry` uses; see the module docstring."""

    #: True when other processes write the same index (and objects folder) concurrently:
    #: no single-writer lock, objects are removed only after a grace period.
    shared: bool

    def describe(self) -> str:
        """Where the index lives, for logs and error messages (never a password)."""
        ...

    def publish(self, tenant: str, name: str, digest: str, base_fingerprint: str, rank: int,
                targets: tuple[str, ...], size_bytes: int, metadata: dict[str, str],
                max_names: Optional[int] = None, max_versions: Optional[int] = None,
                ensure_object: Optional[Callable[[], None]] = None) -> VersionRow:
        """Allocate the next version of `name` and insert its row in one transaction.

        `ensure_object` runs inside that transaction while object removal of `digest` is
        held off, so a row is never committed for an object a collector removed meanwhile.
        """
        ...

    def get_version(self, tenant: str, name: str, version: Optional[int]) -> Optional[VersionRow]:
        """One version, or the latest one when `version` is None."""
        ...

    def versions(self, tenant: str, name: Optional[str] = None) -> list[VersionRow]:
        """Live versions of one name (or of every name), oldest first."""
        ...

    def delete(self, tenant: str, name: str, versions: list[int]) -> list[int]:
        """Delete these versions; returns those that existed."""
        ...

    def digest_referenced(self, digest: str) -> bool: ...

    def all_digests(self) -> set[str]: ...

    def count_versions(self, tenant: Optional[str] = None) -> int: ...

    def released_at(self, digest: str) -> Optional[float]:
        """When the last row pointing at `digest` was deleted (None: unknown or never)."""
        ...

    def removal_guard(self, digest: str) -> AbstractContextManager[bool]:
        """Hold off publishes of `digest` while its object is removed; yields False when one is under way."""
        ...

    def close(self) -> None: ...
