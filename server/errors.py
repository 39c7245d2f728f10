"""One table from exception class to HTTP status and OpenAI error body, and the app's error handlers.

Every error leaves the server as `{"error": {"message", "type", "param", "code"}}`. Messages never
carry the prompt, file paths or internals: engine messages are shown only for the classes whose
messages are about the request's parameters; the rest get a fixed text.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine.errors import (
    AdapterError,
    AdapterExists,
    AdapterInUse,
    EngineDead,
    EngineError,
    InvalidRequest,
    PromptTooLong,
    QueueFull,
    RequestFailed,
    UnknownAdapter,
)
from server.protocol import ErrorDetail, ErrorResponse

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 1


class UnknownModel(EngineError):
    """The request's `model` names neither the base nor a loaded adapter."""


class AuthenticationFailed(EngineError):
    """A missing, malformed or wrong API key."""


class BodyTooLarge(EngineError):
    """The request body is over --max-request-body-bytes."""


class ServerDraining(EngineError):
    """The server is shutting down: it finishes running requests and admits no new ones."""


@dataclass(frozen=True)
class ErrorKind:
    """How one class of exception is answered. `message` replaces the exception's own text when set."""

    status: int
    type: str
    code: str | None = None
    message: str | None = None
    retry_after_s: int | None = None


ERROR_TABLE: Mapping[type[BaseException], ErrorKind] = MappingProxyType(
    {
        PromptTooLong: ErrorKind(400, "invalid_request_error", "context_length_exceeded"),
        InvalidRequest: ErrorKind(400, "invalid_request_error"),
        AuthenticationFailed: ErrorKind(401, "invalid_request_error", "invalid_api_key"),
        UnknownModel: ErrorKind(404, "invalid_request_error", "model_not_found"),
        UnknownAdapter: ErrorKind(404, "invalid_request_error", "model_not_found"),
        AdapterExists: ErrorKind(409, "invalid_request_error", "adapter_exists"),
        AdapterInUse: ErrorKind(409, "invalid_request_error", "adapter_in_use"),
        # The engine's adapter messages say what is wrong with the adapter and never hold paths.
        AdapterError: ErrorKind(400, "invalid_request_error", "adapter_error"),
        QueueFull: ErrorKind(
            429,
            "rate_limit_error",
            "queue_full",
            message="The server is at capacity; retry shortly.",
            retry_after_s=RETRY_AFTER_S,
        ),
        BodyTooLarge: ErrorKind(413, "invalid_request_error", "request_too_large"),
        ServerDraining: ErrorKind(
            503,
            "server_error",
            "server_shutting_down",
            message="The server is shutting down; retry on another instance.",
            retry_after_s=RETRY_AFTER_S,
        ),
        EngineDead: ErrorKind(
            503,
            "server_error",
            "engine_dead",
            message="The inference engine has stopped; no request can run.",
        ),
        RequestFailed: ErrorKind(
            500, "server_error", "request_failed", message="The request failed inside the engine."
        ),
        EngineError: ErrorKind(500, "server_error", "internal_error", message="Internal server error."),
    }
)
INTERNAL_ERROR = ErrorKind(500, "server_error", "internal_error", message="Internal server error.")


def error_kind(exc: BaseException) -> ErrorKind:
    """The table entry of the exception's closest class; INTERNAL_ERROR for anything unknown."""
    for cls in type(exc).__mro__:
        kind = ERROR_TABLE.get(cls)
        if kind is not None:
            return kind
    return INTERNAL_ERROR


def error_body(exc: BaseException) -> ErrorResponse:
    """The OpenAI error body for an exception (used by the handlers and by mid-stream error events)."""
    kind = error_kind(exc)
    if kind.message is None and isinstance(exc, EngineError):
        return ErrorResponse(
            error=ErrorDetail(message=exc.message, type=kind.type, param=exc.param, code=kind.code)
        )
    return ErrorResponse(
        error=ErrorDetail(
            message=kind.message or INTERNAL_ERROR.message or "", type=kind.type, code=kind.code
        )
    )


def log_unexpected(exc: BaseException, request_id: str | None = None) -> None:
    """Log our own bug without the exception's message, which might quote the prompt."""
    stack = "".join(traceback.format_tb(exc.__traceback__))
    logger.error(
        "request %s failed with %s (message withheld)\n%s", request_id or "-", type(exc).__name__, stack
    )


def error_response(exc: BaseException) -> JSONResponse:
    kind = error_kind(exc)
    headers: dict[str, str] = {}
    if kind.retry_after_s is not None:
        headers["Retry-After"] = str(kind.retry_after_s)
    if kind.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(error_body(exc).model_dump(), status_code=kind.status, headers=headers)


def _status_type(status: int) -> str:
    return "invalid_request_error" if status < 500 else "server_error"


def _json_error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    body = ErrorResponse(
        error=ErrorDetail(message=message, type=_status_type(status), param=param, code=code)
    )
    return JSONResponse(body.model_dump(), status_code=status)


def _is_type_tag(part: str) -> bool:
    # pydantic puts the union member tried into the location ("str", "list[TextPart]"): not a field.
    return "[" in part or part[:1].isupper() or part in {"str", "int", "float", "bool", "dict"}


def validation_param(loc: tuple[Any, ...]) -> str | None:
    """("body", "messages", 0, "content", "str") → "messages[0].content"; None for the body itself."""
    param = ""
    for part in loc[1:] if loc[:1] == ("body",) else loc:
        if isinstance(part, int):
            param += f"[{part}]"
        elif isinstance(part, str) and not _is_type_tag(part):
            param += f".{part}" if param else part
    return param or None


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One readable message for the first failing parameter, without the offending input."""
    errors = list(exc.errors())
    if not errors:
        return "Invalid request body.", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return "The request body is not valid JSON.", None
    param = validation_param(tuple(first.get("loc", ())))
    same = [e for e in errors if validation_param(tuple(e.get("loc", ()))) == param]
    reasons = list(dict.fromkeys(str(e.get("msg", "invalid")) for e in same))
    if param is None:
        return "The request body must be a JSON object: " + "; or ".join(reasons), None
    return f"Invalid value for '{param}': " + "; or ".join(reasons), param


async def _on_engine_error(request: Request, exc: Exception) -> JSONResponse:
    if error_kind(exc).status == 500:  # 503s (engine dead, draining) are states, not our bugs
        log_unexpected(exc, request.headers.get("x-request-id"))
    return error_response(exc)


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    message, param = validation_message(exc)
    return _json_error(400, message, param)


async def _on_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    message = exc.detail if isinstance(exc.detail, str) else "HTTP error"
    response = _json_error(exc.status_code, message)
    if exc.headers:
        response.headers.update(exc.headers)
    return response


class InternalErrorMiddleware:
    """Turns our own bugs into a 500 OpenAI body, logged without the exception's message.

    Starlette's catch-all handler would re-raise the exception to the ASGI server, which logs its
    message, and that message might quote a prompt; this middleware stops it here instead.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            log_unexpected(exc)
            if not started:  # once the head is out, the status cannot change; the server closes the socket
                await error_response(exc)(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    """Route every error the app can raise to an OpenAI-shaped body."""
    app.add_exception_handler(EngineError, _on_engine_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_middleware(InternalErrorMiddleware)
