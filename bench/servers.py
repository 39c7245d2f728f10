"""Start an OpenAI-compatible server as a subprocess on 127.0.0.1, wait for health, stop it.

Used by bench/compare.py to run every server in turn at a free port. Also measures the server's
CPU seconds, a figure that stays meaningful when other work shares the machine's cores.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import httpx2
import psutil

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
POLL_INTERVAL_S = 0.5
STOP_TIMEOUT_S = 15.0
LOG_TAIL_CHARS = 2000


class ServerStartError(RuntimeError):
    """The server exited or did not become healthy in time; the message ends with its log's tail."""


@dataclass(frozen=True)
class ServerSpec:
    """How to start one server: `command` may contain `{port}`, replaced by the chosen port."""

    name: str
    command: tuple[str, ...]
    health_path: str = "/health"
    env: dict[str, str] = field(default_factory=dict)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def log_tail(path: Path) -> str:
    """The end of a log file, for error messages."""
    try:
        return path.read_text(encoding="utf-8", errors="replace")[-LOG_TAIL_CHARS:]
    except OSError:
        return ""


class ServerProcess:
    """A running server: `with ServerProcess(spec, log_path) as server:` starts it and waits until
    its health route answers 200; leaving the block terminates it (then kills it if it lingers)."""

    def __init__(self, spec: ServerSpec, log_path: Path, startup_timeout_s: float = 300.0) -> None:
        self.spec = spec
        self.log_path = log_path
        self.startup_timeout_s = startup_timeout_s
        self.port = free_port()
        self.command = [part.replace("{port}", str(self.port)) for part in spec.command]
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}/v1"

    def __enter__(self) -> ServerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self.command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **self.spec.env},
            )
        logger.info("started %s (pid %d) on port %d", self.spec.name, self.process.pid, self.port)
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _wait_healthy(self) -> None:
        url = f"http://{HOST}:{self.port}{self.spec.health_path}"
        deadline = time.monotonic() + self.startup_timeout_s
        with httpx2.Client(timeout=5.0) as client:
            while time.monotonic() < deadline:
                if self.process is not None and self.process.poll() is not None:
                    code = self.process.returncode
                    tail = log_tail(self.log_path)
                    raise ServerStartError(f"{self.spec.name} exited with code {code}:\n{tail}")
                try:
                    if client.get(url).status_code == 200:
                        return
                except httpx2.HTTPError:
                    pass  # not listening yet
                time.sleep(POLL_INTERVAL_S)
        raise ServerStartError(
            f"{self.spec.name} not healthy after {self.startup_timeout_s:.0f} s:\n{log_tail(self.log_path)}"
        )

    def cpu_seconds(self) -> float:
        """User + system CPU seconds used so far by the server and its children."""
        if self.process is None:
            return 0.0
        try:
            proc = psutil.Process(self.process.pid)
            total = _cpu(proc)
            for child in proc.children(recursive=True):
                total += _cpu(child)
        except psutil.Error:
            return 0.0
        return total

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT_S; only ever the process this object started."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            logger.warning("%s ignored SIGTERM; killing pid %d", self.spec.name, self.process.pid)
            self.process.kill()
            self.process.wait(timeout=STOP_TIMEOUT_S)


def _cpu(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


def command_available(command: Sequence[str], timeout_s: float = 120.0) -> tuple[bool, str]:
    """Run `command` (a --help call) and return (exit code 0, its output) without raising."""
    try:
        done = subprocess.run(
            list(command), capture_output=True, timeout=timeout_s, check=False, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"{type(exc).__name__}: {exc}"
    output = (done.stdout + done.stderr).decode("utf-8", errors="replace")
    return done.returncode == 0, output
