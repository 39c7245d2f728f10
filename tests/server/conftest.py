"""In-process fixtures: a real AsyncEngine on the tiny demo (one per test module, on that module's event
loop), apps built by create_app over it, and httpx2 / openai clients talking to the app over ASGI.

The app's lifespan is not run (httpx2's ASGITransport does not run it): the engine fixture starts and
stops the engine itself, so that several apps (with and without an API key) can share one engine.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx2
import openai
import pytest
import pytest_asyncio
from fastapi import FastAPI

from engine import AsyncEngine
from engine.demo import DemoModel
from server.app import create_app
from server.settings import Settings
from tests.conftest import engine_config

BASE = "chatmed-demo-base"
CONSULT = "chatmed-consult"
TCM = "chatmed-tcm"
MAX_MODEL_LEN = 256
API_KEY = "test-key-0123456789"


def make_engine(demo: DemoModel, **overrides: object) -> AsyncEngine:
    values: dict[str, object] = {"max_model_len": MAX_MODEL_LEN, "num_kv_blocks": 128}
    values.update(overrides)
    return AsyncEngine(engine_config(demo, **values))


def make_app(engine: AsyncEngine, **settings: Any) -> FastAPI:
    # _env_file/_cli_parse_args are left alone: the tests' settings are only what they pass here.
    return create_app(Settings(**settings), engine)


def asgi_client(app: FastAPI) -> httpx2.AsyncClient:
    return httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://testserver")


def openai_client(app: FastAPI, api_key: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url="http://testserver/v1", api_key=api_key, http_client=asgi_client(app), max_retries=0
    )


def parse_sse(body: str) -> list[str]:
    """The `data:` payloads of an SSE body, in order; asserts the exact framing on the way."""
    assert body.endswith("\n\n"), "every event ends with a blank line"
    payloads = []
    for event in body.split("\n\n")[:-1]:
        if event.startswith(":"):  # keep-alive comment
            continue
        assert event.startswith("data: ") and "\n" not in event, f"bad frame {event[:80]!r}"
        payloads.append(event[len("data: ") :])
    return payloads


def sse_json(body: str) -> tuple[list[dict[str, Any]], str]:
    """(the JSON events, the last payload) of an SSE body."""
    payloads = parse_sse(body)
    return [json.loads(p) for p in payloads[:-1]], payloads[-1]


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def engine(demo: DemoModel) -> AsyncIterator[AsyncEngine]:
    engine = make_engine(demo)
    engine.start()
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def app(engine: AsyncEngine) -> FastAPI:
    return make_app(engine)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def client(app: FastAPI) -> AsyncIterator[httpx2.AsyncClient]:
    async with asgi_client(app) as client:
        yield client


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def oai(app: FastAPI) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai_client(app)
    yield client
    await client.close()


@pytest.fixture
def chat_body() -> Callable[..., dict[str, Any]]:
    """A small greedy chat body; keyword arguments override its fields."""

    def build(**fields: Any) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": CONSULT,
            "messages": [{"role": "user", "content": "头痛三天了，怎么办？"}],
            "max_tokens": 8,
            "temperature": 0,
        }
        body.update(fields)
        return body

    return build
