"""Every failure as OpenAI's error body, `{"error": {"message", "type", "param", "code"}}`.

Why one module: clients (the openai SDK, editor plugins) branch on the status code and read `param`
to tell the user which field was wrong, so the mapping from our typed errors to HTTP must be one
table, not decided route by route. The rules:
- 400 for anything the client can fix, naming the field in `param` where we know it. FastAPI's 422
  never reaches a client: OpenAI answers 400 for bad bodies and SDKs expect that.
- 429 (engine queue full) and 503 (engine/backends down) carry `Retry-After` in whole seconds, at
  least 1, so well-behaved clients back off instead of hammering a struggling replica.
- 500 only for bugs, with a generic message: the exception text may quote the request (the code
  people send is theirs) and a traceback tells an attacker about us. It is logged server-side as
  the exception type plus stack frames, never its message.
"""
from __future__ import annotations

import logging
import math
import traceback
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from serve_app.engine import (EngineOverloadedError, EngineStepError, EngineStoppedError, RequestRejectedError,
                              SamplingParamsError)
from serve_app.tokenizer import PromptError

log = logging.getLogger(__name__)

# How much of an offending value an error message quotes: enough to recognise it, never a whole prompt.
_MAX_QUOTED_CHARS = 80


class BackendUnavailableError(Exception):
    """The engine or the backends it needs (expert shards) cannot serve now; retry later.

    Raised by an `EngineClient` (see api/client.py); mapped to 503 with Retry-After."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(eq=False)   # exceptions compare (and hash) by identity
class ApiError(Exception):
    """An error response: HTTP status plus OpenAI's error object (and headers such as Retry-After)."""
    status: int                                   # HTTP status code
    message: str                                  # human-readable, names the offending value
    type: str = "invalid_request_error"           # OpenAI's error "type"
    param: str | None = None                      # the request field at fault, e.g. "temperature"
    code: str | None = None                       # machine-readable reason, e.g. "model_not_found"
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def retry_after_header(seconds: float) -> dict[str, str]:
    """Retry-After must be an integer number of seconds (RFC 9110); round up, and never 0."""
    value = seconds if isinstance(seconds, (int, float)) and math.isfinite(seconds) else 1.0
    return {"Retry-After": str(max(1, math.ceil(value)))}


def quote(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_QUOTED_CHARS else text[:_MAX_QUOTED_CHARS] + "..."


def loc_to_param(loc: tuple[int | str, ...]) -> str | None:
    """pydantic's ("messages", 0, "role") → OpenAI's "messages[0].role"."""
    param = ""
    for part in loc:
        if isinstance(part, int):
            param += f"[{part}]"
        else:
            param += f".{part}" if param else str(part)
    return param or None


def from_validation_error(exc: ValidationError, aliases: dict[str, str] | None = None) -> ApiError:
    """The first pydantic error, with its location as `param` (what OpenAI does: one error at a time)."""
    first = exc.errors(include_url=False)[0]
    param = loc_to_param(tuple(first["loc"]))
    if param is not None and aliases:
        param = aliases.get(param, param)
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        return bad_request(f"unrecognized request argument supplied: {param}", param, "unknown_parameter")
    if first["type"] == "missing":
        return bad_request(f"missing required parameter: {param}", param, "missing_required_parameter")
    where = f"'{param}'" if param else "the request body"
    got = f" (got {quote(first['input'])})" if "input" in first else ""
    return bad_request(f"invalid value for {where}: {msg}{got}", param, "invalid_value")


def from_exception(exc: BaseException, aliases: dict[str, str] | None = None) -> ApiError:
    """Map anything raised while serving a request to its response; unknown exceptions are bugs (500).

    `aliases` renames engine field names to what this endpoint's client sent (chat's
    `max_completion_tokens`, `top_logprobs`), so `param` names a field the client knows."""
    aliases = aliases or {}
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ValidationError):
        return from_validation_error(exc, aliases)
    if isinstance(exc, SamplingParamsError):
        return bad_request(str(exc), aliases.get(exc.param, exc.param), "invalid_value")
    if isinstance(exc, RequestRejectedError):
        return bad_request(str(exc), exc.param, "request_rejected")
    if isinstance(exc, PromptError):
        return bad_request(str(exc), None, "invalid_prompt")
    if isinstance(exc, EngineOverloadedError):
        return ApiError(429, f"the server is overloaded, retry later: {exc}", type="rate_limit_error",
                        code="engine_overloaded", headers=retry_after_header(exc.retry_after_s))
    if isinstance(exc, (EngineStepError, EngineStoppedError)):
        exc = BackendUnavailableError(str(exc))
    if isinstance(exc, BackendUnavailableError):
        return ApiError(503, f"the model backend is unavailable, retry later: {exc}", type="server_error",
                        code="backend_unavailable", headers=retry_after_header(exc.retry_after_s))
    return internal_error(exc)


def internal_error(exc: BaseException) -> ApiError:
    log_bug(exc)
    return ApiError(500, "the server had an error while processing your request", type="server_error",
                    code="internal_error")


def log_bug(exc: BaseException) -> None:
    # Type and frames only: str(exc) may quote prompt text, which must not reach logs.
    frames = "".join(traceback.format_tb(exc.__traceback__))
    log.error("unhandled %s while serving a request\n%s", type(exc).__name__, frames)
