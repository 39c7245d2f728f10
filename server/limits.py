"""Limits at the door: the request body cap (413), the JSON content type, and admission (429 when full,
503 while draining or once the engine has died), all decided before the body is parsed.

Why in ASGI middleware rather than in the routes: a refusal has to cost nothing, so it must come before
FastAPI reads and parses the body, and it must hold for any route added later. uvicorn's own
`--limit-concurrency` is no substitute: it answers in plain text and refuses the health probes too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine import AsyncEngine
from engine.errors import EngineDead, EngineError, InvalidRequest, QueueFull
from server.errors import BodyTooLarge, ServerDraining, error_response

logger = logging.getLogger(__name__)

# The routes that start generations: the only ones admission counts and refuses.
GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})

# Told of every refusal made here (the metrics count them by reason).
OnRefusal = Callable[[EngineError], None]


class Admission:
    """Who may start a generation now. Counts the generation requests in flight (streams included,
    until their last byte), and refuses new ones while `capacity` are in flight, while the server
    drains, or once the engine has died. The engine's own waiting-queue bound (QueueFull) stays as a
    second line for requests with n > 1. Lives on the event loop; not thread-safe."""

    def __init__(self, engine: AsyncEngine, capacity: int) -> None:
        self.engine = engine
        self.capacity = capacity
        self.in_flight = 0
        self.draining = False

    @property
    def ready(self) -> bool:
        """Whether a load balancer should send traffic here. The port opens only once the model is
        loaded and the engine started, so a server that answers has its model."""
        return not self.draining and not self.engine.is_dead

    def refusal(self) -> EngineError | None:
        """Why a new generation request must be refused now, or None to admit it."""
        if self.engine.is_dead:
            return EngineDead("the engine is not running")
        if self.draining:
            return ServerDraining("the server is shutting down")
        if self.in_flight >= self.capacity:
            return QueueFull("the server is at capacity")
        return None


class AdmissionMiddleware:
    """429 / 503 with Retry-After for generation requests that cannot be admitted, before the body
    is read; counts the admitted ones in flight while they run."""

    def __init__(self, app: ASGIApp, admission: Admission, on_refusal: OnRefusal) -> None:
        self.app = app
        self.admission = admission
        self.on_refusal = on_refusal

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in GENERATION_PATHS:
            await self.app(scope, receive, send)
            return
        refusal = self.admission.refusal()
        if refusal is not None:
            self.on_refusal(refusal)
            await error_response(refusal)(scope, receive, send)
            return
        self.admission.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.admission.in_flight -= 1


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value)
    return None


def _is_json(content_type: bytes | None) -> bool:
    media_type = (content_type or b"").split(b";", 1)[0].strip().lower()
    return media_type == b"application/json" or media_type.endswith(b"+json")


class BodyLimitMiddleware:
    """Reads a request body up to `max_body_bytes` and hands it on whole; beyond that, 413 at once
    (at once from the Content-Length header when there is one, else as soon as the chunks read pass
    the cap), so a huge body is never held in memory. A body that is not JSON gets a 400 saying so."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, on_refusal: OnRefusal) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.on_refusal = on_refusal

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        error = self._check_headers(scope)
        if error is None:
            body, error = await self._read(receive)
            if body is None and error is None:
                return  # the client left while sending: there is no one to answer
        if error is not None:
            self.on_refusal(error)
            await error_response(error)(scope, receive, send)
            return
        assert body is not None
        await self.app(scope, _replay(body, receive), send)

    def _check_headers(self, scope: Scope) -> EngineError | None:
        declared = _header(scope, b"content-length")
        if declared is not None:
            try:
                if int(declared) > self.max_body_bytes:
                    return self._too_large()
            except ValueError:
                return InvalidRequest("The Content-Length header is not a number.")
        if not _is_json(_header(scope, b"content-type")):
            return InvalidRequest("The body must be JSON, sent with 'Content-Type: application/json'.")
        return None

    async def _read(self, receive: Receive) -> tuple[bytes | None, EngineError | None]:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None, None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None, self._too_large()
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), None

    def _too_large(self) -> BodyTooLarge:
        limit = self.max_body_bytes
        return BodyTooLarge(f"The request body is larger than this server's limit of {limit} bytes.")


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the body read already, then passes on what the client sends next (the
    disconnect that the routes watch for)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
