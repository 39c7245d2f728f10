"""Fixtures for RELIABILITY.md's tests: in-process apps over the tiny demo engine, a raw ASGI driver
that can leave mid-response or stop reading, real servers in subprocesses on 127.0.0.1, and a reader
for the Prometheus text of /metrics."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import pytest
import pytest_asyncio
from fastapi import FastAPI
from starlette.types import Message

from engine import AsyncEngine
from engine.demo import DemoModel

# `app` and `client` are the server tests' fixtures, built here on this directory's `engine`.
from tests.server.conftest import API_KEY, app, asgi_client, client, make_app, make_engine  # noqa: F401

REPO = Path(__file__).resolve().parents[2]
CONSULT, TCM = "chatmed-consult", "chatmed-tcm"
QUESTION = "孩子咳嗽一周了，夜里加重，怎么办？"
STARTUP_TIMEOUT_S = 120.0
MAX_MODEL_LEN = 512
IDLE_TIMEOUT_S = 10.0


def chat(max_tokens: int = 8, stream: bool = False, **fields: Any) -> dict[str, Any]:
    """A greedy chat body; fields override."""
    body: dict[str, Any] = {
        "model": CONSULT,
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }
    return body | fields


def long_chat(stream: bool = True, max_tokens: int = 400, **fields: Any) -> dict[str, Any]:
    """A chat that runs its full length (a second or more on the tiny demo)."""
    return chat(max_tokens=max_tokens, stream=stream, ignore_eos=True, **fields)


def new_engine(demo: DemoModel, **overrides: object) -> AsyncEngine:
    """An engine over the tiny demo with room for long_chat(); overrides win."""
    values: dict[str, object] = {"max_model_len": MAX_MODEL_LEN}
    return make_engine(demo, **(values | overrides))


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def engine(demo: DemoModel) -> AsyncIterator[AsyncEngine]:
    engine = new_engine(demo)
    engine.start()
    yield engine
    engine.shutdown()


async def wait_until_idle(engine: AsyncEngine, timeout_s: float = IDLE_TIMEOUT_S) -> float:
    """Seconds until nothing runs or waits and every KV block is free; fails after timeout_s."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        stats = engine.stats()
        if (stats.num_running, stats.num_waiting, stats.num_free_blocks) == (0, 0, stats.num_total_blocks):
            return time.monotonic() - started
        await asyncio.sleep(0.005)
    pytest.fail(f"the engine is still busy after {timeout_s} s: {engine.stats()}")


# ---- a raw ASGI client ----------------------------------------------------------------------------------


@dataclass
class AsgiCall:
    """One request driven straight into the ASGI app, so that a test can leave mid-response (`leave`)
    or stop reading (`freeze_after` body chunks: every later send blocks until the app gives up)."""

    app: FastAPI
    path: str
    body: dict[str, Any]
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    leave_after: int | None = None  # leave once this many body chunks have come
    freeze_after: int | None = None
    status: int = 0
    chunks: list[bytes] = field(default_factory=list)
    response_headers: dict[bytes, bytes] = field(default_factory=dict)
    left: asyncio.Event = field(default_factory=asyncio.Event)
    first_chunk: asyncio.Event = field(default_factory=asyncio.Event)
    completed: bool = False

    @property
    def text(self) -> str:
        return b"".join(self.chunks).decode("utf-8", errors="replace")

    async def run(self) -> AsgiCall:
        await self.app(self._scope(), self._receive(), self._send)
        return self

    def _scope(self) -> dict[str, Any]:
        return {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": self.path,
            "raw_path": self.path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": [(b"host", b"testserver"), (b"content-type", b"application/json"), *self.headers],
            "client": ("127.0.0.1", 50000),
            "server": ("testserver", 80),
        }

    def _receive(self) -> Any:
        sent = False

        async def receive() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": json.dumps(self.body).encode(), "more_body": False}
            await self.left.wait()
            return {"type": "http.disconnect"}

        return receive

    async def _send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.response_headers = dict(message.get("headers", []))
            return
        if self.freeze_after is not None and len(self.chunks) >= self.freeze_after:
            await asyncio.Event().wait()  # a reader that never reads again
        if message.get("body"):
            self.chunks.append(message["body"])
            self.first_chunk.set()
        if not message.get("more_body", False):
            self.completed = True
        if self.leave_after is not None and len(self.chunks) >= self.leave_after:
            self.left.set()


# ---- real servers ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServerProcess:
    process: subprocess.Popen[bytes]
    base_url: str
    log_path: Path
    api_key: str = API_KEY

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def metrics(self) -> dict[str, float]:
        response = httpx2.get(self.base_url + "/metrics", headers=self.headers, timeout=10.0)
        assert response.status_code == 200, response.text
        return parse_metrics(response.text)

    def sigterm(self) -> None:
        self.process.send_signal(signal.SIGTERM)


def _wait_for_health(server: ServerProcess) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"the server exited with {server.process.returncode}:\n{server.log()[-3000:]}")
        try:
            if httpx2.get(server.base_url + "/health", timeout=2.0).status_code == 200:
                return
        except httpx2.TransportError:
            pass
        time.sleep(0.1)
    pytest.fail(f"the server did not become healthy in {STARTUP_TIMEOUT_S} s:\n{server.log()[-3000:]}")


@contextmanager
def running_server(demo: DemoModel, log_dir: Path, *args: str, **env: str) -> Iterator[ServerProcess]:
    """`python -m server` over the tiny demo on 127.0.0.1, with an API key and these extra flags and
    CHATMED_* variables; stopped (SIGTERM, then SIGKILL) at the end unless the test stopped it."""
    port = free_port()
    log_path = log_dir / f"server-{port}.log"
    environment = {name: value for name, value in os.environ.items() if not name.startswith("CHATMED_")}
    environment |= {
        "CHATMED_CACHE_DIR": str(demo.base_path.parent.parent),
        "CHATMED_DEMO_SIZE": "tiny",
        "CHATMED_MAX_MODEL_LEN": str(MAX_MODEL_LEN),
        "CHATMED_KV_CACHE_MEMORY_MB": "16",
        "CHATMED_MAX_NUM_BATCHED_TOKENS": "256",
        **env,
    }
    command = [sys.executable, "-m", "server", "--port", str(port), "--api-key", API_KEY, *args]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=REPO, env=environment, stdout=log, stderr=subprocess.STDOUT)
    server = ServerProcess(process, f"http://127.0.0.1:{port}", log_path)
    try:
        _wait_for_health(server)
        yield server
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text → {sample name: value summed over its label sets}, plus one key per full
    sample line (`name{labels}`) for tests that need a label."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        name = series.split("{", 1)[0]
        values[name] = values.get(name, 0.0) + float(value)
        values[series] = float(value)
    return values


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by nearest rank; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


@pytest.fixture(scope="session")
def shared_server(demo: DemoModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One real server for the tests that do not stop it: two seats, a queue of four, a 64 KiB body cap."""
    log_dir = tmp_path_factory.mktemp("shared-server")
    args = ("--max-num-seqs", "2", "--max-queued-requests", "4", "--max-request-body-bytes", str(64 * 1024))
    with running_server(demo, log_dir, *args) as server:
        yield server
