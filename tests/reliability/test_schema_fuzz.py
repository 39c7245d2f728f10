"""T3: schema fuzzing with schemathesis, in process. Cases generated from the app's own OpenAPI schema
(valid ones and, for the operations that have a body, invalid ones) must never get a 5xx, and every
error must come in OpenAI's shape.

Why not schemathesis' own runner (`from_asgi` + `case.call`): it drives the app through Starlette's
TestClient, which runs each call on an event loop of its own, while our engine delivers its outputs to
the one loop it was started on; requests would wait forever. Here schemathesis generates the cases and
one event loop, in a thread, runs the engine and an httpx2 ASGI client that sends them.

Figure: cases sent, failures (must be 0), statuses seen.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import Counter
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import httpx2
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.schemas import APIOperation

from engine.demo import DemoModel
from tests.reliability.conftest import new_engine
from tests.server.conftest import BASE, CONSULT, TCM, asgi_client, make_app

T = TypeVar("T")
CALL_TIMEOUT_S = 60.0


class LoopThread:
    """An event loop in a thread running the engine and an ASGI client of the app over it."""

    def __init__(self, demo: DemoModel) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.engine = new_engine(demo, max_num_seqs=8)
        self.app = make_app(self.engine)
        self.run(self._start())
        self.client = asgi_client(self.app)

    async def _start(self) -> None:
        self.engine.start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(CALL_TIMEOUT_S)

    def close(self) -> None:
        self.run(self.client.aclose())
        self.engine.shutdown()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def loop_thread(demo: DemoModel) -> Iterator[LoopThread]:
    runner = LoopThread(demo)
    yield runner
    runner.close()


@pytest.fixture(scope="module")
def statuses() -> Iterator[Counter[int]]:
    seen: Counter[int] = Counter()
    yield seen
    failures = sum(count for status, count in seen.items() if status >= 500)
    print(
        f"\nT3 schema fuzzing: cases {sum(seen.values())}, failures {failures}, "
        f"statuses {dict(sorted(seen.items()))}"
    )


@pytest.fixture(scope="module")
def operations(loop_thread: LoopThread) -> list[APIOperation]:
    schema = schemathesis.openapi.from_dict(loop_thread.app.openapi())
    return [result.ok() for result in schema.get_all_operations()]


def _content(body: Any, model: str) -> bytes:
    """The case's body as sent; half the valid bodies name a served model, so that they get past the
    registry and reach the engine rather than all ending in 404."""
    if isinstance(body, bytes):
        return body
    if isinstance(body, dict) and "model" in body and model:
        body = body | {"model": model}
    return json.dumps(body, allow_nan=True).encode()


def _check(response: httpx2.Response) -> None:
    assert response.status_code < 500, response.text[:500]
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
    elif response.headers.get("content-type", "").startswith("application/json"):
        json.loads(response.text)
    elif response.headers.get("content-type", "").startswith("text/event-stream"):
        assert response.text.endswith("data: [DONE]\n\n")


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(data=st.data())
def test_generated_requests_never_get_a_5xx(
    loop_thread: LoopThread, operations: list[APIOperation], statuses: Counter[int], data: st.DataObject
) -> None:
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/metrics"}
    operation = data.draw(st.sampled_from(operations), label="operation")
    modes = [schemathesis.GenerationMode.POSITIVE]
    if operation.body:
        modes.append(schemathesis.GenerationMode.NEGATIVE)
    mode = data.draw(st.sampled_from(modes), label="mode")
    case = data.draw(operation.as_strategy(generation_mode=mode), label="case")
    kwargs: dict[str, Any] = {"params": case.query or None, "headers": dict(case.headers or {})}
    if case.body is not None and not isinstance(case.body, schemathesis.core.NotSet):
        model = data.draw(st.sampled_from(["", CONSULT, TCM, BASE]), label="model")
        kwargs["content"] = _content(case.body, model)
        kwargs["headers"]["content-type"] = "application/json"
    response = loop_thread.run(loop_thread.client.request(case.method, case.formatted_path, **kwargs))
    statuses[response.status_code] += 1
    _check(response)
