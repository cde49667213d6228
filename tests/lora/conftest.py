"""Interpreter-only kernel cases run in a TRITON_INTERPRET=1 child process, not beside it."""
from __future__ import annotations

import os


def pytest_collection_modifyitems(config, items):
    if os.environ.get("TRITON_INTERPRET") == "1":
        return
    keep = [i for i in items if i.get_closest_marker("interpreter_child") is None]
    dropped = [i for i in items if i.get_closest_marker("interpreter_child") is not None]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep
