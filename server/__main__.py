"""`chatmed-serve` / `python -m server`: settings from CLI + env → engine → create_app → uvicorn (with a
SIGTERM drain: server/shutdown.py)."""

from __future__ import annotations

import logging
import os
import sys

import uvicorn

from engine import AsyncEngine, EngineConfig
from server.app import create_app
from server.logs import configure_logging
from server.settings import DEMO_BASE_NAME, Settings
from server.shutdown import serve

logger = logging.getLogger(__name__)

DEMO_WARNING = (
    "No --base-model given: serving the embedded DEMO model (random weights, names %s). Its answers are "
    "random noise, NOT medical advice. To serve ChatMed, build the merged Chinese-LLaMA-Alpaca-Plus base "
    "and run: chatmed-serve --base-model models/base "
    "--adapter chatmed-consult=models/adapters/chatmed-consult "
    "--adapter chatmed-tcm=models/adapters/chatmed-tcm (see README.md)."
)


def engine_config(settings: Settings) -> EngineConfig:
    """The engine's config: the real base and adapters when --base-model is given, else the demo
    (built once into --cache-dir) plus any --adapter given."""
    adapters = dict(settings.adapter_paths())
    if settings.base_model is not None:
        return settings.engine_config(settings.base_model, tuple(adapters.items()))
    from engine.demo import DemoSpec, build_demo  # only the demo path needs it

    spec = DemoSpec.tiny() if settings.demo_size == "tiny" else None
    demo = build_demo(spec, cache_dir=settings.cache_dir)
    names = [settings.served_model_name or DEMO_BASE_NAME, *demo.adapters]
    logger.warning(DEMO_WARNING, ", ".join(names))
    return settings.engine_config(demo.base_path, tuple({**demo.adapters, **adapters}.items()))


def main(argv: list[str] | None = None) -> None:
    """Parse flags (argv, default sys.argv) over CHATMED_* variables, load the engine, serve until
    SIGTERM or SIGINT and its drain, then end the process with status 0 (it does not return)."""
    settings = Settings.from_args(argv)
    configure_logging(settings.log_level, settings.log_requests)
    engine = AsyncEngine(engine_config(settings))
    app = create_app(settings, engine)
    # uvicorn's logging config and access log are replaced by ours (server/logs.py and
    # server/observability.py), which never write a raw path or a message that may quote a prompt.
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,
        access_log=False,
    )
    serve(config, app.state.admission, engine, settings.drain_timeout)  # SIGTERM: drain, exit 0
    # The engine is stopped and the sockets closed. Python's own teardown of torch can take many
    # seconds on a busy host, long enough to outlast a container's stop grace period: skip it.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
