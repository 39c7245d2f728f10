"""The operational layer around the routes: the guards at the door (API key, admission, body cap) and
the observers (metrics, access log, opt-in request log, CORS), installed by create_app.

The order matters; outermost first, a request meets:
    CORS (only when configured: preflights never need a key)
    ObservabilityMiddleware (sees every response, refusals and our own 500s included)
    RequestLogMiddleware (only with --log-requests)
    InternalErrorMiddleware (server/errors.py: our bugs become a 500 body, logged without messages)
    ApiKeyMiddleware → AdmissionMiddleware → BodyLimitMiddleware (all before the body is parsed)
    the routes
Starlette puts the middleware added last outermost, hence two installers around install_error_handlers.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from engine import AsyncEngine
from server.auth import ApiKeyMiddleware
from server.limits import Admission, AdmissionMiddleware, BodyLimitMiddleware
from server.logs import RequestLogMiddleware
from server.metrics import ServerMetrics
from server.observability import ObservabilityMiddleware, route_labels
from server.settings import Settings


def install_guards(app: FastAPI, settings: Settings, engine: AsyncEngine, model_name: str) -> None:
    """Admission and metrics on `app.state` (`admission`, `metrics`) and the three guards. Call before
    install_error_handlers."""
    admission = Admission(engine, capacity=settings.max_num_seqs + settings.max_queued_requests)
    metrics = ServerMetrics(engine, admission, model_name)
    app.state.admission = admission
    app.state.metrics = metrics
    app.add_middleware(
        BodyLimitMiddleware, max_body_bytes=settings.max_request_body_bytes, on_refusal=metrics.count_refusal
    )
    app.add_middleware(AdmissionMiddleware, admission=admission, on_refusal=metrics.count_refusal)
    app.add_middleware(
        ApiKeyMiddleware,
        api_key=settings.api_key,
        admin_api_key=settings.admin_api_key,
        routes=app.router.routes,
    )


def install_observers(app: FastAPI, settings: Settings) -> None:
    """The request log (opt-in), response metrics and access log, and CORS (opt-in). Call after
    install_error_handlers and after the routes are included."""
    if settings.log_requests:
        app.add_middleware(RequestLogMiddleware)
    metrics = app.state.metrics
    assert isinstance(metrics, ServerMetrics)
    app.add_middleware(ObservabilityMiddleware, metrics=metrics, label=route_labels(app))
    if settings.cors_allow_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_allow_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
