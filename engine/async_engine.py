"""AsyncEngine: the EngineCore in its own thread, behind an asyncio interface.

The event loop never runs tensor code; the engine thread never touches asyncio objects except through
`loop.call_soon_threadsafe`. Commands (add, abort, adapter changes) cross into the engine thread through
one inbox; outputs come back as one callback per step that fans them out to per-request queues.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from engine.config import EngineConfig
from engine.core import EngineCore
from engine.errors import (
    AdapterExists,
    AdapterInUse,
    EngineDead,
    EngineError,
    QueueFull,
    RequestFailed,
    UnknownAdapter,
)
from engine.lora import LoraAdapter
from engine.types import EngineStats, RequestOutput, SamplingParams

logger = logging.getLogger(__name__)

T = TypeVar("T")
_Item = RequestOutput | BaseException


class RequestStream:
    """The outputs of one request, as an async iterator. `aclose()` aborts the request if it is still
    running; call it in a `finally` so that a client that leaves frees its KV blocks.

    A reader that keeps up gets one increment per engine step. Increments that queued up while it was
    busy (its client is slow to take them, or the event loop has more streams than it can serve one
    step at a time) come out joined as one: the reader then catches up in one frame, not one per step,
    and a loop that falls behind does less work per token the further it falls. One reader per stream."""

    def __init__(self, engine: AsyncEngine, request_id: str) -> None:
        self.request_id = request_id
        self._engine = engine
        self._items: deque[_Item] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._done = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        item = self._items.popleft()
        if isinstance(item, BaseException):
            self._finish()
            raise item
        parts = [item]
        while not parts[-1].finished and self._items:
            later = self._items[0]
            if not isinstance(later, RequestOutput):
                break  # an error queued after them comes next time
            parts.append(later)
            self._items.popleft()
        output = RequestOutput.joined(parts)
        if output.finished:
            self._finish()
        return output

    @property
    def backlog(self) -> int:
        """Items put and not yet read."""
        return len(self._items)

    def put(self, item: _Item) -> None:
        self._items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _finish(self) -> None:
        self._done = True
        self._engine._streams.pop(self.request_id, None)

    async def aclose(self) -> None:
        """Abort the request if it still runs. Never raises: it runs in `finally` blocks, and a dead
        engine has nothing left to abort."""
        if not self._done:
            self._finish()
            with contextlib.suppress(EngineDead):
                self._engine.abort(self.request_id)


class AsyncEngine:
    """Public async surface of the engine. See EngineCore for what a step does."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.core = EngineCore(config)
        self.tokenizer = self.core.tokenizer
        self.max_model_len = self.core.max_model_len
        self._inbox: queue.SimpleQueue[Callable[[], object]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, RequestStream] = {}
        self._num_pending = 0  # adds sent to the engine thread and not yet queued there
        self._pending_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._dead: BaseException | None = None
        self._reads: dict[str, asyncio.Task[None]] = {}  # adapters being read back into host memory

    # ---- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread; outputs are delivered to the event loop running this call."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="chatmed-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        if self._dead is None:
            self._dead = EngineDead("the engine has shut down")
        self._fail_all(EngineDead("the engine has shut down"))

    @property
    def is_dead(self) -> bool:
        return self._dead is not None or (self._thread is not None and not self._thread.is_alive())

    # ---- requests -----------------------------------------------------------------------------------
    def check_capacity(self) -> None:
        """Cheap admission check, before any tokenizing: raises EngineDead or QueueFull."""
        if self.is_dead:
            raise EngineDead("the engine is not running")
        waiting = len(self.core.scheduler.waiting) + self._num_pending
        if waiting >= self.config.max_queued_requests:
            raise QueueFull("the server is at capacity; retry shortly")

    def generate(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, adapter: str | None = None
    ) -> RequestStream:
        """Validate and queue a request; raises at once on bad input, overload or a dead engine."""
        self.check_capacity()
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is in use")
        self.core._validate(request_id, prompt_ids, params, adapter)
        stream = RequestStream(self, request_id)
        self._streams[request_id] = stream
        with self._pending_lock:
            self._num_pending += 1
        if adapter is not None and adapter not in self.core.loras.host:
            # Evicted from host memory: read it back off the engine thread, then queue the request.
            asyncio.get_running_loop().create_task(
                self._add_after_read(request_id, prompt_ids, params, adapter)
            )
        else:
            self._send(lambda: self._add(request_id, prompt_ids, params, adapter))
        return stream

    async def _add_after_read(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, adapter: str
    ) -> None:
        try:
            await self._read_into_host(adapter)
            self._send(lambda: self._add(request_id, prompt_ids, params, adapter))
        except Exception as e:
            with self._pending_lock:
                self._num_pending -= 1
            self._dispatch([], [(request_id, e)])

    async def _read_into_host(self, name: str) -> None:
        """Read a served adapter back into host memory; concurrent callers share one read."""
        task = self._reads.get(name)
        if task is None:
            path = self.core.loras.paths.get(name)
            if path is None:
                raise UnknownAdapter(f"the adapter {name!r} does not exist", param="model")

            def publish(adapter: LoraAdapter) -> None:
                # Unloaded (or replaced) while it was being read: do not bring it back.
                if self.core.loras.paths.get(name) != path:
                    raise UnknownAdapter(f"the adapter {name!r} does not exist", param="model")
                self.core.add_adapter(adapter)

            async def read() -> None:
                try:
                    adapter = await asyncio.to_thread(self.core.read_adapter, name, path)
                    await self._call(lambda: publish(adapter))
                finally:
                    self._reads.pop(name, None)

            task = self._reads[name] = asyncio.get_running_loop().create_task(read())
        await asyncio.shield(task)

    def abort(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        self._send(lambda: self.core.abort(request_id))

    def stats(self) -> EngineStats:
        return self.core.stats()

    # ---- adapters -----------------------------------------------------------------------------------
    def adapters(self) -> dict[str, Path]:
        """Every served adapter, name -> folder (whether or not it is in memory right now)."""
        return dict(self.core.loras.paths)

    async def add_adapter(self, name: str, path: Path, *, replace: bool = False) -> None:
        """Read and validate off the engine thread (running streams keep their pace), then publish."""
        if name in self.core.loras.paths and not replace:
            raise AdapterExists(f"an adapter named {name!r} is already loaded", param="lora_name")
        adapter = await asyncio.to_thread(self.core.read_adapter, name, path)

        def publish() -> None:
            if name in self.core.loras.paths and not replace:  # another load won the race
                raise AdapterExists(f"an adapter named {name!r} is already loaded", param="lora_name")
            if self.core.adapter_in_use(name):
                raise AdapterInUse(f"adapter {name!r} has requests in flight; retry when they finish")
            self.core.add_adapter(adapter)

        await self._call(publish)

    async def remove_adapter(self, name: str) -> None:
        def remove() -> None:
            if name not in self.core.loras.paths:
                raise UnknownAdapter(f"the adapter {name!r} does not exist", param="lora_name")
            if self.core.adapter_in_use(name):
                raise AdapterInUse(f"adapter {name!r} has requests in flight; retry when they finish")
            self.core.remove_adapter(name)

        await self._call(remove)

    # ---- the engine thread ----------------------------------------------------------------------------
    def _send(self, command: Callable[[], object]) -> None:
        if self.is_dead:
            raise EngineDead("the engine is not running")
        self._inbox.put(command)
        self._wake.set()

    async def _call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the engine thread between two steps and return its result here."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()

        def command() -> None:
            try:
                result = fn()
            except Exception as e:
                loop.call_soon_threadsafe(_settle, future, None, e)
            else:
                loop.call_soon_threadsafe(_settle, future, result, None)

        self._send(command)
        return await future

    def _add(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, adapter: str | None
    ) -> None:
        with self._pending_lock:
            self._num_pending -= 1
        try:
            self.core.add_request(request_id, prompt_ids, params, adapter)
        except Exception as e:  # e.g. its adapter was removed after validation
            self._deliver([], [(request_id, e)])

    def _run(self) -> None:
        # OpenMP's thread count belongs to each calling thread: the engine thread sets its own, or its
        # matmuls would use every core whatever --num-threads says.
        if self.config.num_threads:
            torch.set_num_threads(self.config.num_threads)
        try:
            while not self._stop.is_set():
                self._wake.clear()
                self._drain_inbox()
                if not self.core.has_unfinished():
                    self._wake.wait(timeout=1.0)
                    continue
                outputs = self.core.step()
                failed, self.core.failed = self.core.failed, []
                self._deliver(outputs, failed)
        except BaseException as e:
            logger.critical("engine thread died (%s)", type(e).__name__, exc_info=True)
            self._dead = e
            if self._loop is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self._fail_all, EngineDead("the engine stopped on an error"))

    def _drain_inbox(self) -> None:
        while True:
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return
            command()

    def _deliver(self, outputs: list[RequestOutput], failed: list[tuple[str, Exception]]) -> None:
        if (outputs or failed) and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._dispatch, outputs, failed)

    # ---- on the event loop ----------------------------------------------------------------------------
    def _dispatch(self, outputs: list[RequestOutput], failed: list[tuple[str, Exception]]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                stream.put(out)
        for request_id, error in failed:
            stream = self._streams.get(request_id)
            if stream is not None:
                if isinstance(error, EngineError):
                    stream.put(error)
                else:
                    stream.put(RequestFailed("the request failed inside the engine"))

    def _fail_all(self, error: EngineDead) -> None:
        for stream in list(self._streams.values()):
            stream.put(error)
        self._streams.clear()


def _settle(future: asyncio.Future[Any], result: object, error: Exception | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
