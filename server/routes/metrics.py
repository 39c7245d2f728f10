"""GET /metrics: Prometheus' text format (server/metrics.py). Behind the API key like every route but
the probes: a Prometheus scrape config sends it with `authorization: {credentials: <key>}`."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse

from server.dependencies import require_api_key
from server.metrics import CONTENT_TYPE, ServerMetrics

router = APIRouter(dependencies=[Depends(require_api_key)])


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(request: Request) -> PlainTextResponse:
    server_metrics = request.app.state.metrics
    assert isinstance(server_metrics, ServerMetrics)
    return PlainTextResponse(server_metrics.render(), media_type=CONTENT_TYPE)
