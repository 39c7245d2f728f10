"""POST /v1/completions: a raw-text prompt (encoded with one BOS) or a list of token ids."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Depends, Request, Response

from server.dependencies import StateDep, require_api_key
from server.formats import CompletionFormat
from server.generation import check_completion_request, completion_prompt_ids, sampling_params
from server.protocol import CompletionRequest
from server.routes.respond import respond

router = APIRouter(dependencies=[Depends(require_api_key)])


@router.post("/v1/completions", response_model=None)
async def create_completion(body: CompletionRequest, request: Request, state: StateDep) -> Response:
    model = state.registry.resolve(body.model)
    check_completion_request(body, state.settings.max_n)
    state.engine.check_capacity()  # refuse overload before spending time on the tokenizer
    prompt_ids = completion_prompt_ids(state.engine, body)
    params = sampling_params(body, model.defaults, len(prompt_ids), state.engine.max_model_len)
    request_id = f"cmpl-{uuid.uuid4().hex}"
    fmt = CompletionFormat(request_id, model.name, logprobs=body.logprobs, n=body.n)
    return await respond(request, state, request_id, prompt_ids, params, model.adapter, fmt, body)
