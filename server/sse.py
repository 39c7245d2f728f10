"""Engine outputs → Server-Sent Events: `data: {json}\\n\\n` frames, then `data: [DONE]\\n\\n`.

Why sse-starlette's EventSourceResponse rather than a bare StreamingResponse: it sends keep-alive
comments (`: ping ...`) on idle streams (a request waiting in the queue or in a long prefill would
otherwise look dead to proxies), it watches for the client's disconnect in its own task on every ASGI
server, it closes the frame iterator when a send fails, and it has the per-send timeout that a later
issue will use against frozen readers (`send_timeout_s`, off for now). Frames are yielded as bytes,
which it sends unchanged, so the wire format is exactly ours. OpenAI clients skip comment lines.

However the stream ends (finished, error, client gone, server stopping), the engine requests are
closed, which aborts those still running and frees their KV blocks.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator

from pydantic import BaseModel
from sse_starlette import EventSourceResponse
from starlette.types import Receive, Scope, Send

from server.errors import error_body, error_kind, log_unexpected
from server.formats import OutputFormat, usage_info
from server.generation import Generation

logger = logging.getLogger(__name__)

DONE_FRAME = b"data: [DONE]\n\n"


def encode_frame(payload: BaseModel) -> bytes:
    """One SSE event. pydantic's JSON has no raw newlines, so the payload is a single `data:` line;
    fields that are None are left out, as OpenAI's chunks do."""
    return b"data: " + payload.model_dump_json(exclude_none=True).encode("utf-8") + b"\n\n"


async def event_frames(job: Generation, fmt: OutputFormat, include_usage: bool) -> AsyncGenerator[bytes]:
    """Every frame of one streamed response. An error mid-stream becomes one error event; `[DONE]`
    always comes last, unless the client has gone."""
    try:
        async for frame in _content_frames(job, fmt, include_usage):
            yield frame
    except Exception as exc:
        if error_kind(exc).status == 500:
            log_unexpected(exc, job.request_id)
        else:
            logger.warning("request %s ended early: %s", job.request_id, type(exc).__name__)
        yield encode_frame(error_body(exc))
    finally:
        await job.close()
    yield DONE_FRAME


async def _content_frames(job: Generation, fmt: OutputFormat, include_usage: bool) -> AsyncGenerator[bytes]:
    for index in range(job.n):
        opening = fmt.opening(index)
        if opening is not None:
            yield encode_frame(opening)
    num_output_tokens = [0] * job.n
    async with contextlib.aclosing(job.outputs()) as outputs:
        async for index, output in outputs:
            num_output_tokens[index] = output.num_output_tokens
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
        send_timeout_s: float | None = None,  # frozen readers: a later issue sets this
    ) -> None:
        super().__init__(
            event_frames(job, fmt, include_usage),
            ping=ping_s,
            sep="\n",
            send_timeout=send_timeout_s,
        )
        self._job = job

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._job.close()
