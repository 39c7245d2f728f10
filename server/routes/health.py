"""GET /health: 200 while the engine runs, 503 once it has died. Open even with an API key set."""

from __future__ import annotations

from fastapi import APIRouter

from engine.errors import EngineDead
from server.dependencies import StateDep

router = APIRouter()


@router.get("/health")
async def health(state: StateDep) -> dict[str, str]:
    if state.engine.is_dead:
        raise EngineDead("the engine is not running")
    return {"status": "ok"}
