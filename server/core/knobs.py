"""How a setting is declared and checked, for both config sections.

A knob is a dataclass field whose metadata carries everything said about it once:
its help text (the `--help` line), its allowed choices or range, and a flag name
where it differs from the field's. `server.core.config` turns the fields into
flags, environment variables and TOML keys; `check` is the one validation of
choices and ranges, run when a section is constructed.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

from server.core.errors import InvalidRequestError


def knob(default: Any = dataclasses.MISSING, *, help: str, choices: Sequence[str] = (),  # noqa: A002
         lo: Optional[float] = None, hi: Optional[float] = None, flag: Optional[str] = None,
         default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with its help, choices (`choices`) or inclusive range (`lo`, `hi`) in its metadata."""
    meta: dict[str, Any] = {"help": help}
    if choices:
        meta["choices"] = tuple(choices)
    if lo is not None:
        meta["lo"] = lo
    if hi is not None:
        meta["hi"] = hi
    if flag is not None:
        meta["flag"] = flag
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def check(section: Any, name: str) -> None:
    """Refuse the first field of `section` (a dataclass instance called `name`) outside its choices or range."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        where = f"{name}.{f.name}"
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise InvalidRequestError(where, f"{value!r}: choose one of {', '.join(choices)}")
        lo, hi = f.metadata.get("lo"), f.metadata.get("hi")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            bound = (f"allowed range is [{lo}, {hi}]" if lo is not None and hi is not None
                     else f"must be >= {lo}" if lo is not None else f"must be <= {hi}")
            raise InvalidRequestError(where, f"is {value}; {bound}")
