"""POST /v1/chat/completions."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Depends, Request, Response

from server.dependencies import StateDep, require_api_key
from server.formats import ChatFormat
from server.generation import chat_prompt_ids, check_chat_request, sampling_params
from server.protocol import ChatCompletionRequest
from server.routes.respond import respond

router = APIRouter(dependencies=[Depends(require_api_key)])


@router.post("/v1/chat/completions", response_model=None)
async def create_chat_completion(body: ChatCompletionRequest, request: Request, state: StateDep) -> Response:
    model = state.registry.resolve(body.model)
    check_chat_request(body, state.settings.max_n)
    state.engine.check_capacity()  # refuse overload before spending time on the template and tokenizer
    prompt_ids = chat_prompt_ids(state.engine, model, body)
    params = sampling_params(body, model.defaults, len(prompt_ids), state.engine.max_model_len)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    fmt = ChatFormat(request_id, model.name, logprobs=body.logprobs)
    return await respond(request, state, request_id, prompt_ids, params, model.adapter, fmt, body)
