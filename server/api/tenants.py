"""Tenants, their API keys (stored only as sha256 hashes), roles and quotas.

`--tenants FILE.toml`:

    [tenants.acme]
    api_keys = ["sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"]
    role = "user"                 # or "admin": may act for any tenant
    max_adapters = 100            # adapter names stored
    max_adapter_versions = 1000   # versions stored, all names together
    max_concurrent_requests = 16
    max_tokens_per_minute = 200000   # prompt + generated tokens, sliding 60 s window

A missing quota means unlimited. Hash a key with
`python -c "import hashlib,sys; print('sha256:' + hashlib.sha256(sys.argv[1].encode()).hexdigest())" KEY`.
Without a tenants file the server runs open, as one tenant (`OPEN_TENANT`) with admin rights.
"""
from __future__ import annotations

import hashlib
import hmac
import re
import sys
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from server.core.quotas import Quotas
from server.core.errors import AuthenticationError, InvalidRequestError, QuotaExceededError

from adapter_registry.ids import check_tenant

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

OPEN_TENANT = "default"
ROLE_USER = "user"
ROLE_ADMIN = "admin"
_HASH_RE = re.compile(r"(?:sha256:)?([0-9a-f]{64})")
_QUOTA_KEYS = ("max_adapters", "max_adapter_versions", "max_concurrent_requests", "max_tokens_per_minute")
_HASH_HINT = ("store keys as sha256 hashes: python -c \"import hashlib,sys; "
              "print('sha256:' + hashlib.sha256(sys.argv[1].encode()).hexdigest())\" KEY")


@dataclass(frozen=True)
class Tenant:
    name: str
    role: str = ROLE_USER
    quotas: Quotas = field(default_factory=Quotas)

    @property
    def is_admin(self) -> bool:
        return self.role == ROLE_ADMIN


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


class TenantDirectory:
    """Who a key belongs to. `open` is the no-tenants-file mode: everyone is the admin default tenant."""

    def __init__(self, tenants: dict[str, Tenant], key_hashes: dict[str, str], open_mode: bool = False):
        self.tenants = tenants
        self._by_hash = key_hashes  # sha256 hex -> tenant name
        self._hashes = tuple((h.encode("ascii"), name) for h, name in key_hashes.items())
        self.open_mode = open_mode

    @classmethod
    def open(cls) -> "TenantDirectory":
        return cls({OPEN_TENANT: Tenant(OPEN_TENANT, ROLE_ADMIN)}, {}, open_mode=True)

    @classmethod
    def from_toml(cls, path: Path) -> "TenantDirectory":
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise InvalidRequestError("tenants", f"{path}: cannot be read as TOML ({e})") from None
        return cls.from_dict(data, str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "tenants file") -> "TenantDirectory":
        section = data.get("tenants")
        unknown_top = set(data) - {"tenants"}
        if unknown_top:
            raise InvalidRequestError("tenants", f"{source}: unknown top-level keys {sorted(unknown_top)}")
        if not isinstance(section, dict) or not section:
            raise InvalidRequestError("tenants", f"{source}: needs at least one [tenants.NAME] table")
        tenants: dict[str, Tenant] = {}
        by_hash: dict[str, str] = {}
        for name, t in section.items():
            where = f"{source}: [tenants.{name}]"
            try:
                check_tenant(name)
            except InvalidRequestError as e:
                raise InvalidRequestError("tenants", f"{where}: {e}") from None
            if not isinstance(t, dict):
                raise InvalidRequestError("tenants", f"{where} must be a table")
            unknown = set(t) - {"api_keys", "role", *_QUOTA_KEYS}
            if unknown:
                raise InvalidRequestError("tenants", f"{where}: unknown keys {sorted(unknown)}")
            role = t.get("role", ROLE_USER)
            if role not in (ROLE_USER, ROLE_ADMIN):
                raise InvalidRequestError("tenants", f"{where}: role must be 'user' or 'admin', not {role!r}")
            keys = t.get("api_keys", [])
            if not isinstance(keys, list) or not keys:
                raise InvalidRequestError("tenants", f"{where}: api_keys must be a non-empty list of sha256 hashes")
            for k in keys:
                m = _HASH_RE.fullmatch(k) if isinstance(k, str) else None
                if m is None:
                    raise InvalidRequestError("tenants", f"{where}: an api_keys entry is not a sha256 hash "
                                              f"(plain keys are never stored); {_HASH_HINT}")
                if m.group(1) in by_hash:
                    raise InvalidRequestError("tenants", f"{where}: an API key hash is listed twice "
                                              f"(also under {by_hash[m.group(1)]!r})")
                by_hash[m.group(1)] = name
            quotas = {}
            for q in _QUOTA_KEYS:
                v = t.get(q)
                if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                    raise InvalidRequestError("tenants", f"{where}: {q} must be a non-negative integer")
                quotas[q] = v
            tenants[name] = Tenant(name, role, Quotas(**quotas))
        return cls(tenants, by_hash)

    def authenticate(self, api_key: Optional[str]) -> Tenant:
        """The tenant owning `api_key`; AuthenticationError when missing or wrong."""
        if self.open_mode:
            return self.tenants[OPEN_TENANT]
        if not api_key:
            raise AuthenticationError("missing API key: send the metadata 'authorization: Bearer KEY'")
        digest = hash_key(api_key).encode("ascii")
        name = None
        # Every stored hash is compared in constant time and none ends the loop early: how long this
        # takes says nothing about which hash (or how much of one) matched.
        for stored, owner in self._hashes:
            if hmac.compare_digest(stored, digest):
                name = owner
        if name is None:
            raise AuthenticationError("invalid API key")
        return self.tenants[name]

    def quotas_of(self, name: str) -> Quotas:
        """The registry's view of a tenant: its storage quotas (none for an unknown name)."""
        t = self.tenants.get(name)
        return t.quotas if t is not None else Quotas()

    def get(self, name: str) -> Optional[Tenant]:
        return self.tenants.get(name)


class QuotaTracker:
    """Live per-tenant counters: concurrent requests and tokens in the last 60 seconds."""

    WINDOW_S = 60.0

    def __init__(self, clock=time.monotonic):
        self._lock = threading.Lock()
        self._running: dict[str, int] = {}
        self._tokens: dict[str, deque[tuple[float, int]]] = {}
        self._clock = clock

    def _window_sum(self, tenant: str, now: float) -> int:
        q = self._tokens.get(tenant)
        if not q:
            return 0
        while q and q[0][0] <= now - self.WINDOW_S:
            q.popleft()
        return sum(n for _, n in q)

    @contextmanager
    def request(self, tenant: Tenant) -> Iterator[None]:
        """Hold one concurrent-request slot for the duration; refuse when a quota is used up."""
        q = tenant.quotas
        with self._lock:
            running = self._running.get(tenant.name, 0)
            if q.max_concurrent_requests is not None and running >= q.max_concurrent_requests:
                raise QuotaExceededError(
                    f"tenant {tenant.name!r} is at its quota of {q.max_concurrent_requests} concurrent "
                    "requests (max_concurrent_requests)")
            if q.max_tokens_per_minute is not None:
                used = self._window_sum(tenant.name, self._clock())
                if used >= q.max_tokens_per_minute:
                    raise QuotaExceededError(
                        f"tenant {tenant.name!r} used {used} tokens in the last minute, its quota is "
                        f"{q.max_tokens_per_minute} (max_tokens_per_minute)")
            self._running[tenant.name] = running + 1
        try:
            yield
        finally:
            with self._lock:
                self._running[tenant.name] -= 1

    def charge(self, tenant: str, tokens: int) -> None:
        if tokens > 0:
            with self._lock:
                self._tokens.setdefault(tenant, deque()).append((self._clock(), int(tokens)))

    def running(self, tenant: str) -> int:
        with self._lock:
            return self._running.get(tenant, 0)

    def tokens_last_minute(self, tenant: str) -> int:
        with self._lock:
            return self._window_sum(tenant, self._clock())
