"""T2: with an API key, every route of the app (enumerated from app.routes, the admin routes included)
refuses a request without the key, with a wrong key and with a wrong scheme; only the probes are open.
CORS stays off unless configured.

Figure: routes checked, and how many answered without a valid key (must be 0).
"""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.routing import iter_route_contexts

from engine import AsyncEngine
from server.auth import PUBLIC_PATHS, key_matches
from tests.reliability.conftest import CONSULT, chat
from tests.server.conftest import API_KEY, asgi_client, make_app

pytestmark = pytest.mark.asyncio(loop_scope="module")

ADMIN_KEY = "admin-key-9f2c"
BAD_AUTHORIZATIONS: list[dict[str, str]] = [
    {},
    {"Authorization": "Bearer wrong-key"},
    {"Authorization": f"Bearer {API_KEY}x"},
    {"Authorization": f"Bearer {API_KEY[:-1]}"},
    {"Authorization": f"Basic {API_KEY}"},
    {"Authorization": f"Token {API_KEY}"},
    {"Authorization": API_KEY},
    {"Authorization": "Bearer "},
    {"X-API-Key": API_KEY},
]


@pytest.fixture(scope="module")
def keyed_app(engine: AsyncEngine, tmp_path_factory: pytest.TempPathFactory) -> FastAPI:
    adapters_root = tmp_path_factory.mktemp("adapters-root")
    return make_app(engine, api_key=API_KEY, admin_api_key=ADMIN_KEY, adapters_root=adapters_root)


def _requests(app: FastAPI) -> list[tuple[str, str]]:
    """(method, path) of every route, path parameters filled in."""
    requests = []
    for route in iter_route_contexts(app.routes):
        assert route.path is not None and route.methods, f"a route without a path or methods: {route}"
        for method in sorted(route.methods - {"HEAD"}):
            requests.append((method, route.path.replace("{model}", CONSULT)))
    return requests


async def test_every_route_but_the_probes_needs_the_key(keyed_app: FastAPI) -> None:
    requests = _requests(keyed_app)
    paths = {path for _, path in requests}
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/metrics"} <= paths
    assert {"/v1/load_lora_adapter", "/v1/unload_lora_adapter"} <= paths  # the admin routes are on
    unguarded = []
    async with asgi_client(keyed_app) as client:
        for method, path in requests:
            for headers in BAD_AUTHORIZATIONS:
                response = await client.request(method, path, headers=headers, json=chat())
                if path in PUBLIC_PATHS:
                    assert response.status_code == 200
                    continue
                if response.status_code != 401:
                    unguarded.append((method, path, headers, response.status_code))
                    continue
                assert response.json()["error"]["code"] == "invalid_api_key"
                assert response.headers["www-authenticate"] == "Bearer"
    guarded = len([p for p in paths if p not in PUBLIC_PATHS])
    print(f"\nT2 auth: routes {len(paths)} ({guarded} guarded), unguarded {len(unguarded)}")
    assert unguarded == []


async def test_the_right_keys_open_their_routes(keyed_app: FastAPI) -> None:
    async with asgi_client(keyed_app) as client:
        for scheme in ("Bearer", "bearer"):
            response = await client.get("/v1/models", headers={"Authorization": f"{scheme} {API_KEY}"})
            assert response.status_code == 200
        metrics = await client.get("/metrics", headers={"Authorization": f"Bearer {API_KEY}"})
        assert metrics.status_code == 200 and "vllm:num_requests_running" in metrics.text
        # The ordinary key does not open the admin routes; the admin key does.
        body = {"lora_name": "x", "lora_path": "nowhere"}
        as_user = await client.post(
            "/v1/load_lora_adapter", json=body, headers={"Authorization": f"Bearer {API_KEY}"}
        )
        assert as_user.status_code == 401
        as_admin = await client.post(
            "/v1/load_lora_adapter", json=body, headers={"Authorization": f"Bearer {ADMIN_KEY}"}
        )
        assert as_admin.status_code == 400 and as_admin.json()["error"]["param"] == "lora_path"


async def test_an_empty_key_opens_nothing(engine: AsyncEngine) -> None:
    async with asgi_client(make_app(engine, api_key="")) as client:
        for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": "Bearer"}):
            assert (await client.get("/v1/models", headers=headers)).status_code == 401


async def test_an_unknown_path_is_404_not_a_hint(keyed_app: FastAPI) -> None:
    async with asgi_client(keyed_app) as client:
        response = await client.get("/v1/secret-admin")
    assert response.status_code == 404


async def test_keys_are_compared_whole() -> None:
    keys = (b"abc123", b"admin-key")
    assert key_matches(b"abc123", keys) and key_matches(b"admin-key", keys)
    for token in (None, b"", b"abc12", b"abc1234", b"ABC123", b"admin-key "):
        assert not key_matches(token, keys)


async def test_cors_is_off_unless_configured(engine: AsyncEngine) -> None:
    preflight = {
        "Origin": "https://evil.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization",
    }
    async with asgi_client(make_app(engine)) as client:
        response = await client.options("/v1/chat/completions", headers=preflight)
        assert "access-control-allow-origin" not in response.headers
    allowed = make_app(engine, api_key=API_KEY, cors_allow_origins=["https://app.example"])
    async with asgi_client(allowed) as client:
        ok = await client.options(
            "/v1/chat/completions", headers={**preflight, "Origin": "https://app.example"}
        )
        assert ok.status_code == 200
        assert ok.headers["access-control-allow-origin"] == "https://app.example"
        refused = await client.options("/v1/chat/completions", headers=preflight)
        assert "access-control-allow-origin" not in refused.headers
