"""The tail that chat and text completions share: submit the choices, then stream or answer once."""

from __future__ import annotations

import logging

from fastapi import Request, Response
from fastapi.responses import JSONResponse

from engine import SamplingParams
from engine.errors import EngineError
from server.dependencies import ServerState
from server.formats import OutputFormat, usage_info
from server.generation import ClientDisconnected, Generation, until_disconnect
from server.protocol import ChatCompletionRequest, SamplingRequest
from server.sse import GenerationStreamResponse

logger = logging.getLogger(__name__)

# Not sent to anyone (the client has gone); nginx's code for it makes the access log say what happened.
CLIENT_CLOSED_REQUEST = 499


async def respond(
    request: Request,
    state: ServerState,
    request_id: str,
    prompt_ids: list[int],
    params: list[SamplingParams],
    adapter: str | None,
    fmt: OutputFormat,
    body: SamplingRequest,
) -> Response:
    try:
        job = await Generation.submit(state.engine, request_id, prompt_ids, params, adapter)
    except EngineError as exc:
        if exc.param == "prompt" and isinstance(body, ChatCompletionRequest):
            exc.param = "messages"  # the engine names the prompt; a chat request's prompt is its messages
        raise
    logger.info(
        "request %s: model %s, %d prompt tokens, n=%d, stream=%s",
        request_id,
        body.model,
        len(prompt_ids),
        len(params),
        body.stream,
    )
    if body.stream:
        return GenerationStreamResponse(job, fmt, body.include_usage, ping_s=state.settings.stream_ping_s)
    try:
        choices = await until_disconnect(request, job.collect())
    except ClientDisconnected:
        logger.info("request %s: client disconnected; aborted", request_id)
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    finally:
        await job.close()
    usage = usage_info(job.num_prompt_tokens, sum(choice.num_output_tokens for choice in choices))
    return JSONResponse(fmt.response(choices, usage).model_dump())
