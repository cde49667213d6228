"""Typed errors raised anywhere in loraserve.

No module below `server/api/` knows about gRPC: each error carries what a user
must fix, and `server/api/errors.py` maps the classes to status codes in one place.
"""
from __future__ import annotations


class LoraServeError(Exception):
    """Base of every error we raise on purpose; anything else is a bug (INTERNAL)."""


class InvalidRequestError(LoraServeError):
    """The request itself is wrong: a field out of range, a prompt too long."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class AdapterNotFoundError(LoraServeError):
    """No adapter by that id is visible to the caller.

    The message is the same whether the adapter does not exist or belongs to
    another tenant, so a tenant cannot learn of another tenant's adapters.
    """

    def __init__(self, adapter_id: str):
        super().__init__(f"adapter {adapter_id!r} not found")
        self.adapter_id = adapter_id


class AdapterRejectedError(LoraServeError):
    """An adapter that cannot be served exactly (unsupported feature, bad file, wrong base)."""


class AdapterInUseError(LoraServeError):
    """An operation that would pull an adapter from under pinned or running work."""


class AdapterLoadError(LoraServeError):
    """An adapter that is registered but could not be brought onto the device."""


class CapacityError(LoraServeError):
    """The server is full (waiting queue, slots): retry later."""


class StorageFullError(CapacityError):
    """The disk under the registry is full (or over its quota): nothing was stored; retry once space is freed."""


class QuotaExceededError(LoraServeError):
    """A tenant is over one of its quotas; the message names the limit."""


class UnavailableError(LoraServeError):
    """The server is starting or draining and takes no new work."""


class AuthenticationError(LoraServeError):
    """Missing or wrong credentials."""


class PermissionDeniedError(LoraServeError):
    """Valid credentials without the right to do this."""


class StartupError(UnavailableError):
    """The server cannot start as configured: a port another process holds, an address not this machine's (it ends
    start-up with exit code 2 before any call is taken)."""
