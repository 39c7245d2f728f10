"""The HTTP layer's CPU per streamed token: the real app (its middlewares, the chat route, the SSE
response) in this process, over an engine whose streams are fed made-up increments instead of running
a model, and an ASGI `send` that only counts. What it measures is the event loop's work per token and
per frame, the work that shares the GIL with the engine thread's host work.

    python -m bench.http_cost [--streams 64] [--tokens 128] [--rounds 5] [--json PATH]

Two ways, each --rounds times, alternated:
- `keeps up`: a step puts one increment into every open stream, and the next step waits until every
  stream has sent it (one frame per token, as when the loop keeps pace with the engine);
- `falls behind`: as if the loop had fallen BEHIND (4) engine steps behind: each step puts that many
  increments into every stream at once; those queued up go out joined (RequestStream).
Prints CPU microseconds per token and per frame (process time, medians; no network, no uvicorn).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.report import format_table, load_note, write_json
from engine import AsyncEngine, EngineConfig, RequestOutput, RequestStream, SamplingParams
from engine.demo import DemoSpec, build_demo
from engine.types import FinishReason
from server.app import create_app
from server.settings import Settings

KEEPS_UP, FALLS_BEHIND = "keeps up", "falls behind"
BEHIND = 4  # engine steps a fallen-behind loop is behind
TEXT = "头痛"  # one token's text: two Chinese characters, six bytes


@dataclass
class Run:
    way: str
    tokens: int
    frames: int
    cpu_s: float

    @property
    def us_per_token(self) -> float:
        return self.cpu_s / self.tokens * 1e6

    @property
    def us_per_frame(self) -> float:
        return self.cpu_s / self.frames * 1e6


class FedEngine:
    """A built, never started AsyncEngine whose `generate` opens a stream for `feed` to fill."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.open: dict[str, RequestStream] = {}
        engine.generate = self._generate  # type: ignore[method-assign]

    def _generate(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, adapter: str | None = None
    ) -> RequestStream:
        stream = RequestStream(self.engine, request_id)
        self.engine._streams[request_id] = stream
        self.open[request_id] = stream
        return stream

    async def feed(self, num_streams: int, tokens: int, per_step: int) -> None:
        """Steps until `num_streams` streams have had `tokens` increments each, `per_step` at a time;
        each step waits until every stream has sent what the step before put."""
        sent: dict[str, int] = {}
        while len(sent) < num_streams or self.open:
            await asyncio.sleep(0)
            if any(stream.backlog for stream in self.open.values()):
                continue
            for request_id, stream in list(self.open.items()):
                for _ in range(per_step):
                    count = sent[request_id] = sent.get(request_id, 0) + 1
                    finish = FinishReason.LENGTH if count == tokens else None
                    stream.put(RequestOutput(request_id, TEXT, [5], 10, count, finish))
                    if finish is not None:
                        del self.open[request_id]
                        break


def _scope(body: bytes, index: int) -> dict[str, Any]:
    """What the app reads of a POST's scope (each request from its own client port)."""
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    path = "/v1/chat/completions"
    return {
        "type": "http",
        "method": "POST",
        "path": path,
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 10000 + index),
    }


async def _request(app: Any, body: bytes, index: int, finished: asyncio.Event) -> int:
    """One streamed chat completion through the app; returns the number of body frames it sent."""
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await finished.wait()
        return {"type": "http.disconnect"}

    frames = 0

    async def send(message: dict[str, Any]) -> None:
        nonlocal frames
        if message["type"] == "http.response.body" and message.get("body"):
            frames += 1

    await app(_scope(body, index), receive, send)
    return frames


async def measure(app: Any, fed: FedEngine, way: str, num_streams: int, tokens: int) -> Run:
    body = json.dumps(
        {
            "model": "chatmed-consult",
            "messages": [{"role": "user", "content": "头痛发热三天，应该吃什么药？"}],
            "stream": True,
            "max_tokens": tokens,
        }
    ).encode()
    finished = asyncio.Event()
    started = time.process_time()
    feeding = asyncio.ensure_future(fed.feed(num_streams, tokens, 1 if way == KEEPS_UP else BEHIND))
    frames = await asyncio.gather(*(_request(app, body, i, finished) for i in range(num_streams)))
    finished.set()
    await feeding
    return Run(way, num_streams * tokens, sum(frames), time.process_time() - started)


async def run_all(num_streams: int, tokens: int, rounds: int, cache_dir: Path | None) -> list[Run]:
    demo = build_demo(DemoSpec.tiny(), cache_dir)
    engine = AsyncEngine(EngineConfig(model_path=demo.base_path, adapters=tuple(demo.adapters.items())))
    fed = FedEngine(engine)
    app = create_app(Settings(), engine)
    await measure(app, fed, KEEPS_UP, 4, 8)  # warm-up: first-call imports and caches
    runs = []
    for _ in range(rounds):
        for way in (KEEPS_UP, FALLS_BEHIND):
            runs.append(await measure(app, fed, way, num_streams, tokens))
    return runs


def table(runs: Sequence[Run]) -> str:
    rows = []
    for way in (KEEPS_UP, FALLS_BEHIND):
        mine = [r for r in runs if r.way == way]
        rows.append(
            [
                way,
                len(mine),
                statistics.median(r.frames / r.tokens for r in mine),
                statistics.median(r.us_per_token for r in mine),
                statistics.median(r.us_per_frame for r in mine),
            ]
        )
    return format_table(["way", "runs", "frames/token", "CPU us/token", "CPU us/frame"], rows, digits=2)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.http_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cache-dir", type=Path, default=None, help="demo model cache")
    parser.add_argument("--json", type=Path, default=None, help="write results here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    if min(args.streams, args.tokens, args.rounds) < 1:
        raise SystemExit("--streams, --tokens and --rounds must be positive")
    logging.basicConfig(level=logging.WARNING)
    load_before = load_note()
    runs = asyncio.run(run_all(args.streams, args.tokens, args.rounds, args.cache_dir))
    print(table(runs))
    print(
        f"{args.streams} streamed chat completions x {args.tokens} tokens through the app in this process "
        f"(one token = one increment of {TEXT!r}); medians over {args.rounds} alternated rounds"
    )
    print(f"at start: {load_before}\nat end: {load_note()}")
    if args.json is not None:
        payload = {
            "benchmark": "http_cost",
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "runs": [{"way": r.way, "tokens": r.tokens, "frames": r.frames, "cpu_s": r.cpu_s} for r in runs],
        }
        write_json(args.json, payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
