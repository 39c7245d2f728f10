"""T11: injected engine faults. One request's failure stays its own; a killed engine ends every open
stream with an error event and `[DONE]`, /health and /ready answer 503, new requests are refused, and
nothing hangs. Faults are injected by monkeypatching the engine's internals (no switch in the code).

Figures: time from the engine's death to the last stream's end, and to /health's 503.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from engine import SamplingParams
from engine.demo import DemoModel
from tests.reliability.conftest import AsgiCall, chat, long_chat, new_engine
from tests.server.conftest import asgi_client, make_app, parse_sse

pytestmark = pytest.mark.asyncio(loop_scope="function")

FAULTY_MAX_TOKENS = 33  # the marker of the request that fails
TIMEOUT_S = 60.0


def _error_of(call: AsgiCall) -> dict[str, str]:
    payloads = parse_sse(call.text)
    assert payloads[-1] == "[DONE]"
    error = json.loads(payloads[-2])["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return dict(error)


async def test_one_requests_failure_stays_its_own(demo: DemoModel, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = new_engine(demo)
    original = engine.core._advance

    def advance(req: object, token_id: int, now: float) -> object:
        if req.params.max_tokens == FAULTY_MAX_TOKENS and len(req.seq.output_ids) > 3:
            raise RuntimeError("injected fault")
        return original(req, token_id, now)  # type: ignore[arg-type]

    monkeypatch.setattr(engine.core, "_advance", advance)
    engine.start()
    try:
        app = make_app(engine)
        path = "/v1/chat/completions"
        faulty_stream = AsgiCall(app, path, chat(max_tokens=FAULTY_MAX_TOKENS, stream=True))
        faulty_answer = AsgiCall(app, path, chat(max_tokens=FAULTY_MAX_TOKENS))
        healthy = [AsgiCall(app, path, chat(max_tokens=40, stream=i % 2 == 0)) for i in range(4)]
        calls = [faulty_stream, faulty_answer, *healthy]
        await asyncio.wait_for(asyncio.gather(*(call.run() for call in calls)), TIMEOUT_S)
        assert faulty_stream.status == 200 and _error_of(faulty_stream)["code"] == "request_failed"
        assert faulty_answer.status == 500 and '"code":"request_failed"' in faulty_answer.text
        for call in healthy:
            assert call.status == 200 and '"finish_reason":"length"' in call.text
        assert not engine.is_dead
        async with asgi_client(app) as client:
            assert (await client.get("/health")).json() == {"status": "ok"}
            assert (await client.post(path, json=chat())).status_code == 200
    finally:
        engine.shutdown()


async def test_a_killed_engine_ends_streams_and_refuses_new_work(
    demo: DemoModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = new_engine(demo)
    engine.start()
    try:
        app = make_app(engine)
        path = "/v1/chat/completions"
        streams = [AsgiCall(app, path, long_chat()) for _ in range(3)]
        waiting = AsgiCall(app, path, long_chat(stream=False))
        tasks = [asyncio.create_task(call.run()) for call in [*streams, waiting]]
        for call in streams:
            await asyncio.wait_for(call.first_chunk.wait(), TIMEOUT_S)
        await asyncio.sleep(0.1)  # let them decode a little

        def die() -> list[object]:
            raise RuntimeError("injected engine fault")

        monkeypatch.setattr(engine.core, "step", die)
        killed_at = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*tasks), TIMEOUT_S)
        streams_ended_s = time.monotonic() - killed_at
        for call in streams:
            assert call.completed and _error_of(call)["code"] == "engine_dead"
            assert '"finish_reason"' not in call.text
        assert waiting.status == 503 and '"code":"engine_dead"' in waiting.text
        async with asgi_client(app) as client:
            while (await client.get("/health")).status_code != 503:
                assert time.monotonic() - killed_at < TIMEOUT_S
                await asyncio.sleep(0.01)
            health_s = time.monotonic() - killed_at
            assert (await client.get("/ready")).status_code == 503
            refused = await client.post(path, json=chat(stream=True))
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_dead"
            metrics = (await client.get("/metrics")).text
            assert "chatmed:engine_alive 0" in metrics and "chatmed:stream_errors_total 3" in metrics
        print(
            f"\nT11 faults: engine killed → every stream ended in {streams_ended_s:.2f} s, "
            f"/health 503 in {health_s:.2f} s"
        )
    finally:
        engine.shutdown()


async def test_closing_a_request_on_a_dead_engine_never_raises(demo: DemoModel) -> None:
    engine = new_engine(demo)
    stream = engine.generate("late", [1, 2, 3], SamplingParams(max_tokens=4))
    engine.shutdown()
    await stream.aclose()  # in a `finally`, it must not raise EngineDead
