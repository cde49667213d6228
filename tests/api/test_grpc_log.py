"""grpc.aio's failed write after a client cancel or deadline is one info line, not an error with a traceback."""
from __future__ import annotations

import json
import logging
import sys

from server.api.grpc_log import GRPC_CORE_LOGGER, CallEndedWriteFilter, quiet_client_gone_writes


def _record(msg: str, *args: object) -> logging.LogRecord:
    try:
        raise RuntimeError("Failed \"execute_batch\": (<SendInitialMetadataOperation>, <SendMessageOperation>)")
    except RuntimeError:
        exc = sys.exc_info()
    return logging.LogRecord(GRPC_CORE_LOGGER, logging.ERROR, "server.pyx.pxi", 1, msg, args, exc)


def test_a_write_after_the_call_ended_is_one_info_line_naming_the_method():
    record = _record("ExecuteBatchError raised in core by servicer method [%s]",
                     "/loraserve.v1.Inference/GenerateStream")
    assert CallEndedWriteFilter().filter(record)
    assert record.levelno == logging.INFO and record.exc_info is None
    line = json.loads(record.getMessage())
    assert line["event"] == "write_after_call_ended" and line["method"] == "/loraserve.v1.Inference/GenerateStream"


def test_other_grpc_errors_keep_their_level_and_traceback():
    record = _record("Unexpected [%s] raised by servicer method [%s]", "KeyError", "/x/Y")
    assert CallEndedWriteFilter().filter(record)
    assert record.levelno == logging.ERROR and record.exc_info is not None


def test_installed_once():
    quiet_client_gone_writes()
    quiet_client_gone_writes()
    filters = logging.getLogger(GRPC_CORE_LOGGER).filters
    assert sum(isinstance(f, CallEndedWriteFilter) for f in filters) == 1
