"""T4 (hypothesis), through the server's own stream path: random Chinese text is tokenized, its ids are
turned into engine increments the way the engine does it (incremental detokenizer, then the stop
checker), and those go through `event_frames` as a chat stream. Properties: every frame is one
`data:` line of JSON and the last is `[DONE]`; the streamed deltas joined equal the full decode (cut at
the first stop string); a stop string, however the tokens split it, never reaches the client.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import FinishReason, RequestOutput, RequestStream, Tokenizer
from engine.demo import DemoModel
from engine.tokenizer import IncrementalDetokenizer, StopChecker
from server.formats import ChatFormat
from server.generation import Generation
from server.sse import DONE_FRAME, event_frames
from tests.server.conftest import CONSULT, parse_sse

pytestmark = pytest.mark.asyncio(loop_scope="module")

CHINESE = st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF)
COMMON = st.sampled_from(list("头痛发热咳嗽中医气血阴阳舌苔，。！？：\n ab12"))
TEXTS = st.text(alphabet=st.one_of(CHINESE, COMMON), min_size=1, max_size=60)


@pytest.fixture(scope="module")
def tok(demo: DemoModel) -> Tokenizer:
    return Tokenizer(Path(demo.base_path))


class ScriptedStream:
    """A request's increments, made ahead of time."""

    def __init__(self, outputs: list[RequestOutput]) -> None:
        self.request_id = "prop-0"
        self._outputs = outputs

    def __aiter__(self) -> ScriptedStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if not self._outputs:
            raise StopAsyncIteration
        return self._outputs.pop(0)

    async def aclose(self) -> None:
        self._outputs.clear()


def increments(tok: Tokenizer, ids: list[int], stops: tuple[str, ...]) -> list[RequestOutput]:
    """What the engine sends for these output ids: text deltas, stop strings held back and cut."""
    detokenizer, checker = IncrementalDetokenizer(tok, []), StopChecker(stops)
    outputs = []
    for count, token_id in enumerate(ids, start=1):
        text, matched = checker.push(detokenizer.push(token_id))
        finish = FinishReason.STOP if matched is not None else None
        if finish is None and count == len(ids):
            tail, matched = checker.push(detokenizer.flush())
            text += tail if matched is not None else tail + checker.flush()
            finish = FinishReason.STOP if matched is not None else FinishReason.LENGTH
        outputs.append(RequestOutput("prop-0", text, [token_id], 3, count, finish))
        if finish is not None:
            break
    return outputs


async def streamed_text(outputs: list[RequestOutput]) -> tuple[str, list[str]]:
    job = Generation("chatcmpl-prop", [cast(RequestStream, ScriptedStream(outputs))], num_prompt_tokens=3)
    frames = [f async for f in event_frames(job, ChatFormat("chatcmpl-prop", CONSULT, False), True)]
    assert frames[-1] == DONE_FRAME
    payloads = parse_sse(b"".join(frames).decode("utf-8"))
    assert payloads[-1] == "[DONE]"
    events = [json.loads(payload) for payload in payloads[:-1]]
    deltas = [e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"]]
    reasons = [e["choices"][0].get("finish_reason") for e in events if e["choices"]]
    return "".join(deltas), [r for r in reasons if r]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXTS)
async def test_streamed_deltas_join_to_the_full_decode(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text, add_bos=False)
    joined, reasons = await streamed_text(increments(tok, ids, ()))
    assert joined == tok.decode(ids)
    assert reasons == ["length"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXTS, data=st.data())
async def test_stop_strings_split_across_tokens_never_leak(
    tok: Tokenizer, text: str, data: st.DataObject
) -> None:
    full = tok.decode(tok.encode(text, add_bos=False))
    start = data.draw(st.integers(0, len(full) - 1), label="start")
    stop = full[start : start + data.draw(st.integers(1, 4), label="length")]
    ids = tok.encode(text, add_bos=False)
    joined, reasons = await streamed_text(increments(tok, ids, (stop,)))
    assert stop not in joined
    assert joined == full[: full.find(stop)]
    assert reasons == ["stop"]
