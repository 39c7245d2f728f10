"""T8: more requests than running seats plus queue → the excess is refused at once with 429,
Retry-After and OpenAI's body, before its body is read; /health is never refused.

Figures: accepted / refused / timeouts, and the refusal latency (p50, p99, max).
"""

from __future__ import annotations

import asyncio
import time

import pytest

from engine.demo import DemoModel
from tests.reliability.conftest import AsgiCall, chat, long_chat, new_engine, percentile, wait_until_idle
from tests.server.conftest import asgi_client, make_app

pytestmark = pytest.mark.asyncio(loop_scope="function")

MAX_NUM_SEQS, MAX_QUEUED = 2, 2
NUM_EXCESS = 12
TIMEOUT_S = 60.0


async def _until(condition: object, timeout_s: float = TIMEOUT_S) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def test_the_excess_is_refused_at_once_and_health_stays_open(demo: DemoModel) -> None:
    engine = new_engine(demo, max_num_seqs=MAX_NUM_SEQS, max_queued_requests=MAX_QUEUED)
    engine.start()
    try:
        app = make_app(engine, max_num_seqs=MAX_NUM_SEQS, max_queued_requests=MAX_QUEUED)
        # Seats first, then the queue: the engine counts a request as waiting until it is scheduled.
        held = [AsgiCall(app, "/v1/chat/completions", long_chat()) for _ in range(MAX_NUM_SEQS + MAX_QUEUED)]
        held_tasks = [asyncio.create_task(call.run()) for call in held[:MAX_NUM_SEQS]]
        await _until(lambda: engine.stats().num_running == MAX_NUM_SEQS)
        held_tasks += [asyncio.create_task(call.run()) for call in held[MAX_NUM_SEQS:]]
        await _until(lambda: engine.stats().num_waiting == MAX_QUEUED)

        async def refused_call(stream: bool) -> tuple[AsgiCall, float]:
            started = time.perf_counter()
            call = await AsgiCall(app, "/v1/chat/completions", chat(stream=stream)).run()
            return call, time.perf_counter() - started

        async with asgi_client(app) as client:
            health = asyncio.gather(*(client.get("/health") for _ in range(10)))
            excess = asyncio.gather(*(refused_call(i % 2 == 0) for i in range(NUM_EXCESS)))
            health_responses, refusals = await asyncio.wait_for(asyncio.gather(health, excess), TIMEOUT_S)
            assert [r.status_code for r in health_responses] == [200] * 10
            for call, _ in refusals:
                assert call.status == 429 and call.completed
                assert call.response_headers[b"retry-after"] == b"1"
                assert '"code":"queue_full"' in call.text and '"type":"rate_limit_error"' in call.text
            # Nothing of the excess reached the engine.
            assert engine.stats().num_waiting == MAX_QUEUED
            metrics = (await client.get("/metrics")).text
            assert 'chatmed:requests_refused_total{reason="queue_full"} 12' in metrics

            for call in held:
                call.left.set()
            await asyncio.wait_for(asyncio.gather(*held_tasks), TIMEOUT_S)
            await wait_until_idle(engine)
            fresh = await client.post("/v1/chat/completions", json=chat())
            assert fresh.status_code == 200
        latencies_ms = [1000 * seconds for _, seconds in refusals]
        print(
            f"\nT8 backpressure: accepted {len(held)}, refused {len(refusals)}, timeouts 0; "
            f"refusal latency p50 {percentile(latencies_ms, 50):.1f} ms, "
            f"p99 {percentile(latencies_ms, 99):.1f} ms, max {max(latencies_ms):.1f} ms"
        )
    finally:
        engine.shutdown()


async def test_a_request_with_many_choices_meets_the_engine_queue_bound(demo: DemoModel) -> None:
    # One API request, four engine requests: the door lets it in, the engine's queue bound refuses it.
    engine = new_engine(demo, max_num_seqs=1, max_queued_requests=2)
    try:  # not started: nothing leaves the waiting queue
        app = make_app(engine, max_num_seqs=1, max_queued_requests=2, max_n=8)
        async with asgi_client(app) as client:
            response = await client.post("/v1/chat/completions", json=chat(n=4))
        assert response.status_code == 429 and response.headers["retry-after"] == "1"
        assert engine.stats().num_waiting == 0  # the choices queued before the refusal were withdrawn
    finally:
        engine.shutdown()
