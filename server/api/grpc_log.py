"""gRPC's own log lines that describe a client, not a fault: said in one line, not as an error with a traceback.

grpc.aio writes each streamed message with a batch in gRPC core. When the client cancels, or its deadline
passes, while such a write is under way, core fails the batch; grpc.aio ignores that failure when it already
knows the client has gone, but the cancellation notice and the failed write race, and when the write loses
it logs `ExecuteBatchError raised in core by servicer method [...]` at ERROR with a traceback (grpc/grpc#32551).
Nothing is wrong on our side: the request was already cancelled (its engine request aborted, KV blocks and
slot freed). The soak met it once in about 12,000 cancelled or expired streams.
"""
from __future__ import annotations

import json
import logging
import re

GRPC_CORE_LOGGER = "grpc._cython.cygrpc"
_WRITE_AFTER_END = re.compile(r"ExecuteBatchError raised in core by servicer method \[(?P<method>[^\]]*)\]")


class CallEndedWriteFilter(logging.Filter):
    """Rewrites grpc.aio's failed-write-after-cancel record into one info line naming the method."""

    def filter(self, record: logging.LogRecord) -> bool:
        m = _WRITE_AFTER_END.search(record.getMessage())
        if m is not None:
            record.msg = json.dumps({"event": "write_after_call_ended", "method": m.group("method"),
                                     "note": "the client cancelled or its deadline passed during a write"})
            record.args = ()
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.exc_info, record.exc_text = None, None
        return True


def quiet_client_gone_writes() -> None:
    """Install the filter once on gRPC's core logger."""
    logger = logging.getLogger(GRPC_CORE_LOGGER)
    if not any(isinstance(f, CallEndedWriteFilter) for f in logger.filters):
        logger.addFilter(CallEndedWriteFilter())
