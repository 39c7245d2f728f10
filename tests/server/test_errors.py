"""Error statuses and bodies over ASGI: 400, 401, 404, 429, 503, 500, all in OpenAI's shape."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import httpx2
import openai
import pytest
from fastapi import FastAPI

from engine import AsyncEngine, SamplingParams
from engine.demo import DemoModel
from engine.errors import EngineDead, InvalidRequest, PromptTooLong, QueueFull, RequestFailed, UnknownAdapter
from server.errors import ERROR_TABLE, InternalErrorMiddleware, error_body, error_kind, install_error_handlers
from tests.server.conftest import (
    API_KEY,
    CONSULT,
    MAX_MODEL_LEN,
    asgi_client,
    make_app,
    make_engine,
    openai_client,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

ChatBody = Callable[..., dict[str, Any]]
JSON = {"content-type": "application/json"}


def assert_openai_error(response: httpx2.Response, status: int, param: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["param"] == param
    return dict(error)


# ---- 400 ----------------------------------------------------------------------------------------------

BAD_CHAT_FIELDS: list[tuple[dict[str, Any], str | None]] = [
    ({"temperature": "hot"}, "temperature"),
    ({"n": 0}, "n"),
    ({"n": 100}, "n"),
    ({"n": "2"}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -5}, "max_tokens"),
    ({"max_tokens": 10 * MAX_MODEL_LEN}, "max_tokens"),
    ({"messages": []}, "messages"),
    ({"messages": "hello"}, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
    ({"messages": [{"role": "assistant", "content": "你好"}]}, "messages"),  # the template needs a question
    ({"messages": [{"role": "user", "content": "\ud800"}]}, "messages[0].content"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"top_logprobs": 50, "logprobs": True}, "top_logprobs"),
    ({"stop": [f"s{i}" for i in range(17)]}, "stop"),
    ({"stop": ""}, "stop"),
    ({"seed": 2**70}, "seed"),
    ({"min_tokens": 20, "max_tokens": 5}, "min_tokens"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"logit_bias": {"1": 2}}, "logit_bias"),
    ({"stream": "yes"}, "stream"),
    ({"stream_options": {"include_usage": "yes"}, "stream": True}, "stream_options.include_usage"),
    ({"model": 7}, "model"),
]


@pytest.mark.parametrize(("fields", "param"), BAD_CHAT_FIELDS)
async def test_bad_chat_bodies_get_400_naming_the_param(
    client: httpx2.AsyncClient, engine: AsyncEngine, chat_body: ChatBody, fields: dict[str, Any], param: str
) -> None:
    before = engine.stats()
    # json.dumps escapes lone surrogates as \ud800, which is what a client would send.
    content = json.dumps(chat_body(**fields))
    response = await client.post("/v1/chat/completions", content=content, headers=JSON)
    error = assert_openai_error(response, 400, param)
    assert error["type"] == "invalid_request_error"
    after = engine.stats()
    assert after.num_prompt_tokens_total == before.num_prompt_tokens_total  # nothing reached the engine


async def test_max_tokens_beyond_the_context_says_so(client: httpx2.AsyncClient, chat_body: ChatBody) -> None:
    response = await client.post("/v1/chat/completions", json=chat_body(max_tokens=10 * MAX_MODEL_LEN))
    assert assert_openai_error(response, 400, "max_tokens")["code"] == "context_length_exceeded"


_CHAT = b'{"model": "chatmed-consult", "messages": [{"role": "user", "content": "x"}]'
MALFORMED: list[tuple[bytes, str, str | None]] = [
    (b'{"model": "chatmed-consult", "messages": [', "application/json", None),
    (b"[1, 2, 3]", "application/json", None),
    (b"", "application/json", None),
    (_CHAT + b', "n": NaN}', "application/json", "n"),
    (_CHAT + b', "temperature": Infinity}', "application/json", "temperature"),
    (_CHAT + b', "seed": ' + b"9" * 5000 + b"}", "application/json", None),  # beyond Python's int limit
    (b"[" * 5000 + b"]" * 5000, "application/json", None),  # deep nesting
    (b"model=chatmed-consult", "application/x-www-form-urlencoded", None),
]


@pytest.mark.parametrize(("content", "content_type", "param"), MALFORMED)
async def test_malformed_bodies_get_400(
    client: httpx2.AsyncClient, content: bytes, content_type: str, param: str | None
) -> None:
    response = await client.post(
        "/v1/chat/completions", content=content, headers={"content-type": content_type}
    )
    assert_openai_error(response, 400, param)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"prompt": ["一", "二"]}, "prompt"),
        ({"prompt": [[1, 2], [3, 4]]}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [10**6]}, "prompt"),
        ({"prompt": [1, "a"]}, "prompt"),
        ({"echo": True}, "echo"),
        ({"suffix": "。"}, "suffix"),
        ({"best_of": 2}, "best_of"),
        ({"logprobs": 21}, "logprobs"),
    ],
)
async def test_bad_completion_bodies_get_400(
    client: httpx2.AsyncClient, fields: dict[str, Any], param: str
) -> None:
    body = {"model": CONSULT, "prompt": "问：头痛", "max_tokens": 4, **fields}
    assert_openai_error(await client.post("/v1/completions", json=body), 400, param)


async def test_the_sdk_raises_bad_request_with_the_param(oai: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await oai.chat.completions.create(model=CONSULT, messages=[{"role": "user", "content": "x"}], n=0)
    assert info.value.status_code == 400
    assert info.value.param == "n"


async def test_messages_never_echo_the_prompt(client: httpx2.AsyncClient, chat_body: ChatBody) -> None:
    marker = "CANARY-7f3a9"
    bad = [
        chat_body(messages=[{"role": "user", "content": marker}], max_tokens=10 * MAX_MODEL_LEN),
        chat_body(messages=[{"role": "assistant", "content": marker}]),
        chat_body(messages=[{"role": "user", "content": marker}], n=0),
        chat_body(messages=[{"role": "user", "content": marker}], stop=[marker] * 17),
    ]
    for body in bad:
        response = await client.post("/v1/chat/completions", json=body)
        assert response.status_code == 400
        assert marker not in response.text


# ---- 404 ----------------------------------------------------------------------------------------------


async def test_unknown_model_is_404_model_not_found(client: httpx2.AsyncClient, chat_body: ChatBody) -> None:
    response = await client.post("/v1/chat/completions", json=chat_body(model="gpt-4"))
    error = assert_openai_error(response, 404, "model")
    assert error["code"] == "model_not_found"
    response = await client.post("/v1/completions", json={"model": "gpt-4", "prompt": "x"})
    assert assert_openai_error(response, 404, "model")["code"] == "model_not_found"
    assert (
        assert_openai_error(await client.get("/v1/models/gpt-4"), 404, "model")["code"] == "model_not_found"
    )


async def test_sdk_sees_not_found(oai: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        await oai.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    assert info.value.code == "model_not_found"


async def test_unknown_routes_and_methods_keep_the_openai_shape(client: httpx2.AsyncClient) -> None:
    assert_openai_error(await client.get("/v1/nothing-here"), 404)
    assert_openai_error(await client.get("/v1/chat/completions"), 405)


# ---- 401 ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed_app(engine: AsyncEngine) -> FastAPI:
    return make_app(engine, api_key=API_KEY)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": API_KEY},
        {"Authorization": f"Basic {API_KEY}"},
        {"Authorization": f"Bearer {API_KEY}x"},
        {"Authorization": "Bearer"},
    ],
)
async def test_guarded_routes_need_the_key(
    keyed_app: FastAPI, chat_body: ChatBody, headers: dict[str, str]
) -> None:
    async with asgi_client(keyed_app) as client:
        for response in (
            await client.post("/v1/chat/completions", json=chat_body(), headers=headers),
            await client.post("/v1/completions", json={"model": CONSULT, "prompt": "x"}, headers=headers),
            await client.get("/v1/models", headers=headers),
            await client.get(f"/v1/models/{CONSULT}", headers=headers),
        ):
            error = assert_openai_error(response, 401)
            assert error["code"] == "invalid_api_key"
            assert response.headers["www-authenticate"] == "Bearer"
        # No schema or docs pages leak the routes either.
        assert (await client.get("/openapi.json")).status_code == 404


async def test_the_right_key_passes_and_health_stays_open(keyed_app: FastAPI, chat_body: ChatBody) -> None:
    async with asgi_client(keyed_app) as client:
        assert (await client.get("/health")).status_code == 200
        ok = await client.post(
            "/v1/chat/completions", json=chat_body(), headers={"Authorization": f"Bearer {API_KEY}"}
        )
        assert ok.status_code == 200, ok.text
    sdk = openai_client(keyed_app, api_key=API_KEY)
    models = await sdk.models.list()
    assert CONSULT in {m.id for m in models.data}
    with pytest.raises(openai.AuthenticationError):
        await openai_client(keyed_app, api_key="wrong").models.list()
    await sdk.close()


# ---- 429 and 503 --------------------------------------------------------------------------------------


async def test_a_full_queue_is_refused_with_429_and_retry_after(demo: DemoModel, chat_body: ChatBody) -> None:
    # The engine thread is not started, so whatever is queued stays queued: the queue is full for sure.
    engine = make_engine(demo, max_queued_requests=1, max_num_seqs=1)
    holder = engine.generate("holder", [1, 5, 6], SamplingParams(max_tokens=4))
    async with asgi_client(make_app(engine)) as client:
        response = await client.post("/v1/chat/completions", json=chat_body())
        error = assert_openai_error(response, 429)
        assert error["type"] == "rate_limit_error" and error["code"] == "queue_full"
        assert int(response.headers["retry-after"]) >= 1
        response = await client.post(
            "/v1/completions", json={"model": CONSULT, "prompt": "x", "stream": True}
        )
        assert_openai_error(response, 429)
        assert (await client.get("/health")).status_code == 200  # overload never refuses health
    await holder.aclose()
    engine.shutdown()


async def test_a_dead_engine_gives_503(demo: DemoModel, chat_body: ChatBody) -> None:
    engine = make_engine(demo)
    engine.shutdown()
    async with asgi_client(make_app(engine)) as client:
        error = assert_openai_error(await client.post("/v1/chat/completions", json=chat_body()), 503)
        assert error["code"] == "engine_dead"
        assert (await client.get("/health")).status_code == 503


# ---- the table and 500 --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (InvalidRequest("x", param="top_p"), 400),
        (PromptTooLong("x", param="max_tokens"), 400),
        (UnknownAdapter("x", param="model"), 404),
        (QueueFull("x"), 429),
        (EngineDead("x"), 503),
        (RequestFailed("boom at 0x7f00 in /srv/secret/path.py"), 500),
        (KeyError("a prompt"), 500),
    ],
)
async def test_error_table(exc: Exception, status: int) -> None:  # async: the module is marked asyncio
    assert error_kind(exc).status == status
    body = error_body(exc).error
    if status >= 500:
        assert "0x7f00" not in body.message and "prompt" not in body.message and body.type == "server_error"
    assert all(kind.status in (400, 401, 404, 409, 413, 429, 500, 503) for kind in ERROR_TABLE.values())


async def test_our_bugs_are_500_without_internals(caplog: pytest.LogCaptureFixture) -> None:
    secret = "SECRET-PROMPT-TEXT"
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError(secret)

    assert any(m.cls is InternalErrorMiddleware for m in app.user_middleware)
    with caplog.at_level(logging.ERROR):
        async with asgi_client(app) as client:
            response = await client.get("/boom")
    error = assert_openai_error(response, 500)
    assert error["type"] == "server_error" and secret not in response.text
    assert "RuntimeError" in caplog.text and secret not in caplog.text
