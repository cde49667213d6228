"""HTTP error responses: typed errors through `server.api.errors.http_error_for`, pydantic errors as 400s.

Every refusal names the field to fix (`param`), in OpenAI's error shape; 401 carries
`WWW-Authenticate`, 429 and 503 a `Retry-After` (the openai client honours it).
"""
from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse
from pydantic import ValidationError

from server.api.errors import HttpError, http_error_for
from server.core.errors import InvalidRequestError

_BRANCHES = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false",
             "list[int]": "an array of token ids", "list[str]": "an array of strings",
             "list[list[int]]": "an array of token-id arrays", "list[TextPart]": "an array of text parts"}
_RETRY_AFTER_S = "1"


def respond(err: HttpError) -> JSONResponse:
    headers = {}
    if err.status in (429, 503):
        headers["Retry-After"] = _RETRY_AFTER_S
    if err.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def error_response(exc: BaseException) -> JSONResponse:
    """The response for any exception (unknown ones: 500 with an incident id; traceback in the log)."""
    return respond(http_error_for(exc))


def _is_branch(part: Any) -> bool:
    return isinstance(part, str) and (part in _BRANCHES or "[" in part)


def validation_error(e: ValidationError) -> InvalidRequestError:
    """The first problem of a body pydantic refused, as an error naming the field (dotted path)."""
    errors = e.errors(include_url=False)
    first = errors[0]
    loc = list(first["loc"])
    if first["type"] == "json_invalid":
        return InvalidRequestError("body", f"is not valid JSON ({first['msg'].removeprefix('Invalid JSON: ')})")
    if not loc:
        return InvalidRequestError("body", "must be a JSON object")
    cut = next((i for i, part in enumerate(loc) if _is_branch(part)), None)
    if cut is not None:  # a union field: say which shapes it takes
        prefix = loc[:cut]
        shapes = []
        for err in errors:
            el = list(err["loc"])
            if el[:cut] == prefix and len(el) > cut and el[cut] not in shapes:
                shapes.append(el[cut])
        field = ".".join(str(p) for p in prefix)
        return InvalidRequestError(field, "must be " + " or ".join(_BRANCHES.get(s, s) for s in shapes))
    field = ".".join(str(p) for p in loc)
    if first["type"] == "extra_forbidden":
        return InvalidRequestError(field, "is not a field of this request (unknown fields are refused, not ignored)")
    if first["type"] == "missing":
        return InvalidRequestError(field, "is required")
    return InvalidRequestError(field, f"{first['msg']} (got {first.get('input')!r:.80})")
