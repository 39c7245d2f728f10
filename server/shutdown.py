"""SIGTERM: stop admitting, let running requests finish within the drain timeout, then exit 0.

uvicorn alone gets this wrong for us three ways: on the signal it closes the listening socket and, through
sse-starlette's patch of its signal handler, cancels every open stream at once (no `[DONE]`); it has
no notion of "requests still generating"; and once shut down it raises the signal again, so the
process dies with 143 instead of exiting 0. GracefulServer replaces its signal handler:

1. first SIGTERM or SIGINT: admission stops (new generations get 503 with Retry-After, /ready 503,
   /health says "draining"); the socket stays open so that clients are told, not reset;
2. when no generation is in flight, or at the drain deadline, uvicorn's own shutdown runs; at the
   deadline the engine is stopped first, which ends every open stream with an error event and
   `[DONE]` and answers waiting non-streamed requests with 503;
3. the lifespan stops the engine (again: it is idempotent) and `run()` returns: exit status 0.

A second signal skips the drain and exits at once.
"""

from __future__ import annotations

import logging
import time
from types import FrameType

import uvicorn

from engine import AsyncEngine
from server.limits import Admission

logger = logging.getLogger(__name__)

# After the engine is stopped at the deadline, how long the cut streams get to send their last frames.
CUT_GRACE_S = 1.0
# uvicorn's wait for connections to close once the drain is over (they are idle or finishing by then).
CLOSE_TIMEOUT_S = 1


class GracefulServer(uvicorn.Server):
    """uvicorn's Server with the drain above. Its config should have timeout_graceful_shutdown set
    (CLOSE_TIMEOUT_S), so that a stuck connection cannot hold the exit past the drain."""

    def __init__(
        self, config: uvicorn.Config, admission: Admission, engine: AsyncEngine, drain_timeout_s: float
    ) -> None:
        super().__init__(config)
        self.admission = admission
        self.engine = engine
        self.drain_timeout_s = drain_timeout_s
        self.signalled_at: float | None = None
        self._cut_at: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Runs in a signal handler: set flags only (no logging, no asyncio). The signal is not recorded
        # in `_captured_signals`, so uvicorn does not raise it again after the shutdown: exit status 0.
        if self.signalled_at is None:
            self.signalled_at = time.monotonic()
        else:
            self.should_exit = True
            self.force_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self.signalled_at is not None and not self.should_exit:
            self._drain_step(time.monotonic())
        return await super().on_tick(counter)

    def _drain_step(self, now: float) -> None:
        assert self.signalled_at is not None
        admission = self.admission
        if not admission.draining:
            admission.draining = True
            logger.info(
                "shutting down: %d requests in flight, drain timeout %.1f s",
                admission.in_flight,
                self.drain_timeout_s,
            )
        if admission.in_flight == 0:
            logger.info("drained in %.2f s", now - self.signalled_at)
            self.should_exit = True
        elif self._cut_at is None and now >= self.signalled_at + self.drain_timeout_s:
            logger.warning("drain timeout: ending %d requests still in flight", admission.in_flight)
            self.engine.shutdown()  # every open stream gets an error event and [DONE]
            self._cut_at = now
        elif self._cut_at is not None and now >= self._cut_at + CUT_GRACE_S:
            self.should_exit = True


def serve(config: uvicorn.Config, admission: Admission, engine: AsyncEngine, drain_timeout_s: float) -> None:
    """Run the server until a signal and its drain; returns normally (exit status 0)."""
    config.timeout_graceful_shutdown = CLOSE_TIMEOUT_S
    GracefulServer(config, admission, engine, drain_timeout_s).run()
