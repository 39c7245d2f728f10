"""T10: a slow reader and a frozen reader do not hold up the other streams; the frozen one is cut after
the send timeout, and its request is aborted in the engine.

Figures: when the frozen stream was cut, and how long the other streams took beside it.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from engine import AsyncEngine
from tests.reliability.conftest import AsgiCall, chat, long_chat, wait_until_idle
from tests.server.conftest import make_app, parse_sse

pytestmark = pytest.mark.asyncio(loop_scope="module")

SEND_TIMEOUT_S = 0.5
TIMEOUT_S = 60.0


class SlowCall(AsgiCall):
    """A reader that takes 20 ms over every chunk."""

    async def _send(self, message: dict[str, object]) -> None:  # type: ignore[override]
        await asyncio.sleep(0.02)
        await super()._send(message)


async def _timed(call: AsgiCall) -> float:
    started = time.monotonic()
    await call.run()
    return time.monotonic() - started


async def test_a_frozen_reader_is_cut_and_the_others_go_on(engine: AsyncEngine) -> None:
    app = make_app(engine, send_timeout_s=SEND_TIMEOUT_S)
    path = "/v1/chat/completions"
    frozen = AsgiCall(app, path, long_chat(), freeze_after=3)
    slow = SlowCall(app, path, chat(max_tokens=40, stream=True))
    normal = [AsgiCall(app, path, chat(max_tokens=60, stream=True)) for _ in range(3)]
    frozen_task = asyncio.create_task(_timed(frozen))
    await asyncio.wait_for(frozen.first_chunk.wait(), TIMEOUT_S)
    others_s = await asyncio.wait_for(asyncio.gather(*(_timed(call) for call in [slow, *normal])), TIMEOUT_S)
    frozen_s = await asyncio.wait_for(frozen_task, TIMEOUT_S)
    for call in [slow, *normal]:
        payloads = parse_sse(call.text)
        assert call.status == 200 and call.completed and payloads[-1] == "[DONE]"
        assert '"finish_reason":"length"' in payloads[-2]
    assert frozen.status == 200 and not frozen.completed and len(frozen.chunks) == 3
    await wait_until_idle(engine)  # the frozen reader's request was aborted, its blocks freed
    print(
        f"\nT10 readers: frozen stream cut after {frozen_s:.2f} s (send timeout {SEND_TIMEOUT_S} s); "
        f"slow reader {others_s[0]:.2f} s; other streams {max(others_s[1:]):.2f} s at most"
    )


async def test_without_a_frozen_reader_nothing_is_cut(engine: AsyncEngine) -> None:
    app = make_app(engine, send_timeout_s=SEND_TIMEOUT_S)
    call = await asyncio.wait_for(
        SlowCall(app, "/v1/chat/completions", chat(max_tokens=30, stream=True)).run(), TIMEOUT_S
    )
    assert call.completed and parse_sse(call.text)[-1] == "[DONE]"
