"""Terminal output for the client commands: aligned tables, human sizes and times, or JSON for scripts.

Generic on purpose (no adapter knowledge here): `adapter_views` says what goes in the columns,
this module only decides how a row of strings looks on a terminal.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterable, Sequence

from google.protobuf import json_format
from google.protobuf.message import Message

OUTPUT_FORMATS = ("table", "wide", "json")
GAP = "   "  # between columns, as kubectl does
EMPTY = "-"  # a cell with nothing to say, so columns never look shifted


def add_output_flags(p: argparse.ArgumentParser) -> None:
    """`-o table|wide|json` (table by default) and `--json`, kubectl's and docker's spelling of the same choice."""
    p.add_argument("-o", "--output", choices=OUTPUT_FORMATS, default="table",
                   help="table (default), wide (tables with more columns) or json (the full record, "
                        "for scripts)")
    p.add_argument("--json", dest="output", action="store_const", const="json", help="same as -o json")


@dataclass(frozen=True)
class Column:
    header: str
    right: bool = False  # numbers and sizes line up on their last digit


def table(columns: Sequence[Column], rows: Iterable[Sequence[str]]) -> str:
    """One header row and one line per row, each column as wide as its widest cell; no trailing spaces."""
    cells = [[c.header for c in columns]] + [[str(v) if v != "" else EMPTY for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = []
    for r in cells:
        parts = [v.rjust(w) if c.right else v.ljust(w) for v, w, c in zip(r, widths, columns)]
        lines.append(GAP.join(parts).rstrip())
    return "\n".join(lines)


def human_size(n: int) -> str:
    """Bytes in binary units with one decimal (12.0 MiB); plain bytes below 1 KiB."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}"


def timestamp(seconds: float) -> str:
    """A point in time to the minute, in UTC so two operators' outputs compare ('2025-03-01 14:05Z')."""
    if seconds <= 0:
        return EMPTY
    return datetime.fromtimestamp(seconds, tz=timezone.utc).strftime("%Y-%m-%d %H:%MZ")


def short_list(items: Sequence[str], max_chars: int = 20) -> str:
    """Comma-joined, cut before `max_chars` with a count of the rest ('q,k,v,o,gate,+2'); never cuts an item."""
    if not items:
        return EMPTY
    full = ",".join(items)
    if len(full) <= max_chars:
        return full
    for keep in range(len(items) - 1, 1, -1):
        cut = ",".join(items[:keep]) + f",+{len(items) - keep}"
        if len(cut) <= max_chars:
            return cut
    return f"{items[0]},+{len(items) - 1}"


def record_dict(msg: Message) -> dict[str, Any]:
    """A proto record as the JSON object scripts read (proto field names, standard proto3 JSON mapping)."""
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


def print_json(msg: Message) -> None:
    print(json.dumps(record_dict(msg), indent=2))
