"""One middleware that watches every response: the access log line, response counts by route and
status, and the finish reasons and latency of non-streamed generations (streams report their own,
from the engine's clock: server/sse.py).

The access log names the route's template (`/v1/models/{model}`), never the raw path or query string,
which a client can fill with anything; uvicorn's own access log is off for that reason.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

from fastapi import FastAPI
from fastapi.routing import iter_route_contexts
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.limits import GENERATION_PATHS
from server.metrics import ServerMetrics
from server.routes.respond import CLIENT_CLOSED_REQUEST

access_logger = logging.getLogger("server.access")

UNMATCHED_ROUTE = "other"
_MAX_CAPTURED_BYTES = 1 << 20


def route_labels(app: FastAPI) -> Callable[[Scope], str]:
    """scope → the template of the route that served it. Starlette leaves the matched endpoint in the
    scope; endpoints map back to their templates."""
    contexts = [context for context in iter_route_contexts(app.routes) if context.path is not None]
    templates: dict[object, str] = {context.endpoint: str(context.path) for context in contexts}
    static = {str(context.path) for context in contexts if "{" not in str(context.path)}

    def label(scope: Scope) -> str:
        template = templates.get(scope.get("endpoint"))
        if template is not None:
            return template
        return scope["path"] if scope["path"] in static else UNMATCHED_ROUTE

    return label


class ObservabilityMiddleware:
    """Counts and logs each HTTP response; reads the finish reasons of non-streamed generations."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics, label: Callable[[Scope], str]) -> None:
        self.app = app
        self.metrics = metrics
        self.label = label

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        watch = _ResponseWatch(is_generation=scope["path"] in GENERATION_PATHS)

        async def watching_send(message: Message) -> None:
            watch.see(message)
            await send(message)

        try:
            await self.app(scope, receive, watching_send)
        finally:
            self._record(scope, watch, time.monotonic() - started)

    def _record(self, scope: Scope, watch: _ResponseWatch, elapsed_s: float) -> None:
        route = self.label(scope)
        status = watch.status or CLIENT_CLOSED_REQUEST  # no head sent: the connection was cut
        self.metrics.count_response(route, status)
        access_logger.info("%s %s %d %.3fs", scope["method"], route, status, elapsed_s)
        if not watch.is_generation:
            return
        if status == CLIENT_CLOSED_REQUEST:
            self.metrics.count_finish("abort")
        elif status == 200 and watch.body is not None:
            for reason in _finish_reasons(bytes(watch.body)):
                self.metrics.count_finish(reason)
                self.metrics.e2e.observe(elapsed_s)


class _ResponseWatch:
    """The status of a response and, for a non-streamed generation, its JSON body."""

    def __init__(self, is_generation: bool) -> None:
        self.is_generation = is_generation
        self.status: int | None = None
        self.body: bytearray | None = None

    @property
    def _full(self) -> bool:
        return self.body is not None and len(self.body) >= _MAX_CAPTURED_BYTES

    def see(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = int(message["status"])
            if self.is_generation and self.status == 200 and _is_json_response(message):
                self.body = bytearray()
        elif message["type"] == "http.response.body" and self.body is not None and not self._full:
            self.body += message.get("body", b"")


def _is_json_response(message: Message) -> bool:
    for name, value in message.get("headers", ()):
        if name.lower() == b"content-type":
            return bytes(value).startswith(b"application/json")
    return False


def _finish_reasons(body: bytes) -> list[str]:
    try:
        choices = json.loads(body).get("choices", [])
        return [str(choice.get("finish_reason")) for choice in choices if isinstance(choice, dict)]
    except (ValueError, AttributeError):
        return []
