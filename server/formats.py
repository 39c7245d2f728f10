"""Engine outputs in OpenAI's shapes: `chat.completion` / `chat.completion.chunk` and `text_completion`.

A format object belongs to one API request (it fixes the id, model name and `created` time of every
chunk, and remembers per-choice text offsets). The SSE loop (server/sse.py) and the non-streamed
response (server/routes/respond.py) ask it for chunks and bodies; they know nothing of either shape.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol

from pydantic import BaseModel

from engine import RequestOutput, TokenLogprob
from server.generation import Choice
from server.protocol import (
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionMessage,
    ChatCompletionResponse,
    ChatCompletionTokenLogprob,
    ChoiceLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    DeltaMessage,
    TopLogprob,
    UsageInfo,
)


class OutputFormat(Protocol):
    """What the stream loop and the non-streamed path need from an API's output shape."""

    def opening(self, index: int) -> BaseModel | None: ...

    def chunks(self, index: int, output: RequestOutput) -> list[BaseModel]: ...

    def usage_chunk(self, usage: UsageInfo) -> BaseModel: ...

    def response(self, choices: Sequence[Choice], usage: UsageInfo) -> BaseModel: ...


def usage_info(num_prompt_tokens: int, num_completion_tokens: int) -> UsageInfo:
    """The prompt is counted once however many choices share it (as OpenAI does)."""
    return UsageInfo(
        prompt_tokens=num_prompt_tokens,
        completion_tokens=num_completion_tokens,
        total_tokens=num_prompt_tokens + num_completion_tokens,
    )


def _utf8(text: str) -> list[int]:
    return list(text.encode("utf-8", errors="replace"))


def chat_logprobs(logprobs: Sequence[TokenLogprob]) -> ChoiceLogprobs:
    return ChoiceLogprobs(
        content=[
            ChatCompletionTokenLogprob(
                token=lp.token,
                logprob=lp.logprob,
                bytes=_utf8(lp.token),
                top_logprobs=[
                    TopLogprob(token=text, logprob=value, bytes=_utf8(text)) for _, text, value in lp.top
                ],
            )
            for lp in logprobs
        ]
    )


class ChatFormat:
    """`chat.completion` bodies and `chat.completion.chunk` frames of one request."""

    def __init__(self, request_id: str, model: str, logprobs: bool) -> None:
        self.request_id = request_id
        self.model = model
        self.logprobs = logprobs
        self.created = int(time.time())

    def _chunk(self, choice: ChatCompletionChunkChoice) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.request_id, created=self.created, model=self.model, choices=[choice]
        )

    def opening(self, index: int) -> BaseModel | None:
        return self._chunk(
            ChatCompletionChunkChoice(index=index, delta=DeltaMessage(role="assistant", content=""))
        )

    def chunks(self, index: int, output: RequestOutput) -> list[BaseModel]:
        """A content delta (when there is text or logprobs), then a finish chunk on the last output."""
        result: list[BaseModel] = []
        logprobs = chat_logprobs(output.logprobs) if self.logprobs and output.logprobs else None
        if output.text or logprobs is not None:
            delta = DeltaMessage(content=output.text)
            result.append(self._chunk(ChatCompletionChunkChoice(index=index, delta=delta, logprobs=logprobs)))
        if output.finish_reason is not None:
            finish = ChatCompletionChunkChoice(
                index=index, delta=DeltaMessage(), finish_reason=str(output.finish_reason)
            )
            result.append(self._chunk(finish))
        return result

    def usage_chunk(self, usage: UsageInfo) -> BaseModel:
        return ChatCompletionChunk(
            id=self.request_id, created=self.created, model=self.model, choices=[], usage=usage
        )

    def response(self, choices: Sequence[Choice], usage: UsageInfo) -> BaseModel:
        return ChatCompletionResponse(
            id=self.request_id,
            created=self.created,
            model=self.model,
            choices=[
                ChatCompletionChoice(
                    index=choice.index,
                    message=ChatCompletionMessage(content=choice.text),
                    logprobs=chat_logprobs(choice.logprobs) if self.logprobs else None,
                    finish_reason=choice.finish_reason,
                )
                for choice in choices
            ],
            usage=usage,
        )


class CompletionFormat:
    """`text_completion` bodies and chunks of one request; `logprobs` is the request's integer."""

    def __init__(self, request_id: str, model: str, logprobs: int | None, n: int) -> None:
        self.request_id = request_id
        self.model = model
        self.logprobs = logprobs
        self.created = int(time.time())
        self._text_offsets = [0] * n  # per choice: characters already sent, for logprobs.text_offset

    def _completion_logprobs(self, index: int, logprobs: Sequence[TokenLogprob]) -> CompletionLogprobs:
        result = CompletionLogprobs()
        for lp in logprobs:
            result.tokens.append(lp.token)
            result.token_logprobs.append(lp.logprob)
            result.top_logprobs.append({text: value for _, text, value in lp.top} if self.logprobs else None)
            result.text_offset.append(self._text_offsets[index])
            self._text_offsets[index] += len(lp.token)
        return result

    def _chunk(self, choice: CompletionChoice) -> CompletionResponse:
        return CompletionResponse(
            id=self.request_id, created=self.created, model=self.model, choices=[choice]
        )

    def opening(self, index: int) -> BaseModel | None:
        return None  # text completions have no role chunk

    def chunks(self, index: int, output: RequestOutput) -> list[BaseModel]:
        result: list[BaseModel] = []
        has_logprobs = self.logprobs is not None and bool(output.logprobs)
        if output.text or has_logprobs:
            logprobs = self._completion_logprobs(index, output.logprobs or ()) if has_logprobs else None
            result.append(self._chunk(CompletionChoice(index=index, text=output.text, logprobs=logprobs)))
        if output.finish_reason is not None:
            result.append(
                self._chunk(CompletionChoice(index=index, text="", finish_reason=str(output.finish_reason)))
            )
        return result

    def usage_chunk(self, usage: UsageInfo) -> BaseModel:
        return CompletionResponse(
            id=self.request_id, created=self.created, model=self.model, choices=[], usage=usage
        )

    def response(self, choices: Sequence[Choice], usage: UsageInfo) -> BaseModel:
        return CompletionResponse(
            id=self.request_id,
            created=self.created,
            model=self.model,
            choices=[
                CompletionChoice(
                    index=choice.index,
                    text=choice.text,
                    logprobs=self._completion_logprobs(choice.index, choice.logprobs)
                    if self.logprobs is not None
                    else None,
                    finish_reason=choice.finish_reason,
                )
                for choice in choices
            ],
            usage=usage,
        )
