"""Audit lines: one JSON log line per admin action (register, delete, load/pin, unload), whatever its outcome.

They go to the `loraserve.audit` logger, so an operator can route them to their own sink, and carry:
action, tenant (acted on), caller (the authenticated tenant; differs for an admin acting for another),
adapter, version, digest, outcome (the gRPC status name) and, for a refusal, its message and the peer.
API keys never appear: the caller is named by its tenant.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Optional
from contextlib import contextmanager

from server.api.errors import code_for
from server.core.errors import LoraServeError

log = logging.getLogger("loraserve.audit")

ACTIONS = ("register", "delete", "load", "pin", "unload")


@dataclass
class AuditRecord:
    action: str
    tenant: str = ""
    caller: str = ""
    adapter: str = ""
    version: Any = None   # an int, or the list of versions a delete removed
    digest: Any = None    # a sha256 hex, or the list a delete removed
    outcome: str = ""
    message: str = ""
    peer: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        out = {"event": "audit", **{k: v for k, v in asdict(self).items() if k != "extra" and v not in ("", None)},
               **self.extra}
        return json.dumps(out, default=str)


@contextmanager
def audited(record: AuditRecord) -> Iterator[AuditRecord]:
    """Fill `record` inside the block; one line is logged on the way out, OK or the error's status."""
    try:
        yield record
    except BaseException as e:
        record.outcome = code_for(e).name if isinstance(e, Exception) else "CANCELLED"
        # Our errors say what the user must fix; anything else is a bug whose text stays in the server log.
        record.message = str(e)[:300] if isinstance(e, LoraServeError) else type(e).__name__
        log.info(record.line())
        raise
    record.outcome = "OK"
    log.info(record.line())


def peer_of(context: Optional[Any]) -> str:
    try:
        return str(context.peer()) if context is not None else ""
    except Exception:  # noqa: BLE001 - a peer is a nicety in an audit line
        return ""
