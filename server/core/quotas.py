"""Per-tenant limits: a plain value both the API (request quotas) and the registry (storage quotas) read."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol


@dataclass(frozen=True)
class Quotas:
    """None means unlimited."""

    max_adapters: Optional[int] = None
    max_adapter_versions: Optional[int] = None
    max_concurrent_requests: Optional[int] = None
    max_tokens_per_minute: Optional[int] = None


class QuotaSource(Protocol):
    """Where the registry looks up a tenant's storage quotas (the API's tenant directory)."""

    def quotas_of(self, tenant: str) -> Quotas: ...
