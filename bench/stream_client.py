"""One streamed OpenAI chat completion over HTTP, timed: our own SSE parser, no SDK in the way.

The SDKs hide when each byte arrives; a load generator needs exactly that, so this module reads the
raw `text/event-stream` body and stamps every content delta with time.monotonic().
"""

from __future__ import annotations

import codecs
import itertools
import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx2

MAX_ERROR_CHARS = 300


@dataclass(frozen=True)
class SSEEvent:
    """One dispatched server-sent event: its `event` name ("message" by default) and joined data."""

    event: str
    data: str


class SSEParser:
    """Incremental text/event-stream parser (the WHATWG rules that matter for OpenAI streams).

    Feed it byte chunks as they arrive, split anywhere (inside a UTF-8 character or a CRLF); it returns
    the events completed by each chunk. Lines end in LF, CRLF or CR; `data:` lines of one event are
    joined with LF; comment lines (starting with ':') and unknown fields are ignored.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buffer = ""
        self._event = ""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        self._buffer += self._decoder.decode(chunk)
        return self._drain(final=False)

    def close(self) -> list[SSEEvent]:
        """Flush what is left at the end of the body (a last event without its blank line)."""
        self._buffer += self._decoder.decode(b"", final=True)
        events = self._drain(final=True)
        if self._buffer:
            events.extend(self._line(self._buffer))
            self._buffer = ""
        events.extend(self._dispatch())
        return events

    def _drain(self, final: bool) -> list[SSEEvent]:
        events: list[SSEEvent] = []
        while True:
            cut = _line_end(self._buffer, final)
            if cut is None:
                return events
            end, next_start = cut
            line = self._buffer[:end]
            self._buffer = self._buffer[next_start:]
            events.extend(self._line(line))

    def _line(self, line: str) -> list[SSEEvent]:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return []
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        return []

    def _dispatch(self) -> list[SSEEvent]:
        if not self._data:
            self._event = ""
            return []
        event = SSEEvent(event=self._event or "message", data="\n".join(self._data))
        self._event = ""
        self._data = []
        return [event]


def _line_end(buffer: str, final: bool) -> tuple[int, int] | None:
    """(end of the first line, start of the next) or None while no full line is buffered."""
    for i, char in enumerate(buffer):
        if char == "\n":
            return i, i + 1
        if char == "\r":
            if i + 1 < len(buffer):
                return i, i + 2 if buffer[i + 1] == "\n" else i + 1
            # A CR at the end may be the first half of a CRLF still in flight.
            return (i, i + 1) if final else None
    return None


@dataclass
class RequestRecord:
    """What one request measured. Times are time.monotonic() seconds; durations are seconds."""

    index: int
    model: str
    sent_s: float = 0.0
    ok: bool = False
    error: str | None = None
    first_token_s: float | None = None
    done_s: float | None = None
    content_times_s: list[float] = field(default_factory=list)
    num_content_chunks: int = 0
    usage_output_tokens: int | None = None
    prompt_tokens: int | None = None
    finish_reason: str | None = None
    cut: bool = False  # cancelled by the load generator at the end of a bounded run, not a failure

    @property
    def output_tokens(self) -> int:
        """Tokens from the usage chunk when the server sent one, else the count of content deltas."""
        if self.usage_output_tokens is not None:
            return self.usage_output_tokens
        return self.num_content_chunks

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.sent_s

    @property
    def e2e_s(self) -> float | None:
        return None if self.done_s is None else self.done_s - self.sent_s

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first; None unless content came in 2+ chunks.

        A server that sends the whole answer in one chunk has no measurable per-token time.
        """
        if self.ttft_s is None or self.e2e_s is None or self.num_content_chunks < 2 or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    def inter_chunk_s(self) -> list[float]:
        """Gaps between successive content deltas (inter-token latency when one token per chunk)."""
        times = self.content_times_s
        return [later - earlier for earlier, later in itertools.pairwise(times)]


async def stream_chat(
    client: httpx2.AsyncClient,
    url: str,
    body: dict[str, Any],
    record: RequestRecord,
    headers: dict[str, str] | None = None,
) -> RequestRecord:
    """POST one streaming chat completion and fill `record` as the bytes arrive. Never raises for
    HTTP or protocol failures: they end up in record.error, so one bad request cannot stop a run."""
    record.sent_s = time.monotonic()
    try:
        async with client.stream("POST", url, json=body, headers=headers) as response:
            if response.status_code != 200:
                raw = await response.aread()
                record.error = f"HTTP {response.status_code}: {_error_message(raw)}"
                return record
            await _read_stream(response, record)
    except httpx2.HTTPError as exc:
        record.error = f"{type(exc).__name__}: {str(exc)[:MAX_ERROR_CHARS]}"
    finally:
        record.done_s = time.monotonic()
    return record


async def _read_stream(response: httpx2.Response, record: RequestRecord) -> None:
    parser = SSEParser()
    finished = False
    async for chunk in response.aiter_bytes():
        now = time.monotonic()
        for event in parser.feed(chunk):
            finished = _apply_event(event, record, now) or finished
            if record.error is not None:
                return
    for event in parser.close():
        finished = _apply_event(event, record, time.monotonic()) or finished
    if record.error is None and not finished:
        record.error = "stream ended without finish_reason or [DONE]"
    record.ok = record.error is None


def _apply_event(event: SSEEvent, record: RequestRecord, now: float) -> bool:
    """Update the record with one event; True when the event ends the stream ([DONE] or a finish)."""
    if event.data.strip() == "[DONE]":
        return True
    try:
        payload = json.loads(event.data)
    except json.JSONDecodeError:
        record.error = f"bad SSE data: {event.data[:MAX_ERROR_CHARS]!r}"
        return False
    if not isinstance(payload, dict):
        record.error = "SSE data is not a JSON object"
        return False
    if event.event == "error" or "error" in payload:
        record.error = f"error event: {_error_message(json.dumps(payload).encode())}"
        return False
    usage = payload.get("usage")
    if isinstance(usage, dict):
        record.usage_output_tokens = _int_or_none(usage.get("completion_tokens"))
        record.prompt_tokens = _int_or_none(usage.get("prompt_tokens"))
    finished = False
    for choice in payload.get("choices") or []:
        content = (choice.get("delta") or {}).get("content")
        if content:
            if record.first_token_s is None:
                record.first_token_s = now
            record.content_times_s.append(now)
            record.num_content_chunks += 1
        if choice.get("finish_reason"):
            record.finish_reason = str(choice["finish_reason"])
            finished = True
    return finished


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _error_message(raw: bytes) -> str:
    """The OpenAI error message of a body when it has one, else the start of the body."""
    text = raw.decode("utf-8", errors="replace")
    try:
        payload = json.loads(text)
    except json.JSONDecodeError:
        return text[:MAX_ERROR_CHARS]
    if isinstance(payload, dict):
        error = payload.get("error", payload.get("detail"))
        if isinstance(error, dict) and "message" in error:
            return str(error["message"])[:MAX_ERROR_CHARS]
        if error is not None:
            return str(error)[:MAX_ERROR_CHARS]
    return text[:MAX_ERROR_CHARS]
