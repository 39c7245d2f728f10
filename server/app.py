"""create_app(settings, engine): the FastAPI app, its lifespan, error handlers and routes."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from engine import AsyncEngine
from server.dependencies import ServerState
from server.errors import install_error_handlers
from server.operations import install_guards, install_observers
from server.registry import BaseModelInfo, ModelRegistry
from server.routes import API_ROUTERS
from server.routes.adapters import install_adapter_admin
from server.settings import DEMO_BASE_NAME, Settings

logger = logging.getLogger(__name__)


def base_model_info(settings: Settings, engine: AsyncEngine) -> BaseModelInfo:
    """The base's served name: --served-model-name, else the demo's name or the base folder's name."""
    path = engine.config.model_path
    is_demo = settings.base_model is None
    default_name = DEMO_BASE_NAME if is_demo else path.name
    return BaseModelInfo(name=settings.served_model_name or default_name, path=path, is_chatmed=is_demo)


def _read_chat_template(settings: Settings, engine: AsyncEngine) -> str | None:
    """The --chat-template file, tried once now so that a broken template stops the start-up, not a
    request (the tokenizer raises ValueError for a template that does not compile)."""
    if settings.chat_template is None:
        return None
    template = settings.chat_template.read_text(encoding="utf-8")
    engine.tokenizer.render_chat([{"role": "user", "content": "?"}], template)
    return template


def create_app(settings: Settings, engine: AsyncEngine) -> FastAPI:
    """The app over an engine that is built (weights loaded) but not started: the lifespan starts
    its thread on the server's event loop and stops it at shutdown."""
    template = _read_chat_template(settings, engine)
    registry = ModelRegistry(engine, base_model_info(settings, engine), chat_template=template)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        logger.info("serving %s", ", ".join(model.name for model in registry.models()))
        try:
            yield
        finally:
            engine.shutdown()

    # With a key set, every route but the probes is guarded; the schema and docs routes are not served.
    public_docs = settings.api_key is None
    app = FastAPI(
        title="ChatMed Serve",
        version="0.1.0",
        lifespan=lifespan,
        docs_url="/docs" if public_docs else None,
        redoc_url=None,
        openapi_url="/openapi.json" if public_docs else None,
    )
    app.state.chatmed = ServerState(settings=settings, engine=engine, registry=registry)
    install_guards(app, settings, engine, registry.base_name)  # inside the error middleware
    install_error_handlers(app)
    for router in API_ROUTERS:
        app.include_router(router)
    install_adapter_admin(app, app.state.chatmed)  # only with --admin-api-key
    install_observers(app, settings)  # outermost: sees every response
    return app
