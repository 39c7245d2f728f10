"""Logging that keeps health data out of the logs, and the opt-in request log (`--log-requests`).

Prompts and completions are health data. Our own log lines carry request ids, counts and exception
types only; but an exception's message can quote its input (a tokenizer error, a library's ValueError),
and every logger that logs a traceback (the engine's, uvicorn's) would print it. So the process-wide
formatter prints tracebacks with the exception's type and no message, unless the operator opted in with
`--log-requests`, which also logs each request and response body of the generation routes.
"""

from __future__ import annotations

import logging
import traceback
from types import TracebackType

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.limits import GENERATION_PATHS

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
MAX_LOGGED_BODY_CHARS = 4000
CONTENT_LOGGERS = ("sse_starlette",)

request_logger = logging.getLogger("server.requests")

_ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None] | tuple[None, None, None]


class PrivacyFormatter(logging.Formatter):
    """A formatter whose tracebacks keep the frames and the exception's type, and drop its message
    (and the chained exceptions, whose messages are as unknown)."""

    def format(self, record: logging.LogRecord) -> str:
        # logging caches a record's traceback text in `exc_text`; another handler's formatter may have
        # filled it, message included. Format our own, and leave the record as we found it.
        cached = record.exc_text
        record.exc_text = None
        try:
            return super().format(record)
        finally:
            record.exc_text = cached

    def formatException(self, ei: _ExcInfo) -> str:
        exc_type, _, tb = ei
        frames = "".join(traceback.format_tb(tb))
        name = exc_type.__name__ if exc_type is not None else "Exception"
        return f"Traceback (most recent call last):\n{frames}{name}: (message withheld)"


def make_formatter(log_requests: bool) -> logging.Formatter:
    """The full formatter only when the operator opted in to logging request contents."""
    return logging.Formatter(LOG_FORMAT) if log_requests else PrivacyFormatter(LOG_FORMAT)


def quiet_content_loggers(log_requests: bool) -> None:
    """Loggers that write response contents at DEBUG (sse-starlette logs every chunk it sends) stay
    at INFO, whatever the log level, unless the operator opted in."""
    if not log_requests:
        for name in CONTENT_LOGGERS:
            logging.getLogger(name).setLevel(logging.INFO)


def configure_logging(level: str, log_requests: bool) -> None:
    """One stderr handler on the root logger for every library (uvicorn is started with
    log_config=None so that it adds none of its own)."""
    handler = logging.StreamHandler()
    handler.setFormatter(make_formatter(log_requests))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    quiet_content_loggers(log_requests)


def _clip(data: bytes) -> str:
    text = data.decode("utf-8", errors="replace")
    return text if len(text) <= MAX_LOGGED_BODY_CHARS else text[:MAX_LOGGED_BODY_CHARS] + "..."


class RequestLogMiddleware:
    """`--log-requests` only: logs each generation request's body and its response body (both clipped
    to MAX_LOGGED_BODY_CHARS), numbered so that the two lines can be paired."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._num_requests = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in GENERATION_PATHS:
            await self.app(scope, receive, send)
            return
        self._num_requests += 1
        number = self._num_requests
        received = bytearray()
        sent = bytearray()

        async def logging_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request" and len(received) <= MAX_LOGGED_BODY_CHARS:
                received.extend(message.get("body", b""))
            return message

        async def logging_send(message: Message) -> None:
            if message["type"] == "http.response.body" and len(sent) <= MAX_LOGGED_BODY_CHARS:
                sent.extend(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, logging_receive, logging_send)
        finally:
            request_logger.info("request #%d %s body: %s", number, scope["path"], _clip(bytes(received)))
            request_logger.info("request #%d response: %s", number, _clip(bytes(sent)))
