"""Typed FastAPI dependencies: the server's shared state and the API-key check. They are `async def`:
FastAPI would run a plain `def` in a worker thread, a thread hop per request for a few attribute reads."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from engine import AsyncEngine
from server.errors import AuthenticationFailed
from server.registry import ModelRegistry
from server.settings import Settings


@dataclass(frozen=True)
class ServerState:
    """What every route may use; built once by create_app and kept on `app.state.chatmed`."""

    settings: Settings
    engine: AsyncEngine
    registry: ModelRegistry


async def get_state(request: Request) -> ServerState:
    state = request.app.state.chatmed
    assert isinstance(state, ServerState)
    return state


StateDep = Annotated[ServerState, Depends(get_state)]


async def require_api_key(request: Request, state: StateDep) -> None:
    """With --api-key set, every guarded route needs `Authorization: Bearer <key>` (compared in
    constant time, so the time taken does not tell how much of a guess was right)."""
    if state.settings.api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    expected = state.settings.api_key.get_secret_value().encode("utf-8")
    given = token.strip().encode("utf-8", errors="replace")
    if scheme.lower() != "bearer" or not secrets.compare_digest(given, expected):
        raise AuthenticationFailed("Missing or incorrect API key: send 'Authorization: Bearer <key>'.")
