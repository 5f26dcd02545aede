"""Reading a request body safely: size limit first, then UTF-8, then JSON, then a JSON object.

Why not FastAPI's body parameters: they read the whole body before any limit applies and answer
422 in their own shape. Here a `Content-Length` over the limit is refused before a byte is read,
and a body that lies about its length (or is chunked) is cut off as soon as it passes the limit,
so a client cannot make a replica buffer gigabytes. Parsing errors are 400 in OpenAI's shape.
"""
from __future__ import annotations

import asyncio
import json
import re
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from starlette.requests import ClientDisconnect, Request

from serve_app.api.errors import ApiError, bad_request, from_validation_error

M = TypeVar("M", bound=BaseModel)

# What we accept as JSON. No Content-Type at all is accepted too: curl users forget it, and the
# body is still parsed as JSON; an explicit other type is almost always a client bug (form posts).
_JSON_TYPES = ("application/json",)
# \uD800-\uDFFF written as a JSON escape; a valid pair decodes to one character, a lone one does not.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


async def read_model(request: Request, model: type[M], max_bytes: int, timeout_s: float | None = None) -> M:
    """The body validated as `model` (pydantic errors → a 400 naming the field)."""
    body = await read_json_object(request, max_bytes, timeout_s)
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise from_validation_error(exc) from exc


async def read_json_object(request: Request, max_bytes: int, timeout_s: float | None = None) -> dict[str, Any]:
    """The body as a JSON object; a body still arriving after `timeout_s` is a 408 (the request's
    deadline starts only once the body is read, so a client trickling bytes would otherwise hold a
    connection and a task forever)."""
    _check_content_type(request.headers.get("content-type"))
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise bad_request(f"invalid Content-Length header {declared[:40]!r}", code="invalid_header")
        if int(declared) > max_bytes:
            raise too_large(int(declared), max_bytes)
    try:
        raw = await asyncio.wait_for(_read_limited(request, max_bytes), timeout_s)
    except asyncio.TimeoutError:
        raise body_timeout(timeout_s) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad_request(f"the request body is not valid UTF-8 (byte {exc.start})", code="invalid_encoding") from exc
    try:
        body = json.loads(text)
    except json.JSONDecodeError as exc:
        raise bad_request(f"the request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
                          code="invalid_json") from exc
    except RecursionError as exc:        # thousands of nested [ or {: no API body is like that
        raise bad_request("the request body is nested too deeply", code="invalid_json") from exc
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got a JSON {type(body).__name__}",
                          code="invalid_json")
    _check_depth(body, MAX_DEPTH)
    _check_encodable(text, body)
    return body


# The deepest body the API defines is 4 levels (chat content parts); 32 leaves room for clients'
# extra fields and stays far below what validation (pydantic, recursive) or json.dumps can take.
MAX_DEPTH = 32


def _check_depth(value: Any, limit: int) -> None:
    """400 when containers nest deeper than ``limit`` (iterative: a deep body cannot overflow this)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            raise bad_request(f"the request body nests deeper than {limit} levels", code="invalid_json")
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values() if isinstance(v, (dict, list)))
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item if isinstance(v, (dict, list)))


def _check_encodable(text: str, body: dict) -> None:
    """400 for a lone UTF-16 surrogate escape (``"\\ud800"``): JSON allows it, but the string is not
    Unicode text; tokenizers and every later ``encode`` would fail on it (a 500 before this)."""
    if _SURROGATE_ESCAPE.search(text) is None:
        return                           # no surrogate escape at all: the common case costs one scan
    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise bad_request("the request body holds a lone UTF-16 surrogate escape (e.g. \\ud800 without its "
                          "pair), which is not valid Unicode text", code="invalid_encoding") from exc


def _check_content_type(content_type: str | None) -> None:
    if content_type is None:
        return
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type not in _JSON_TYPES and not media_type.endswith("+json"):
        raise ApiError(415, f"Content-Type must be application/json, got {content_type[:60]!r}",
                       code="unsupported_media_type")


async def _read_limited(request: Request, max_bytes: int) -> bytes:
    buf = bytearray()
    try:
        async for chunk in request.stream():
            buf += chunk
            if len(buf) > max_bytes:
                raise too_large(len(buf), max_bytes, at_least=True)
    except ClientDisconnect as exc:
        # Nobody will read this answer; it only ends the request cleanly.
        raise bad_request("the client disconnected while sending the body", code="client_disconnected") from exc
    return bytes(buf)


def body_timeout(timeout_s: float) -> ApiError:
    return ApiError(408, f"the request body did not arrive within {timeout_s:g} s", type="timeout_error",
                    code="request_timeout")


def too_large(size: int, limit: int, at_least: bool = False) -> ApiError:
    size_text = f"at least {size}" if at_least else str(size)
    return ApiError(413, f"the request body is {size_text} bytes; the limit is {limit} bytes",
                    code="request_too_large")
