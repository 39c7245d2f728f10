"""Engine outputs → Server-Sent Events: `data: {json}\\n\\n` frames, then `data: [DONE]\\n\\n`.

Why sse-starlette's EventSourceResponse rather than a bare StreamingResponse: it sends keep-alive
comments (`: ping ...`) on idle streams (a request waiting in the queue or in a long prefill would
otherwise look dead to proxies), it watches for the client's disconnect in its own task on every ASGI
server, it closes the frame iterator when a send fails, and it has a per-send timeout, which cuts a
client that stopped reading (`--send-timeout-s`). Frames are yielded as bytes, which it sends
unchanged, so the wire format is exactly ours. OpenAI clients skip comment lines.

However the stream ends (finished, error, client gone, frozen reader cut, server stopping), the engine
requests are closed, which aborts those still running and frees their KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator

from pydantic import BaseModel
from sse_starlette import EventSourceResponse
from sse_starlette.sse import SendTimeoutError
from starlette.types import Message, Receive, Scope, Send

from server.errors import error_body, error_kind, log_unexpected
from server.formats import OutputFormat, usage_info
from server.generation import Generation
from server.metrics import ServerMetrics, StreamObserver

logger = logging.getLogger(__name__)

DONE_FRAME = b"data: [DONE]\n\n"


def encode_frame(payload: BaseModel) -> bytes:
    """One SSE event. pydantic's JSON has no raw newlines, so the payload is a single `data:` line;
    fields that are None are left out, as OpenAI's chunks do."""
    return b"data: " + payload.model_dump_json(exclude_none=True).encode("utf-8") + b"\n\n"


async def event_frames(
    job: Generation, fmt: OutputFormat, include_usage: bool, observer: StreamObserver | None = None
) -> AsyncGenerator[bytes]:
    """Every frame of one streamed response. An error mid-stream becomes one error event; `[DONE]`
    always comes last, unless the client has gone."""
    observer = observer or StreamObserver()
    failed = False
    try:
        async for frame in _content_frames(job, fmt, include_usage, observer):
            yield frame
    except Exception as exc:
        failed = True
        if error_kind(exc).status == 500:
            log_unexpected(exc, job.request_id)
        else:
            logger.warning("request %s ended early: %s", job.request_id, type(exc).__name__)
        # Whole, nulls included: the same {"message", "type", "param", "code"} as every error body.
        yield b"data: " + error_body(exc).model_dump_json().encode("utf-8") + b"\n\n"
    finally:
        observer.close(job.n, failed)
        await job.close()
    yield DONE_FRAME


async def _content_frames(
    job: Generation, fmt: OutputFormat, include_usage: bool, observer: StreamObserver
) -> AsyncGenerator[bytes]:
    for index in range(job.n):
        opening = fmt.opening(index)
        if opening is not None:
            yield encode_frame(opening)
    num_output_tokens = [0] * job.n
    async with contextlib.aclosing(job.outputs()) as outputs:
        async for index, output in outputs:
            num_output_tokens[index] = output.num_output_tokens
            observer.output(index, output)
            for chunk in fmt.chunks(index, output):
                yield encode_frame(chunk)
    if include_usage:
        yield encode_frame(fmt.usage_chunk(usage_info(job.num_prompt_tokens, sum(num_output_tokens))))


class GenerationStreamResponse(EventSourceResponse):
    """An EventSourceResponse over `event_frames` that closes its Generation when the response ends,
    however it ends: the frame generator's own `finally` covers the usual paths, this covers a
    response cancelled before the generator ever ran."""

    def __init__(
        self,
        job: Generation,
        fmt: OutputFormat,
        include_usage: bool,
        ping_s: float,
        send_timeout_s: float | None = None,  # None: the app's --send-timeout-s
    ) -> None:
        self._observer = StreamObserver()
        self._sending: dict[asyncio.Task[object], float] = {}  # the sends under way: since when
        self._watchdog: asyncio.TimerHandle | None = None
        self._cut: set[asyncio.Task[object]] = set()
        self.num_cut = 0
        super().__init__(
            event_frames(job, fmt, include_usage, self._observer),
            ping=ping_s,
            sep="\n",
            send_timeout=send_timeout_s,
        )
        self._job = job

    async def _send_with_timeout(self, send: Send, message: Message) -> None:
        """One ASGI send, cut (SendTimeoutError) when it has not completed within the send timeout.

        sse-starlette opens a cancel scope around every send, which was a third of this layer's CPU per
        streamed token (bench/README.md, "The event loop's cost per token"). Here a send only notes when
        it started; one timer per stream checks every quarter of the timeout and cancels a send that
        has waited longer than the timeout, so a frozen reader is cut after 1 to 1.25 timeouts."""
        if self.send_timeout is None:
            await send(message)
            return
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        if self._watchdog is None:
            self._watchdog = loop.call_later(self.send_timeout / 4, self._watch, loop)
        self._sending[task] = loop.time()
        cut = False
        try:
            await send(message)
        except asyncio.CancelledError:
            if task not in self._cut:
                raise  # cancelled by something else: the client left, the stream ended
        finally:
            self._sending.pop(task, None)
            if task in self._cut:  # the watchdog's cancel, however the send ended
                self._cut.discard(task)
                task.uncancel()
                cut = True
        if cut:
            raise SendTimeoutError()

    def _watch(self, loop: asyncio.AbstractEventLoop) -> None:
        """Cut the send that has waited longest, if past the timeout. One at a time: the data and the
        keep-alive task may both be stuck on a frozen client, and one SendTimeoutError ends the
        response (two would leave its task group as an exception group)."""
        assert self.send_timeout is not None
        if not self._cut and self._sending:
            task, since = min(self._sending.items(), key=lambda item: item[1])
            if loop.time() - since >= self.send_timeout:
                self._cut.add(task)
                self.num_cut += 1
                task.cancel()
        self._watchdog = loop.call_later(self.send_timeout / 4, self._watch, loop)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        metrics, send_timeout_s = _from_app(scope)
        self._observer.metrics = metrics
        if self.send_timeout is None:
            self.send_timeout = send_timeout_s
        try:
            await super().__call__(scope, receive, send)
        except SendTimeoutError:
            # The client stopped reading: its request is aborted (the frame generator was closed) and
            # the connection is dropped, since the response cannot be completed.
            logger.warning("request %s: client stopped reading; stream cut", self._job.request_id)
        finally:
            if self._watchdog is not None:
                self._watchdog.cancel()
            await self._job.close()


def _from_app(scope: Scope) -> tuple[ServerMetrics | None, float | None]:
    """The app's metrics and send timeout: the routes build the response without them, and the scope
    holds the app. (None, None) outside an app made by create_app."""
    state = getattr(scope.get("app"), "state", None)
    metrics = getattr(state, "metrics", None)
    settings = getattr(getattr(state, "chatmed", None), "settings", None)
    send_timeout_s = getattr(settings, "send_timeout_s", None)
    return (metrics if isinstance(metrics, ServerMetrics) else None), send_timeout_s
