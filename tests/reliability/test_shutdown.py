"""T12: SIGTERM drains. Running streams finish, new requests are refused (503 with Retry-After while
the socket is still open), /health says "draining" and /ready 503, and the process exits 0. When the
drain timeout passes first, the streams still open end with an error event and `[DONE]`, and the exit
is still 0. Each test starts its own server.

Figures: the drain result (streams finished / cut) and the time from SIGTERM to exit.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx2
import pytest

from engine.demo import DemoModel
from tests.reliability.conftest import ServerProcess, chat, long_chat, running_server

EXIT_GRACE_S = 30.0  # a hang guard, not a speed claim: the measured time is printed


@dataclass
class StreamReader:
    """A streamed chat read to its end in a thread; `started` is set at the first content event."""

    server: ServerProcess
    body: dict[str, object]
    payloads: list[str] = field(default_factory=list)
    started: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None

    def run(self) -> None:
        try:
            url = self.server.base_url + "/v1/chat/completions"
            with httpx2.stream("POST", url, json=self.body, headers=self.server.headers, timeout=60.0) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        self.payloads.append(line[len("data: ") :])
                        if len(self.payloads) >= 2:
                            self.started.set()
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            self.started.set()

    @property
    def finish_reason(self) -> str | None:
        for payload in reversed(self.payloads[:-1]):
            choices = json.loads(payload).get("choices") or []
            if choices and choices[0].get("finish_reason"):
                return str(choices[0]["finish_reason"])
        return None


def _start_streams(server: ServerProcess, body: dict[str, object], count: int) -> list[StreamReader]:
    readers = [StreamReader(server, body) for _ in range(count)]
    threads = [threading.Thread(target=reader.run, daemon=True) for reader in readers]
    for thread in threads:
        thread.start()
    for reader in readers:
        assert reader.started.wait(60.0)
        assert reader.error is None, reader.error
    return readers


def _join(readers: list[StreamReader], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for reader in readers:
        while len(reader.payloads) == 0 or reader.payloads[-1] != "[DONE]":
            assert reader.error is None, reader.error
            assert time.monotonic() < deadline, "a stream did not end"
            time.sleep(0.02)


def _wait_exit(server: ServerProcess, since: float) -> tuple[int, float]:
    code = server.process.wait(timeout=EXIT_GRACE_S)
    return code, time.monotonic() - since


def test_sigterm_lets_running_streams_finish_and_exits_0(demo: DemoModel, tmp_path: Path) -> None:
    with running_server(demo, tmp_path, "--drain-timeout", "60") as server:
        readers = _start_streams(server, chat(max_tokens=300, stream=True, ignore_eos=True), 3)
        signalled = time.monotonic()
        server.sigterm()
        time.sleep(0.3)  # the drain starts at uvicorn's next tick (0.1 s)
        refused = httpx2.post(server.base_url + "/v1/chat/completions", json=chat(), headers=server.headers)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "server_shutting_down"
        assert httpx2.get(server.base_url + "/health").json() == {"status": "draining"}
        assert httpx2.get(server.base_url + "/ready").status_code == 503
        _join(readers, 60.0)
        code, elapsed_s = _wait_exit(server, signalled)
        assert [reader.finish_reason for reader in readers] == ["length"] * 3
        assert code == 0, server.log()[-3000:]
        assert "drained in" in server.log()
        print(f"\nT12 drain: 3 streams finished after SIGTERM, exit {code} {elapsed_s:.2f} s after it")


def test_the_drain_timeout_ends_open_streams_cleanly_and_exits_0(demo: DemoModel, tmp_path: Path) -> None:
    drain_s = 0.2
    with running_server(demo, tmp_path, "--drain-timeout", str(drain_s)) as server:
        readers = _start_streams(server, long_chat(max_tokens=480), 6)
        signalled = time.monotonic()
        server.sigterm()
        _join(readers, 30.0)
        code, elapsed_s = _wait_exit(server, signalled)
        assert code == 0, server.log()[-3000:]
        cut = 0
        for reader in readers:
            if reader.finish_reason is None:  # cut: an error event, then [DONE]
                error = json.loads(reader.payloads[-2])["error"]
                assert error["code"] == "engine_dead" and set(error) == {"message", "type", "param", "code"}
                cut += 1
        assert cut >= 1, "the streams were expected to outlast the drain"
        print(
            f"\nT12 drain timeout {drain_s} s: {cut} of {len(readers)} streams cut with an error event "
            f"and [DONE], exit {code} {elapsed_s:.2f} s after SIGTERM"
        )
        with pytest.raises(httpx2.TransportError):
            httpx2.get(server.base_url + "/health", timeout=2.0)
