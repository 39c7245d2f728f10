"""T6: HTTP limits on the real server (64 KiB body cap). A body announced too large is refused with 413
before it is sent; a chunked body with no length is refused as soon as it passes the cap; sockets
that trickle their request a byte at a time do not slow /health.

Figures: the two 413s' times, and /health latency p50 / p99 beside the trickling sockets.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from urllib.parse import urlparse

import httpx2

from tests.reliability.conftest import ServerProcess, percentile

CAP = 64 * 1024
NUM_TRICKLERS = 16


def _connect(server: ServerProcess) -> socket.socket:
    url = urlparse(server.base_url)
    sock = socket.create_connection((url.hostname, url.port), timeout=10.0)
    return sock


def _head(server: ServerProcess, extra: str) -> bytes:
    return (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {server.api_key}\r\n{extra}\r\n"
    ).encode()


def _status(sock: socket.socket) -> tuple[int, bytes]:
    """The status and the whole response (head and a Content-Length body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
    sock.settimeout(10.0)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(head.split(b" ", 2)[1]), head + b"\r\n\r\n" + body


def test_an_announced_oversized_body_is_refused_before_it_is_sent(shared_server: ServerProcess) -> None:
    with _connect(shared_server) as sock:
        started = time.monotonic()
        sock.sendall(_head(shared_server, "Content-Length: 100000000\r\n") + b'{"model": "')
        status, data = _status(sock)  # the other 100 MB are never sent
        elapsed_ms = 1000 * (time.monotonic() - started)
    assert status == 413 and b"request_too_large" in data
    print(f"\nT6 limits: 413 for an announced 100 MB body in {elapsed_ms:.0f} ms")


def test_a_chunked_body_is_refused_once_past_the_cap(shared_server: ServerProcess) -> None:
    piece = b"x" * 8192
    sent = 0
    with _connect(shared_server) as sock:
        sock.sendall(_head(shared_server, "Transfer-Encoding: chunked\r\n"))
        started = time.monotonic()
        sock.settimeout(0.05)
        status = 0
        while sent < 100 * CAP and not status:
            sock.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            sent += len(piece)
            try:
                status, data = _status(sock)
            except TimeoutError:
                continue
        elapsed_ms = 1000 * (time.monotonic() - started)
    assert status == 413 and b"request_too_large" in data
    assert sent < 4 * CAP  # refused soon after the cap, not after reading everything
    print(f"\nT6 limits: 413 for a chunked body after {sent // 1024} KiB sent, {elapsed_ms:.0f} ms")


def test_trickling_sockets_do_not_slow_health(shared_server: ServerProcess) -> None:
    stop = threading.Event()
    request = _head(shared_server, f"Content-Length: {CAP // 2}\r\n") + json.dumps({"model": "x"}).encode()

    def trickle() -> None:
        with _connect(shared_server) as sock:
            for byte in request:
                if stop.is_set():
                    return
                sock.sendall(bytes([byte]))
                time.sleep(0.05)

    threads = [threading.Thread(target=trickle, daemon=True) for _ in range(NUM_TRICKLERS)]
    for thread in threads:
        thread.start()
    latencies_ms = []
    try:
        time.sleep(0.5)
        with httpx2.Client(timeout=10.0) as client:
            for _ in range(60):
                started = time.monotonic()
                assert client.get(shared_server.base_url + "/health").status_code == 200
                latencies_ms.append(1000 * (time.monotonic() - started))
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    print(
        f"\nT6 limits: /health beside {NUM_TRICKLERS} trickling sockets: "
        f"p50 {percentile(latencies_ms, 50):.1f} ms, p99 {percentile(latencies_ms, 99):.1f} ms"
    )
