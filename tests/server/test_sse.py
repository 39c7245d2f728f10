"""SSE framing, streamed == non-streamed, errors mid-stream and client disconnects, in process.

httpx2's ASGITransport buffers a streamed body until it ends, so these tests see every frame (several
per response: checked below) but cannot leave mid-stream; the disconnect tests drive the ASGI app with
their own receive/send instead. tests/api repeats the streaming checks over a real socket.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, cast

import httpx2
import openai
import pytest
from fastapi import FastAPI
from starlette.types import Message

from engine import AsyncEngine, RequestOutput, RequestStream, SamplingParams
from engine.demo import DemoModel
from engine.errors import RequestFailed
from server.formats import ChatFormat
from server.generation import Generation
from server.metrics import Histogram, ServerMetrics, StreamObserver
from server.sse import DONE_FRAME, GenerationStreamResponse, event_frames
from tests.server.conftest import BASE, CONSULT, TCM, make_engine, parse_sse, sse_json

pytestmark = pytest.mark.asyncio(loop_scope="module")

ChatBody = Callable[..., dict[str, Any]]


async def test_chat_stream_framing(client: httpx2.AsyncClient, chat_body: ChatBody) -> None:
    body = chat_body(stream=True, stream_options={"include_usage": True}, max_tokens=12)
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events, last = sse_json(response.text)
    assert last == "[DONE]"
    assert len(events) >= 4  # role, at least one delta, finish, usage
    assert {e["id"] for e in events} == {events[0]["id"]} and events[0]["id"].startswith("chatcmpl-")
    assert {e["object"] for e in events} == {"chat.completion.chunk"}
    assert {e["created"] for e in events} == {events[0]["created"]}
    assert {e["model"] for e in events} == {CONSULT}
    assert events[0]["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""}}]
    *deltas, finish, usage = events[1:]
    assert all(set(d["choices"][0]["delta"]) == {"content"} for d in deltas)
    assert finish["choices"] == [{"index": 0, "delta": {}, "finish_reason": "length"}]
    assert usage["choices"] == []
    assert usage["usage"]["completion_tokens"] == 12
    assert usage["usage"]["total_tokens"] == usage["usage"]["prompt_tokens"] + 12


async def test_usage_chunk_only_when_asked(client: httpx2.AsyncClient, chat_body: ChatBody) -> None:
    response = await client.post("/v1/chat/completions", json=chat_body(stream=True))
    events, last = sse_json(response.text)
    assert last == "[DONE]"
    assert all(e["choices"] and "usage" not in e for e in events)


@pytest.mark.parametrize("model", [BASE, CONSULT, TCM])
async def test_streamed_equals_non_streamed(
    client: httpx2.AsyncClient, chat_body: ChatBody, model: str
) -> None:
    body = chat_body(model=model, max_tokens=24)
    whole = (await client.post("/v1/chat/completions", json=body)).json()
    events, _ = sse_json((await client.post("/v1/chat/completions", json={**body, "stream": True})).text)
    streamed = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    assert streamed == whole["choices"][0]["message"]["content"]
    assert events[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]


async def test_completion_stream_framing_and_equality(client: httpx2.AsyncClient) -> None:
    body = {
        "model": TCM,
        "prompt": "<s>问：\n舌苔发白是什么原因？\n答：\n",
        "max_tokens": 16,
        "temperature": 0,
    }
    whole = (await client.post("/v1/completions", json=body)).json()
    assert whole["object"] == "text_completion"
    stream_body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    events, last = sse_json((await client.post("/v1/completions", json=stream_body)).text)
    assert last == "[DONE]"
    assert {e["object"] for e in events} == {"text_completion"}
    *texts, finish, usage = events
    assert len(texts) >= 2
    assert "".join(e["choices"][0]["text"] for e in texts) == whole["choices"][0]["text"]
    assert finish["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]


async def test_n_choices_stream_each_with_role_and_finish(
    client: httpx2.AsyncClient, chat_body: ChatBody
) -> None:
    body = chat_body(n=3, temperature=1.0, seed=7, max_tokens=10)
    whole = (await client.post("/v1/chat/completions", json=body)).json()
    events, _ = sse_json((await client.post("/v1/chat/completions", json={**body, "stream": True})).text)
    for index in range(3):
        mine = [e["choices"][0] for e in events if e["choices"][0]["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert mine[-1]["finish_reason"] == "length"
        text = "".join(c["delta"].get("content", "") for c in mine)
        assert text == whole["choices"][index]["message"]["content"]


async def test_the_sdk_reads_our_stream(oai: openai.AsyncOpenAI) -> None:
    messages: Any = [{"role": "user", "content": "孩子发烧38度，需要去医院吗？"}]
    stream = await oai.chat.completions.create(
        model=TCM, messages=messages, max_tokens=10, temperature=0, stream=True
    )
    chunks = [chunk async for chunk in stream]
    assert len(chunks) >= 3
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    whole = await oai.chat.completions.create(model=TCM, messages=messages, max_tokens=10, temperature=0)
    assert text == whole.choices[0].message.content


# ---- errors mid-stream --------------------------------------------------------------------------------


class _FailingStream:
    """Two outputs, then the engine's per-request failure."""

    def __init__(self) -> None:
        self.request_id = "fake-0"
        self.closed = False
        self._outputs = [RequestOutput("fake-0", "头", [5], 3, 1), RequestOutput("fake-0", "痛", [6], 3, 2)]

    def __aiter__(self) -> _FailingStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._outputs:
            return self._outputs.pop(0)
        raise RequestFailed("CUDA error at 0xdeadbeef in /opt/secret.py")

    async def aclose(self) -> None:
        self.closed = True


async def _frames(job: Generation, include_usage: bool = False) -> list[bytes]:
    return [
        frame async for frame in event_frames(job, ChatFormat(job.request_id, CONSULT, False), include_usage)
    ]


async def test_an_error_mid_stream_is_one_error_event_then_done() -> None:
    stream = _FailingStream()
    job = Generation("chatcmpl-x", [cast(RequestStream, stream)], num_prompt_tokens=3)
    frames = await _frames(job, include_usage=True)
    assert frames[-1] == DONE_FRAME
    payloads = parse_sse(b"".join(frames).decode())
    contents = [json.loads(p)["choices"][0]["delta"].get("content") for p in payloads[1:3]]
    assert contents == ["头", "痛"]
    error = json.loads(payloads[-2])
    assert set(error) == {"error"}
    assert error["error"]["type"] == "server_error" and error["error"]["code"] == "request_failed"
    assert "0xdeadbeef" not in payloads[-2] and "secret" not in payloads[-2]
    assert len(payloads) == 5  # role, 2 deltas, error, [DONE]: no finish and no usage chunk
    assert stream.closed


async def test_a_dying_engine_ends_open_streams_with_an_error(demo: DemoModel) -> None:
    engine = make_engine(demo)
    engine.start()
    params = [SamplingParams(max_tokens=200, ignore_eos=True)]
    job = await Generation.submit(engine, "chatcmpl-dying", [1, 20, 30, 40], params, adapter=CONSULT)
    frames = event_frames(job, ChatFormat(job.request_id, CONSULT, False), include_usage=False)
    received = [await anext(frames), await anext(frames)]  # the role chunk and a first delta
    engine.shutdown()
    received += [frame async for frame in frames]
    assert received[-1] == DONE_FRAME
    error = json.loads(parse_sse(received[-2].decode())[0])
    assert error["error"]["code"] == "engine_dead"
    assert not any(b'"finish_reason"' in frame for frame in received)


# ---- client disconnects -------------------------------------------------------------------------------


async def _call_and_leave(app: FastAPI, path: str, body: dict[str, Any], leave_after: int) -> tuple[int, int]:
    """Drive the ASGI app as a client that disconnects after `leave_after` body chunks (0: at once).
    Returns (status, body chunks received)."""
    gone = asyncio.Event()
    if leave_after == 0:
        gone.set()
    sent_request = False
    status, chunks = 0, 0

    async def receive() -> Message:
        nonlocal sent_request
        if not sent_request:
            sent_request = True
            return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        nonlocal status, chunks
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body" and message.get("body"):
            chunks += 1
            if chunks >= leave_after:
                gone.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"testserver"), (b"content-type", b"application/json")],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
    await app(scope, receive, send)
    return status, chunks


@pytest.fixture
def aborted(engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Request ids the engine was asked to abort during the test."""
    calls: list[str] = []
    original = engine.abort

    def abort(request_id: str) -> None:
        calls.append(request_id)
        original(request_id)

    monkeypatch.setattr(engine, "abort", abort)
    return calls


async def _wait_until_idle(engine: AsyncEngine) -> None:
    for _ in range(500):  # the abort crosses to the engine thread; bounded wait for it to land
        stats = engine.stats()
        if stats.num_running == 0 and stats.num_waiting == 0:
            break
        await asyncio.sleep(0.01)
    stats = engine.stats()
    assert (stats.num_running, stats.num_waiting) == (0, 0)
    assert stats.num_free_blocks == stats.num_total_blocks


async def test_leaving_mid_stream_aborts_the_request(
    app: FastAPI, engine: AsyncEngine, chat_body: ChatBody, aborted: list[str]
) -> None:
    body = chat_body(stream=True, max_tokens=200, ignore_eos=True, n=2)
    status, chunks = await _call_and_leave(app, "/v1/chat/completions", body, leave_after=4)
    assert status == 200 and chunks >= 4
    assert len(aborted) == 2 and all(rid.startswith("chatcmpl-") for rid in aborted)
    await _wait_until_idle(engine)


async def test_leaving_before_a_non_streamed_answer_aborts_it(
    app: FastAPI, engine: AsyncEngine, aborted: list[str]
) -> None:
    body = {"model": CONSULT, "prompt": "问：头痛", "max_tokens": 200, "ignore_eos": True}
    status, _ = await _call_and_leave(app, "/v1/completions", body, leave_after=0)
    assert status == 499
    assert len(aborted) == 1 and aborted[0].startswith("cmpl-")
    await _wait_until_idle(engine)


async def test_a_finished_stream_leaves_the_engine_idle(
    client: httpx2.AsyncClient, engine: AsyncEngine, chat_body: ChatBody
) -> None:
    response = await client.post("/v1/chat/completions", json=chat_body(stream=True, n=2))
    assert response.text.endswith("data: [DONE]\n\n")
    await _wait_until_idle(engine)


# ---- the send timeout ----------------------------------------------------------------------------------


class _EndlessStream:
    """One output every millisecond until closed."""

    def __init__(self) -> None:
        self.request_id = "fake-1"
        self.closed = False
        self._count = 0

    def __aiter__(self) -> _EndlessStream:
        return self

    async def __anext__(self) -> RequestOutput:
        await asyncio.sleep(0.001)
        self._count += 1
        return RequestOutput("fake-1", "头", [5], 3, self._count)

    async def aclose(self) -> None:
        self.closed = True


def _endless_response(
    send_timeout_s: float, ping_s: float = 60.0
) -> tuple[GenerationStreamResponse, _EndlessStream]:
    stream = _EndlessStream()
    job = Generation("chatcmpl-t", [cast(RequestStream, stream)], num_prompt_tokens=3)
    fmt = ChatFormat("chatcmpl-t", CONSULT, False)
    return GenerationStreamResponse(job, fmt, False, ping_s, send_timeout_s), stream


async def _serve(response: GenerationStreamResponse, send: Callable[[Message], Any]) -> None:
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}

    async def receive() -> Message:
        await asyncio.Event().wait()  # the client never leaves
        return {"type": "http.disconnect"}

    await asyncio.wait_for(response(scope, receive, send), 30)


async def test_a_send_that_never_completes_is_cut_within_a_quarter_past_the_timeout() -> None:
    timeout_s, frozen_at = 0.4, []

    async def freezes_at_the_fourth_body(message: Message) -> None:
        if message["type"] == "http.response.body" and len(frozen_at) < 4:
            frozen_at.append(asyncio.get_running_loop().time())
        if len(frozen_at) == 4:
            await asyncio.Event().wait()

    response, stream = _endless_response(timeout_s)
    await _serve(response, freezes_at_the_fourth_body)
    waited = asyncio.get_running_loop().time() - frozen_at[-1]
    assert timeout_s <= waited <= 1.25 * timeout_s + 0.2, waited
    assert response.num_cut == 1 and stream.closed  # the stream's request was closed (aborted)


async def test_sends_slower_than_steps_but_within_the_timeout_are_not_cut() -> None:
    timeout_s, bodies = 0.4, []

    async def slow(message: Message) -> None:
        if message["type"] == "http.response.body":
            bodies.append(message)
            await asyncio.sleep(0.6 * timeout_s)
            if len(bodies) == 4:
                raise OSError("the client went away")  # ends the test after 4 slow sends

    response, stream = _endless_response(timeout_s)
    with pytest.raises(OSError, match="went away"):
        await _serve(response, slow)
    assert len(bodies) == 4 and response.num_cut == 0 and stream.closed


async def test_a_frozen_client_with_a_keep_alive_also_stuck_is_cut_once() -> None:
    """Keep-alives every 50 ms: once the client freezes, the data send and a keep-alive send both wait.
    One is cut; the response ends without an exception (two cuts had left an exception group)."""
    for _ in range(4):
        response, stream = _endless_response(0.3, ping_s=0.05)
        await _serve(response, _freezing_after(4))  # raises if anything escaped
        assert response.num_cut == 1 and stream.closed


def _freezing_after(num_bodies: int) -> Callable[[Message], Any]:
    """A client that takes `num_bodies` body messages, then never takes another."""
    bodies: list[Message] = []

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body":
            bodies.append(message)
            if len(bodies) >= num_bodies:
                await asyncio.Event().wait()

    return send


def test_a_joined_increment_counts_one_gap_per_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """The inter-token histogram gets one sample per token: an increment of three tokens that came 0.3 s
    after the one before counts three gaps of 0.1 s."""
    clock = iter([10.0, 10.1, 10.4])
    monkeypatch.setattr(time, "monotonic", lambda: next(clock))
    observer = StreamObserver()
    metrics = cast(ServerMetrics, SimpleNamespace(itl=Histogram([0.05, 0.15, 1.0])))
    observer.metrics = metrics
    observer.output(0, RequestOutput("r", "头", [5], 3, 1))
    observer.output(0, RequestOutput("r", "痛", [6], 3, 2))
    observer.output(0, RequestOutput("r", "发热了", [7, 8, 9], 3, 5))
    assert metrics.itl.count == 4
    assert metrics.itl.sum == pytest.approx(0.4)
    assert metrics.itl.counts == [0, 4, 0]  # every gap is 0.1 s
