"""Adapter ids as users write them: `name`, `name@N` or `name@latest`, always inside the caller's tenant.

Parsing yields an `AdapterSelector`: what a request asks for, which may still mean
"the latest version". Resolving it against the index (`Registry.resolve`) yields the
one identity the server passes on, `server.core.identity.AdapterVersion`: a concrete
version with its digest.

Names and tenants are checked against one strict pattern and are never used to build a
file path: on disk everything is addressed by content digest.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from server.core.errors import InvalidRequestError
from server.core.identity import version_ref

NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
MAX_VERSION = 2**31 - 1  # versions travel as int32 in the API


def check_name(name: str, field: str = "name") -> str:
    """Return `name` if it matches `[a-z0-9][a-z0-9._-]{0,63}`, else raise InvalidRequestError."""
    if not isinstance(name, str) or NAME_RE.fullmatch(name) is None:
        shown = name if isinstance(name, str) and len(name) <= 80 else f"{str(name)[:80]}..."
        raise InvalidRequestError(
            field, f"{shown!r} is not a valid {field}: use 1-64 characters of a-z, 0-9, '.', '_' "
            "or '-', starting with a letter or digit")
    return name


def check_tenant(tenant: str) -> str:
    return check_name(tenant, "tenant")


@dataclass(frozen=True)
class AdapterSelector:
    """A parsed adapter id, not yet resolved: `version` None means whichever version is latest."""

    name: str
    version: Optional[int] = None

    def __str__(self) -> str:
        return self.name if self.version is None else version_ref(self.name, self.version)


def parse_adapter_id(adapter_id: str, field: str = "adapter_id") -> AdapterSelector:
    """Parse `name`, `name@N` (N >= 1) or `name@latest`; anything else is InvalidRequestError."""
    if not isinstance(adapter_id, str) or not adapter_id:
        raise InvalidRequestError(field, "must be 'name', 'name@N' or 'name@latest'")
    name, sep, ver = adapter_id.partition("@")
    check_name(name, field)
    if not sep or ver == "latest":
        return AdapterSelector(name, None)
    if not ver.isascii() or not ver.isdigit() or ver.startswith("0") or len(ver) > 10:
        raise InvalidRequestError(field, f"{adapter_id[:100]!r}: the version after '@' must be a "
                                  "positive number or 'latest'")
    version = int(ver)
    if version > MAX_VERSION:
        raise InvalidRequestError(field, f"version {version} is out of range [1, {MAX_VERSION}]")
    return AdapterSelector(name, version)
