"""T14: a unique marker sent in prompts, in bad requests and in requests that fail inside the engine
(with exception messages that quote it) never reaches the logs, as the server formats them, the
metrics, or another client's responses, unless the operator opted in with --log-requests.

Figure: marker hits in logs, metrics and other responses (must be 0).
"""

from __future__ import annotations

import asyncio
import io
import logging
import uuid
from collections.abc import Iterator
from typing import Any

import httpx2
import pytest

from engine.demo import DemoModel
from server.logs import CONTENT_LOGGERS, make_formatter, quiet_content_loggers
from tests.reliability.conftest import CONSULT, chat, new_engine
from tests.server.conftest import asgi_client, make_app

pytestmark = pytest.mark.asyncio(loop_scope="function")

FAULTY_MAX_TOKENS = 29


@pytest.fixture
def server_log(log_requests: bool) -> Iterator[io.StringIO]:
    """Everything logged during the test, formatted as the server formats it."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(make_formatter(log_requests))
    # The test's own HTTP client logs its URLs; it is not part of the server.
    handler.addFilter(lambda record: not record.name.startswith("httpx"))
    root = logging.getLogger()
    saved = {name: logging.getLogger(name).level for name in ("", *CONTENT_LOGGERS)}
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)  # as with --log-level debug
    quiet_content_loggers(log_requests)
    try:
        yield buffer
    finally:
        root.removeHandler(handler)
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


@pytest.fixture
def log_requests() -> bool:
    return False


async def _send_everything(client: httpx2.AsyncClient, canary: str) -> None:
    question = [{"role": "user", "content": f"我头痛 {canary}，怎么办？"}]
    bodies: list[dict[str, Any]] = [
        chat(messages=question),
        chat(messages=question, stream=True),
        chat(messages=question, temperature="hot"),
        chat(messages=question, max_tokens=10**9),
        chat(messages=question, stop=[canary * 20]),
        chat(messages=question, max_tokens=FAULTY_MAX_TOKENS),
        chat(messages=question, max_tokens=FAULTY_MAX_TOKENS, stream=True),
        chat(messages=[{"role": "user", "content": f"RAISE {canary}"}]),
        {"model": CONSULT, "prompt": f"问：{canary}\n答：", "max_tokens": 4},
        {"model": CONSULT, "prompt": f"问：{canary}", "echo": True},
    ]
    for body in bodies:
        path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
        await client.post(path, json=body)
    await client.post("/v1/chat/completions", content=f'{{"model": "{canary}"'.encode(), headers={})
    await client.get(f"/v1/models/{canary}?q={canary}")


def _inject_faults(engine: Any, canary: str, monkeypatch: pytest.MonkeyPatch) -> None:
    advance, encode_chat = engine.core._advance, engine.tokenizer.encode_chat

    def failing_advance(req: Any, token_id: int, now: float) -> Any:
        if req.params.max_tokens == FAULTY_MAX_TOKENS:
            raise RuntimeError(f"fault while decoding {canary}")
        return advance(req, token_id, now)

    def failing_encode(messages: list[dict[str, str]], template: str) -> list[int]:
        if messages[-1]["content"].startswith("RAISE"):
            raise ValueError(f"cannot encode {messages[-1]['content']}")
        return list(encode_chat(messages, template))

    monkeypatch.setattr(engine.core, "_advance", failing_advance)
    monkeypatch.setattr(engine.tokenizer, "encode_chat", failing_encode)


async def test_the_marker_never_leaks(
    demo: DemoModel, server_log: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    canary = f"CANARY{uuid.uuid4().hex}"
    engine = new_engine(demo)
    _inject_faults(engine, canary, monkeypatch)
    engine.start()
    try:
        app = make_app(engine)
        async with asgi_client(app) as client:
            other = [
                client.post("/v1/chat/completions", json=chat(max_tokens=24, stream=i % 2 == 0))
                for i in range(4)
            ]
            others, _ = await asyncio.gather(asyncio.gather(*other), _send_everything(client, canary))
            metrics = (await client.get("/metrics")).text
        log = server_log.getvalue()
        answers = [
            r.json()["choices"][0]["message"]["content"]
            for r in others
            if "json" in r.headers["content-type"]
        ]
        assert answers and all(len(answer) > 8 for answer in answers)
        hits = {
            "logs": log.count(canary) + sum(log.count(answer) for answer in answers),
            "metrics": metrics.count(canary),
            "other responses": sum(response.text.count(canary) for response in others),
        }
        assert "message withheld" in log  # the injected faults were logged, their messages not
        assert all(response.status_code == 200 for response in others)
        print(
            f"\nT14 privacy: marker and completion hits {hits} "
            f"(log {len(log)} chars, metrics {len(metrics)} chars)"
        )
        leaks = [line for line in log.splitlines() if canary in line]
        assert hits == {"logs": 0, "metrics": 0, "other responses": 0}, leaks[:5]
    finally:
        engine.shutdown()


@pytest.mark.parametrize("log_requests", [True])
async def test_log_requests_is_the_opt_in(
    demo: DemoModel, server_log: io.StringIO, log_requests: bool
) -> None:
    canary = f"CANARY{uuid.uuid4().hex}"
    engine = new_engine(demo)
    engine.start()
    try:
        async with asgi_client(make_app(engine, log_requests=log_requests)) as client:
            body = chat(messages=[{"role": "user", "content": canary}])
            assert (await client.post("/v1/chat/completions", json=body)).status_code == 200
        assert canary in server_log.getvalue()
    finally:
        engine.shutdown()
