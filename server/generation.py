"""From a validated request to engine requests and back: refusing what we cannot honour, prompt ids,
sampling parameters with the model's defaults, the n engine requests behind one API request, and
their outputs merged by choice index.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncGenerator, Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

from fastapi import Request

from engine import AsyncEngine, RequestOutput, RequestStream, SamplingParams, TokenLogprob
from engine.errors import EngineDead, InvalidRequest, PromptTooLong
from server.protocol import ChatCompletionRequest, CompletionRequest, SamplingRequest
from server.registry import GenerationDefaults, ServedModel

logger = logging.getLogger(__name__)

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client closed the connection before its answer was ready."""


# ---- what we refuse ----------------------------------------------------------------------------------


def _unsupported(param: str, what: str = "is not supported by this server") -> InvalidRequest:
    return InvalidRequest(f"'{param}' {what}.", param=param)


def check_common(request: SamplingRequest, max_n: int) -> None:
    if request.n > max_n:
        raise InvalidRequest(f"'n' must be at most {max_n}.", param="n")
    if request.logit_bias:
        raise _unsupported("logit_bias")


def check_chat_request(request: ChatCompletionRequest, max_n: int) -> None:
    """Raise InvalidRequest naming the first parameter the server cannot honour."""
    check_common(request, max_n)
    refused = {
        "tools": bool(request.tools),
        "tool_choice": request.tool_choice not in (None, "none"),
        "functions": bool(request.functions),
        "function_call": request.function_call not in (None, "none"),
        "response_format": request.response_format is not None and request.response_format.type != "text",
        "audio": request.audio is not None,
        "modalities": request.modalities not in (None, ["text"]),
        "prediction": request.prediction is not None,
    }
    for param, is_refused in refused.items():
        if is_refused:
            raise _unsupported(param)
    if request.top_logprobs is not None and not request.logprobs:
        raise InvalidRequest("'top_logprobs' needs 'logprobs' set to true.", param="top_logprobs")


def check_completion_request(request: CompletionRequest, max_n: int) -> None:
    check_common(request, max_n)
    if request.echo:
        raise _unsupported("echo")
    if request.suffix:
        raise _unsupported("suffix")
    if request.best_of is not None and request.best_of > request.n:
        raise _unsupported("best_of", "greater than 'n' is not supported by this server")


# ---- prompt ids --------------------------------------------------------------------------------------


def chat_prompt_ids(engine: AsyncEngine, model: ServedModel, request: ChatCompletionRequest) -> list[int]:
    """The model's chat template over the messages (one BOS); a conversation the template refuses
    raises InvalidRequest naming `messages`. OpenAI's newer `developer` role is a system message."""
    messages = [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in request.messages
    ]
    return engine.tokenizer.encode_chat(messages, model.chat_template)


def completion_prompt_ids(engine: AsyncEngine, request: CompletionRequest) -> list[int]:
    """A string is encoded with one BOS; token ids are taken as they are; one prompt per request."""
    prompt = request.prompt
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        if len(prompt) != 1:
            raise InvalidRequest(
                "Send one prompt per request (a list of several prompts is not supported).", param="prompt"
            )
        prompt = prompt[0]
    if isinstance(prompt, str):
        return engine.tokenizer.encode(prompt)
    return [token_id for token_id in prompt if isinstance(token_id, int)]


# ---- sampling parameters -----------------------------------------------------------------------------


def _max_tokens(requested: int | None, defaults: GenerationDefaults, room: int, prompt_param: str) -> int:
    if requested is not None:
        return requested  # too big for the context: the engine refuses it, naming max_tokens
    if room < 1:
        raise PromptTooLong("The prompt leaves no room for an answer in the context.", param=prompt_param)
    return room if defaults.max_tokens is None else min(defaults.max_tokens, room)


def _first_set(value: float | None, default: float) -> float:
    return default if value is None else value


def sampling_params(
    request: ChatCompletionRequest | CompletionRequest,
    defaults: GenerationDefaults,
    num_prompt_tokens: int,
    max_model_len: int,
) -> list[SamplingParams]:
    """One SamplingParams per choice: the request's values where given, the model's defaults elsewhere;
    choice i gets seed + i so that n seeded choices differ from each other yet are reproducible."""
    if isinstance(request, ChatCompletionRequest):
        requested = request.max_completion_tokens or request.max_tokens
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        prompt_param = "messages"
    else:
        requested, logprobs, prompt_param = request.max_tokens, request.logprobs, "prompt"
    stop = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())
    first = SamplingParams(
        max_tokens=_max_tokens(requested, defaults, max_model_len - num_prompt_tokens, prompt_param),
        temperature=_first_set(request.temperature, defaults.temperature),
        top_p=_first_set(request.top_p, defaults.top_p),
        top_k=request.top_k if request.top_k is not None else 0,
        repetition_penalty=_first_set(request.repetition_penalty, defaults.repetition_penalty),
        presence_penalty=request.presence_penalty or 0.0,
        frequency_penalty=request.frequency_penalty or 0.0,
        seed=request.seed,
        stop=stop,
        ignore_eos=request.ignore_eos,
        min_tokens=request.min_tokens or 0,
        logprobs=logprobs,
    )
    if request.seed is None:
        return [first] * request.n
    return [dataclasses.replace(first, seed=request.seed + i) for i in range(request.n)]


# ---- the engine requests of one API request -----------------------------------------------------------


@dataclass
class Choice:
    """Everything one choice has produced so far."""

    index: int
    text_parts: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    num_output_tokens: int = 0
    finish_reason: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    def add(self, output: RequestOutput) -> None:
        self.text_parts.append(output.text)
        self.logprobs.extend(output.logprobs or ())
        self.num_output_tokens = output.num_output_tokens
        if output.finish_reason is not None:
            self.finish_reason = str(output.finish_reason)


class Generation:
    """The n engine requests behind one API request (ids `{request_id}-{i}`), read as one stream of
    (choice index, output). `close()` aborts whatever is still running; it is idempotent and must run
    in a `finally` so that a client that leaves frees its KV blocks."""

    def __init__(self, request_id: str, streams: list[RequestStream], num_prompt_tokens: int) -> None:
        self.request_id = request_id
        self.num_prompt_tokens = num_prompt_tokens
        self._streams = streams
        self._num_finished = 0
        self._closed = False

    @classmethod
    async def submit(
        cls,
        engine: AsyncEngine,
        request_id: str,
        prompt_ids: list[int],
        params: list[SamplingParams],
        adapter: str | None,
    ) -> Generation:
        """Queue every choice; if one is refused (queue full, ...), the ones queued before are aborted."""
        streams: list[RequestStream] = []
        try:
            for i, choice_params in enumerate(params):
                streams.append(engine.generate(f"{request_id}-{i}", prompt_ids, choice_params, adapter))
        except BaseException:
            await _close_all(streams)
            raise
        return cls(request_id, streams, len(prompt_ids))

    @property
    def n(self) -> int:
        return len(self._streams)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._num_finished < self.n:
            logger.info("request %s: closed before it finished; aborting what still runs", self.request_id)
        await _close_all(self._streams)

    async def outputs(self) -> AsyncGenerator[tuple[int, RequestOutput]]:
        """Every output of every choice as it arrives, tagged with its choice index."""
        async with contextlib.aclosing(self._merged()) as merged:
            async for index, output in merged:
                self._num_finished += output.finished
                yield index, output

    async def _merged(self) -> AsyncGenerator[tuple[int, RequestOutput]]:
        if len(self._streams) == 1:  # the common case needs no tasks
            async for single in self._streams[0]:
                yield 0, single
            return
        # One pending read per unfinished choice; whichever finishes first is yielded first.
        pending = {asyncio.ensure_future(_next(stream)): i for i, stream in enumerate(self._streams)}
        try:
            while pending:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for future in sorted(done, key=pending.__getitem__):
                    index = pending.pop(future)
                    output = future.result()
                    if output is None:
                        continue
                    yield index, output
                    if not output.finished:
                        pending[asyncio.ensure_future(_next(self._streams[index]))] = index
        finally:
            for future in pending:
                future.cancel()

    async def collect(self) -> list[Choice]:
        """Run every choice to its end (non-streamed responses)."""
        choices = [Choice(i) for i in range(self.n)]
        async with contextlib.aclosing(self.outputs()) as outputs:
            async for index, output in outputs:
                choices[index].add(output)
        return choices


async def _next(stream: RequestStream) -> RequestOutput | None:
    try:
        return await anext(stream)
    except StopAsyncIteration:
        return None


async def _close_all(streams: list[RequestStream]) -> None:
    # RequestStream.aclose() aborts synchronously and never suspends, so it runs whole even in a task
    # that is being cancelled because its client left.
    for stream in streams:
        with contextlib.suppress(EngineDead):  # a dead engine has nothing left to abort
            await stream.aclose()


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it and raising ClientDisconnected if the client leaves first."""
    work_task = asyncio.ensure_future(work)
    watch_task = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({work_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
        if work_task.done():
            return work_task.result()
        raise ClientDisconnected()
    finally:
        work_task.cancel()
        watch_task.cancel()


async def _wait_for_disconnect(request: Request) -> None:
    # After the body, the ASGI server's next message is http.disconnect: when the client leaves, or
    # when the response is complete (by then this task has been cancelled).
    while (await request.receive())["type"] != "http.disconnect":
        pass
