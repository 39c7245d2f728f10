"""A real server: `python -m server` in a subprocess on 127.0.0.1 at a free port, over the tiny demo
(prebuilt by the session's `demo` fixture into the cache folder the server is pointed at)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx2
import pytest

from engine.demo import DemoModel

REPO = Path(__file__).resolve().parents[2]
DATA_DIR = REPO.parent / "shared" / "data" / "chatmed"
API_KEY = "sk-api-test-5b1e"
MAX_MODEL_LEN = 512
STARTUP_TIMEOUT_S = 120.0
TEMPLATE_HEAD, TEMPLATE_TAIL = "<s>问：\n", "\n答：\n"


@dataclass(frozen=True)
class RunningServer:
    base_url: str  # http://127.0.0.1:PORT
    api_key: str
    log_path: Path

    @property
    def v1(self) -> str:
        return self.base_url + "/v1"

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for_health(process: subprocess.Popen[bytes], url: str, log_path: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the server exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx2.get(url + "/health", timeout=2.0).status_code == 200:
                return
        except httpx2.TransportError:
            pass
        time.sleep(0.2)
    pytest.fail(
        f"the server did not become healthy in {STARTUP_TIMEOUT_S} s:\n{log_path.read_text()[-3000:]}"
    )


@pytest.fixture(scope="session")
def server(demo: DemoModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    port = free_port()
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    env = {name: value for name, value in os.environ.items() if not name.startswith("CHATMED_")}
    env |= {
        "CHATMED_CACHE_DIR": str(demo.base_path.parent.parent),  # <cache>/demo-<key>/base
        "CHATMED_DEMO_SIZE": "tiny",
        "CHATMED_MAX_MODEL_LEN": str(MAX_MODEL_LEN),
        "CHATMED_KV_CACHE_MEMORY_MB": "16",
        "CHATMED_MAX_NUM_SEQS": "16",
        "CHATMED_MAX_NUM_BATCHED_TOKENS": "256",
    }
    command = [sys.executable, "-m", "server", "--port", str(port), "--api-key", API_KEY]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    try:
        _wait_for_health(process, base_url, log_path)
        yield RunningServer(base_url=base_url, api_key=API_KEY, log_path=log_path)
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _questions(name: str, limit: int) -> list[str]:
    path = DATA_DIR / name
    if not path.is_file():
        pytest.skip(f"{path} is not here")
    questions = []
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            query = json.loads(line)["query"]
            questions.append(query.removeprefix(TEMPLATE_HEAD).removesuffix(TEMPLATE_TAIL))
            if len(questions) == limit:
                break
    return questions


@pytest.fixture(scope="session")
def consult_questions() -> list[str]:
    """Real consultation questions (the template stripped), or a skip when the data is absent."""
    return _questions("ChatMed-Consult_test.json", 6)


@pytest.fixture(scope="session")
def tcm_questions() -> list[str]:
    return _questions("ShenNong-TCM_test.jsonl", 6)
