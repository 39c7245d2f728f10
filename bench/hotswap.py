"""Hot-swap stall: the longest gap between two outputs of a running stream while an adapter loads, against
the same streams' median gap, on the ~20M-parameter bench model.

    python -m bench.hotswap [--num-streams 2] [--max-tokens 400] [--num-loads 8] [--rank 64] [--json PATH]

Three runs, each with streams on chatmed-consult and chatmed-tcm (greedy, EOS ignored) while an adapter of
--rank on all seven projections is loaded and unloaded --num-loads times (safetensors and .bin in turn):
- `server`: our real server over HTTP (`/v1/load_lora_adapter`), in float32 as the in-process runs,
  output times taken by the client (completions with logprobs, so that an increment whose text is held
  back still comes as an event);
- `engine, off-thread`: the AsyncEngine in process, `add_adapter` (reads on a worker thread, publishes
  between two steps), output times taken as the increments arrive;
- `engine, on-thread`: the same load done inside the engine thread, for contrast: what the streams would
  suffer if reading the checkpoint ran where the steps run.
A gap is the time between two increments of a stream (one per engine step while the reader keeps up;
tokens that queued up while it did not come as one increment). A gap is "during a load" when it overlaps
the time between sending the load and its answer.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx2

from bench.report import format_table, write_json
from bench.servers import ServerProcess, ServerSpec
from bench.stats import percentile
from engine import CHATMED_TEMPLATE, AsyncEngine, EngineConfig, SamplingParams
from engine.demo import DemoModel, DemoSpec, build_demo, make_adapter

logger = logging.getLogger(__name__)

ADMIN_KEY = "bench-admin-key"
QUESTIONS = ("孩子咳嗽一周了，夜里加重，怎么办？", "舌苔发白是什么原因？", "最近总是失眠多梦，该怎么调理？")
FOLDERS = ("hot-safetensors", "hot-bin")
WARMUP_TOKENS = 20  # outputs each stream has before the first load
LOAD_SPACING_S = 0.3  # pause between an unload and the next load: gaps outside loads are needed too
LoadFn = Callable[[str, Path], Awaitable[None]]


@dataclass
class StallRun:
    """One run's output times (per stream: when each increment came) and load windows, and the figures
    derived from them."""

    name: str
    token_times: list[list[float]] = field(default_factory=list)
    windows: list[tuple[float, float]] = field(default_factory=list)

    def gaps(self) -> tuple[list[float], list[float]]:
        """(the gaps between outputs outside every load window, those that overlap one), in seconds."""
        outside, during = [], []
        for times in self.token_times:
            for start, end in itertools.pairwise(times):
                overlaps = any(start < w_end and end > w_start for w_start, w_end in self.windows)
                (during if overlaps else outside).append(end - start)
        return outside, during

    def figures(self) -> dict[str, float | int]:
        outside, during = self.gaps()
        median = percentile(outside + during, 50)
        longest = max(during, default=float("nan"))
        return {
            "loads": len(self.windows),
            "outputs": sum(len(t) for t in self.token_times),
            "median_gap_ms": median * 1e3,
            "max_gap_outside_loads_ms": max(outside, default=float("nan")) * 1e3,
            "median_gap_during_loads_ms": percentile(during, 50) * 1e3,
            "max_gap_during_loads_ms": longest * 1e3,
            "max_during_over_median": longest / median if median > 0 else float("nan"),
            "load_p50_ms": percentile([end - start for start, end in self.windows], 50) * 1e3,
        }


def make_hot_adapters(demo: DemoModel, root: Path, rank: int) -> None:
    """One adapter of `rank` on all seven projections, saved as safetensors and as a .bin pickle."""
    for folder, safe in zip(FOLDERS, (True, False), strict=True):
        make_adapter(
            demo.base_path, root / folder, r=rank, lora_alpha=2 * rank, seed=7, safe_serialization=safe
        )


async def swap_during(
    run: StallRun,
    load: LoadFn,
    unload: Callable[[str], Awaitable[None]],
    root: Path,
    num_loads: int,
    streams_done: Callable[[], bool],
) -> None:
    """Load and unload `num_loads` times (while the streams last), recording each load's window."""
    for i in range(num_loads):
        if streams_done():
            logger.warning("the streams ended after %d loads: raise --max-tokens for more", i)
            return
        started = time.monotonic()
        await load("hot", root / FOLDERS[i % len(FOLDERS)])
        run.windows.append((started, time.monotonic()))
        await unload("hot")
        await asyncio.sleep(LOAD_SPACING_S)


async def _wait_warm(run: StallRun, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while min(len(t) for t in run.token_times) < WARMUP_TOKENS:
        if time.monotonic() > deadline:
            raise RuntimeError("the streams did not start")
        await asyncio.sleep(0.01)


# ---- over HTTP ------------------------------------------------------------------------------------------


async def _http_stream(
    client: httpx2.AsyncClient, model: str, question: str, max_tokens: int, times: list[float]
) -> None:
    body = {
        "model": model,
        "prompt": f"<s>问：\n{question}\n答：\n",
        "max_tokens": max_tokens,
        "temperature": 0,
        "repetition_penalty": 1.0,
        "ignore_eos": True,
        "logprobs": 0,  # an event for every increment, even when its text is held back
        "stream": True,
    }
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[len("data: ") :])
                if "error" in event:
                    raise RuntimeError(f"error event: {event['error'].get('message')}")
                logprobs = (event.get("choices") or [{}])[0].get("logprobs") or {}
                if logprobs.get("tokens"):
                    times.append(time.monotonic())


async def run_server(demo: DemoModel, root: Path, args: argparse.Namespace, work: Path) -> StallRun:
    command = [sys.executable, "-m", "server", "--base-model", str(demo.base_path), "--port", "{port}"]
    for name, path in sorted(demo.adapters.items()):
        command += ["--adapter", f"{name}={path}"]
    command += ["--admin-api-key", ADMIN_KEY, "--adapters-root", str(root), "--max-lora-rank", str(args.rank)]
    command += ["--log-level", "warning", "--dtype", "float32"]
    run = StallRun("server (HTTP), load off the engine thread")
    with ServerProcess(ServerSpec("chatmed", tuple(command)), work / "server.log") as server:
        base_url = server.base_url.removesuffix("/v1")
        headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
        async with httpx2.AsyncClient(base_url=base_url, timeout=600.0) as client:

            async def load(name: str, path: Path) -> None:
                body = {"lora_name": name, "lora_path": str(path)}
                (await client.post("/v1/load_lora_adapter", json=body, headers=headers)).raise_for_status()

            async def unload(name: str) -> None:
                body = {"lora_name": name}
                (await client.post("/v1/unload_lora_adapter", json=body, headers=headers)).raise_for_status()

            run.token_times = [[] for _ in range(args.num_streams)]
            streams = [
                asyncio.create_task(_http_stream(client, _model(i), QUESTIONS[i % 3], args.max_tokens, times))
                for i, times in enumerate(run.token_times)
            ]
            await _wait_warm(run)
            await swap_during(run, load, unload, root, args.num_loads, lambda: any(s.done() for s in streams))
            await asyncio.gather(*streams)
    return run


# ---- in process ---------------------------------------------------------------------------------------


async def _engine_stream(engine: AsyncEngine, i: int, max_tokens: int, times: list[float]) -> None:
    ids = engine.tokenizer.encode_chat([{"role": "user", "content": QUESTIONS[i % 3]}], CHATMED_TEMPLATE)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    async for out in engine.generate(f"stream-{i}", ids, params, _model(i)):
        if out.token_ids:
            times.append(time.monotonic())


async def run_engine(demo: DemoModel, root: Path, args: argparse.Namespace, on_thread: bool) -> StallRun:
    config = EngineConfig(
        model_path=demo.base_path, adapters=tuple(sorted(demo.adapters.items())), max_lora_rank=args.rank
    )
    engine = AsyncEngine(config)
    engine.start()
    where = "on the engine thread (contrast)" if on_thread else "off-thread"
    run = StallRun(f"engine in process, load {where}")
    try:

        async def load(name: str, path: Path) -> None:
            if on_thread:  # what a naive server would do: read the checkpoint between two steps
                core = engine.core
                await engine._call(lambda: core.add_adapter(core.read_adapter(name, path)))
            else:
                await engine.add_adapter(name, path)

        run.token_times = [[] for _ in range(args.num_streams)]
        streams = [
            asyncio.create_task(_engine_stream(engine, i, args.max_tokens, times))
            for i, times in enumerate(run.token_times)
        ]
        await _wait_warm(run)
        await swap_during(
            run, load, engine.remove_adapter, root, args.num_loads, lambda: any(s.done() for s in streams)
        )
        await asyncio.gather(*streams)
    finally:
        engine.shutdown()
    return run


def _model(i: int) -> str:
    return ("chatmed-consult", "chatmed-tcm")[i % 2]


# ---- report -------------------------------------------------------------------------------------------


def results_table(runs: Sequence[StallRun]) -> str:
    headers = ["run", "loads", "outputs", "median gap", "max gap, no load", "median gap, load"]
    headers += ["max gap, load", "max in load / median", "load p50"]
    rows = []
    for run in runs:
        f = run.figures()
        keys = ("median_gap_ms", "max_gap_outside_loads_ms", "median_gap_during_loads_ms")
        keys += ("max_gap_during_loads_ms", "max_during_over_median", "load_p50_ms")
        rows.append([run.name, f["loads"], f["outputs"], *(f[k] for k in keys)])
    return (
        format_table(headers, rows)
        + "\n(gaps and load times in ms; a gap is 'in a load' when it overlaps one)"
    )


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.hotswap", description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-streams", type=int, default=2, help="streams running during the loads")
    parser.add_argument("--max-tokens", type=int, default=400, help="tokens per stream (EOS ignored)")
    parser.add_argument("--num-loads", type=int, default=8, help="loads per run (each followed by an unload)")
    parser.add_argument("--rank", type=int, default=64, help="rank of the adapter loaded")
    parser.add_argument("--runs", default="server,off-thread,on-thread", help="which runs, comma-separated")
    parser.add_argument("--cache-dir", type=Path, default=None, help="demo model cache")
    parser.add_argument("--json", type=Path, default=None, help="write results here")
    return parser.parse_args(argv)


async def _run_all(args: argparse.Namespace) -> list[StallRun]:
    demo = build_demo(DemoSpec.bench(), cache_dir=args.cache_dir)
    wanted = {part.strip() for part in args.runs.split(",")}
    runs = []
    with tempfile.TemporaryDirectory(prefix="chatmed-hotswap-") as tmp:
        root = Path(tmp) / "adapters"
        make_hot_adapters(demo, root, args.rank)
        if "server" in wanted:
            runs.append(await run_server(demo, root, args, Path(tmp)))
        if "off-thread" in wanted:
            runs.append(await run_engine(demo, root, args, on_thread=False))
        if "on-thread" in wanted:
            runs.append(await run_engine(demo, root, args, on_thread=True))
    return runs


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    runs = asyncio.run(_run_all(args))
    print(results_table(runs))
    print(
        f"{args.num_streams} streams x {args.max_tokens} tokens (consult/tcm), {args.num_loads} loads of a "
        f"rank-{args.rank} adapter on all 7 projections (safetensors and .bin in turn) per run"
    )
    if args.json is not None:
        payload: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
        payload["runs"] = [{"name": r.name, **r.figures(), "windows": asdict(r)["windows"]} for r in runs]
        write_json(args.json, payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
