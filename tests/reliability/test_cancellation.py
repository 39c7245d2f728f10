"""T9: clients that leave (streams closed mid-way, queued requests abandoned, non-streamed requests
whose client timed out) have their requests aborted: soon nothing runs or waits, every KV block is
free again (read from /metrics), and a fresh request completes. On a real server, over real sockets.

Figure: disconnect → idle (the request aborted and its blocks freed), p50 / p99 / max.
"""

from __future__ import annotations

import asyncio
import time

import httpx2
import pytest

from tests.reliability.conftest import ServerProcess, chat, long_chat, parse_metrics, percentile

pytestmark = pytest.mark.asyncio(loop_scope="module")

IDLE_TIMEOUT_S = 10.0
NUM_ROUNDS = 6


async def _scrape(client: httpx2.AsyncClient, server: ServerProcess) -> dict[str, float]:
    response = await client.get(server.base_url + "/metrics", headers=server.headers)
    return parse_metrics(response.text)


async def _seconds_until(
    client: httpx2.AsyncClient, server: ServerProcess, running: int, waiting: int
) -> float:
    """Seconds until the server shows this many requests running and waiting (and, when both are 0,
    an empty KV cache); fails after IDLE_TIMEOUT_S."""
    started = time.monotonic()
    while time.monotonic() - started < IDLE_TIMEOUT_S:
        m = await _scrape(client, server)
        counts = (m["vllm:num_requests_running"], m["vllm:num_requests_waiting"])
        if counts == (running, waiting) and (running or waiting or m["vllm:kv_cache_usage_perc"] == 0):
            return time.monotonic() - started
        await asyncio.sleep(0.01)
    pytest.fail(f"not at {running} running / {waiting} waiting after {IDLE_TIMEOUT_S} s: {m}")


class OpenStream:
    """A long stream read until `data_lines` events have come, then left open (its line iterator is
    kept: dropping it would close the response) until `aclose()`."""

    def __init__(self, response: httpx2.Response) -> None:
        self.response = response
        self.lines = response.aiter_lines()

    async def read_events(self, count: int) -> None:
        seen = 0
        while seen < count:
            seen += (await anext(self.lines)).startswith("data: ")

    async def aclose(self) -> None:
        await self.response.aclose()


async def _open_stream(client: httpx2.AsyncClient, server: ServerProcess, data_lines: int) -> OpenStream:
    request = client.build_request(
        "POST", server.base_url + "/v1/chat/completions", json=long_chat(), headers=server.headers
    )
    response = await client.send(request, stream=True)
    assert response.status_code == 200
    stream = OpenStream(response)
    await stream.read_events(data_lines)
    return stream


async def test_clients_that_leave_free_everything(shared_server: ServerProcess) -> None:
    server = shared_server
    latencies: list[float] = []
    async with httpx2.AsyncClient(timeout=30.0) as client:
        # Streams closed mid-way, one at a time.
        for _ in range(NUM_ROUNDS):
            response = await _open_stream(client, server, data_lines=4)
            await response.aclose()
            latencies.append(await _seconds_until(client, server, 0, 0))
        # Two running, three queued behind them; the queued ones are abandoned first.
        running = [await _open_stream(client, server, data_lines=3) for _ in range(2)]
        queued = [await _open_stream(client, server, data_lines=1) for _ in range(3)]  # the role chunk only
        await _seconds_until(client, server, 2, 3)
        for response in queued:
            await response.aclose()
        latencies.append(await _seconds_until(client, server, 2, 0))
        for response in running:
            await response.aclose()
        latencies.append(await _seconds_until(client, server, 0, 0))
        # A non-streamed request whose client gives up.
        with pytest.raises(httpx2.ReadTimeout):
            await client.post(
                server.base_url + "/v1/chat/completions",
                json=long_chat(stream=False),
                headers=server.headers,
                timeout=httpx2.Timeout(30.0, read=0.3),
            )
        latencies.append(await _seconds_until(client, server, 0, 0))
        fresh = await client.post(
            server.base_url + "/v1/chat/completions", json=chat(), headers=server.headers
        )
        assert fresh.status_code == 200 and fresh.json()["choices"][0]["finish_reason"] == "length"
        metrics = await _scrape(client, server)
    assert metrics['vllm:request_success_total{model_name="chatmed-demo-base",finished_reason="abort"}'] >= 12
    ms = [1000 * s for s in latencies]
    print(
        f"\nT9 cancellation: {len(ms)} disconnects → idle p50 {percentile(ms, 50):.0f} ms, "
        f"p99 {percentile(ms, 99):.0f} ms, max {max(ms):.0f} ms (includes the /metrics polling step)"
    )
