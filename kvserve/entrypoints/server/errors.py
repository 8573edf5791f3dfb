"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` with a 4xx/5xx status.

Every way a request can fail ends here, so a client mistake is never a 500 and FastAPI's 422
never leaks out.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvserve.engine.async_engine import EngineDeadError, EngineOverloadedError, EngineStepError
from kvserve.entrypoints.server.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


MAX_ECHO_CHARS = 200  # longest piece of user input an error message quotes
MAX_ERROR_BODY_BYTES = 4096  # no error body is larger (messages are cut to fit)
_MAX_MESSAGE_CHARS = 1000
_MAX_PARAM_CHARS = 100


def clip(value: Any, limit: int = MAX_ECHO_CHARS) -> str:
    """`value` as text for an error message, cut to `limit` characters (user input can be huge)."""
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class APIError(Exception):
    """Raise from a handler to answer with an OpenAI error body (never over 4 KB: the message
    and `param` are cut to fit, since they may quote user input)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = clip(message, _MAX_MESSAGE_CHARS)
        self.param = None if param is None else clip(param, _MAX_PARAM_CHARS)
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        message = self.message
        while True:
            info = ErrorInfo(message=message, type=self.type, param=self.param, code=self.code)
            body = ErrorResponse(error=info).model_dump()
            if len(message) <= 16 or len(json.dumps(body).encode()) <= MAX_ERROR_BODY_BYTES:
                return body
            message = message[: len(message) // 2] + "..."  # escapes made it too long

    def response(self) -> JSONResponse:
        headers = dict(self.headers)
        if self.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return JSONResponse(self.body(), status_code=self.status, headers=headers or None)

    def sse(self) -> str:
        """The error as a server-sent event (once a stream has started, the status is 200)."""
        return f"data: {json.dumps(self.body())}\n\n"


def overloaded(metrics: Any, exc: EngineOverloadedError) -> APIError:
    """429 with Retry-After for a request the engine would not queue (and count it)."""
    metrics.count_rejected(exc.reason)
    return APIError(429, str(exc), code=exc.reason, headers={"Retry-After": str(exc.retry_after)})


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


_FIELD_RE = re.compile(r"^([a-z_]+)(?:\[\d+\])?(?:\.\w+)* (?:must|is|cannot)")


def from_value_error(e: ValueError, default_param: str | None = None) -> APIError:
    """A ValueError from SamplingParams / the engine / the chat template -> 400. Their messages
    start with the field name ("top_p must be in (0, 1] ..."), which becomes `param`."""
    msg = str(e) or type(e).__name__
    m = _FIELD_RE.match(msg)
    return bad_request(msg, param=m.group(1) if m else default_param)


def from_validation_error(e: ValidationError | RequestValidationError) -> APIError:
    errors = e.errors()
    if not errors:
        return bad_request("invalid request")
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
    # Union members show up as extra loc parts ("str", "list[int]"): keep the field path only.
    path = ".".join(p for p in loc if not any(c in p for c in "[]") and p not in _UNION_TAGS)
    message = first.get("msg", "invalid value")
    if first.get("type") == "missing":
        message = "field required"
    elif len(errors) > 1 and all(err.get("loc", ())[:1] == first.get("loc", ())[:1] for err in errors):
        message = f"invalid value ({message})"
    return bad_request(f"{path or 'request'}: {message}" if path else message, param=path or None)


_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "function-after", "union"}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return from_validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        return APIError(exc.status_code, message).response()

    @app.exception_handler(EngineDeadError)
    async def _dead(_: Request, exc: EngineDeadError) -> JSONResponse:
        return APIError(503, str(exc)).response()

    @app.exception_handler(EngineOverloadedError)
    async def _overloaded(request: Request, exc: EngineOverloadedError) -> JSONResponse:
        return overloaded(request.app.state.kvserve.metrics, exc).response()

    @app.exception_handler(EngineStepError)
    async def _step(_: Request, exc: EngineStepError) -> JSONResponse:
        return APIError(500, str(exc)).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error serving %s %s", request.method, request.url.path)
        return APIError(500, f"internal server error: {type(exc).__name__}").response()
