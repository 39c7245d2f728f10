"""GET /health (liveness) and GET /ready (readiness). Both are open even with an API key set: probes
carry no credentials, and the answers say nothing but the server's state.

/health: 200 while the engine runs (`{"status": "ok"}`, or `"draining"` during a shutdown), 503 once
it has died. /ready: 200 while new requests are taken; 503 while draining or with a dead engine, so a
load balancer sends traffic elsewhere. The port opens only once the model is loaded.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from engine.errors import EngineDead
from server.dependencies import StateDep
from server.errors import ServerDraining
from server.limits import Admission

router = APIRouter()


def _admission(request: Request) -> Admission:
    admission = request.app.state.admission
    assert isinstance(admission, Admission)
    return admission


@router.get("/health")
async def health(state: StateDep, request: Request) -> dict[str, str]:
    if state.engine.is_dead:
        raise EngineDead("the engine is not running")
    return {"status": "draining" if _admission(request).draining else "ok"}


@router.get("/ready")
async def ready(state: StateDep, request: Request) -> dict[str, str]:
    if state.engine.is_dead:
        raise EngineDead("the engine is not running")
    if _admission(request).draining:
        raise ServerDraining("the server is shutting down")
    return {"status": "ready"}
