"""GET /v1/models and /v1/models/{model}: the base and every adapter loaded now, each its own model."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from server.dependencies import ServerState, StateDep, require_api_key
from server.protocol import ModelCard, ModelList
from server.registry import ServedModel

router = APIRouter(dependencies=[Depends(require_api_key)])


def _card(state: ServerState, model: ServedModel) -> ModelCard:
    # As vLLM: `root` is the weights' folder, `parent` the base that an adapter applies to.
    return ModelCard(
        id=model.name, root=str(model.root), parent=model.parent, max_model_len=state.engine.max_model_len
    )


@router.get("/v1/models")
async def list_models(state: StateDep) -> ModelList:
    return ModelList(data=[_card(state, model) for model in state.registry.models()])


@router.get("/v1/models/{model:path}")
async def retrieve_model(model: str, state: StateDep) -> ModelCard:
    return _card(state, state.registry.resolve(model))
