"""RELIABILITY.md T13, on a real server: load and unload an adapter 20 times while clients stream on both
ChatMed adapters. Every greedy output must equal its own adapter's reference (leaks = 0), unloading an
adapter in use must be refused cleanly, and the server's memory must not grow with the cycles.
Prints [cycles, requests, leaks, refusals, load time, RSS delta]."""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import openai
import psutil
import pytest

from bench.servers import ServerProcess, ServerSpec
from engine import Tokenizer
from engine.demo import DemoModel
from tests.adapters.conftest import (
    ADMIN_KEY,
    QUESTION,
    AdapterTree,
    admin_headers,
    greedy_body,
    peft_greedy,
    prompt_ids,
)
from tests.server.conftest import CONSULT, TCM

pytestmark = [pytest.mark.slow, pytest.mark.asyncio]

NUM_CYCLES = 20
NUM_TOKENS = 24
BUSY_TOKENS = 96  # a stream long enough to be running when its adapter is unloaded
QUESTIONS = ("头痛发热三天，应该吃什么药？", "黄芪的功效是什么？")
HOT_FOLDERS = ("bin-r4", "rs-r32")  # the hot adapter alternates between two checkpoints of other ranks
TIMEOUT_S = 120


@dataclass
class Tally:
    """What the run counted; `leaks` are outputs that differ from their adapter's reference."""

    requests: int = 0
    leaks: int = 0
    errors: list[str] = field(default_factory=list)
    refusals_in_use: int = 0
    load_s: list[float] = field(default_factory=list)


def _server(demo: DemoModel, tree: AdapterTree, log_dir: Path) -> ServerProcess:
    env = {name: value for name, value in os.environ.items() if not name.startswith("CHATMED_")}
    env |= {"CHATMED_CACHE_DIR": str(demo.base_path.parent.parent), "CHATMED_DEMO_SIZE": "tiny"}
    command = (sys.executable, "-m", "server", "--port", "{port}", "--max-model-len", "256")
    command += ("--admin-api-key", ADMIN_KEY, "--adapters-root", str(tree.root), "--max-lora-rank", "32")
    # float32, the dtype of the transformers + peft references the outputs are checked against.
    command += ("--kv-cache-memory-mb", "16", "--log-level", "warning", "--dtype", "float32")
    spec = ServerSpec(name="chatmed", command=command, env=env)
    return ServerProcess(spec, log_dir / "server.log", startup_timeout_s=TIMEOUT_S)


async def _stream(
    oai: openai.AsyncOpenAI, model: str, ids: list[int], max_tokens: int, started: asyncio.Event | None = None
) -> str:
    """A greedy streamed completion through the official SDK; sets `started` at the first chunk."""
    extra = {"repetition_penalty": 1.0, "ignore_eos": True}
    stream = await oai.completions.create(
        model=model, prompt=ids, max_tokens=max_tokens, temperature=0, stream=True, extra_body=extra
    )
    text = []
    async for chunk in stream:
        if started is not None:
            started.set()
        text += [choice.text for choice in chunk.choices]
    return "".join(text)


async def _stream_forever(
    oai: openai.AsyncOpenAI,
    model: str,
    prompts: list[list[int]],
    expected: dict[Any, str],
    tally: Tally,
    stop: asyncio.Event,
) -> None:
    i = 0
    while not stop.is_set():
        ids = prompts[i % len(prompts)]
        try:
            text = await _stream(oai, model, ids, NUM_TOKENS)
        except openai.APIError as e:
            tally.errors.append(f"{model}: {type(e).__name__}")
            continue
        tally.requests += 1
        tally.leaks += text != expected[(model, tuple(ids))]
        i += 1


async def _cycle(
    admin: httpx2.AsyncClient,
    oai: openai.AsyncOpenAI,
    folder: str,
    ids: list[int],
    reference: str,
    tally: Tally,
) -> None:
    """Load `hot`, check it, try to unload it under a running stream, unload it, check it is gone."""
    load_started = time.perf_counter()
    loaded = await admin.post("/v1/load_lora_adapter", json={"lora_name": "hot", "lora_path": folder})
    tally.load_s.append(time.perf_counter() - load_started)
    assert loaded.status_code == 200, loaded.text
    text = await _stream(oai, "hot", ids, NUM_TOKENS)
    tally.requests += 1
    tally.leaks += text != reference
    running = asyncio.Event()
    busy = asyncio.create_task(_stream(oai, "hot", ids, BUSY_TOKENS, running))
    await asyncio.wait_for(running.wait(), TIMEOUT_S)  # it runs: now try to take its adapter away
    refused = await admin.post("/v1/unload_lora_adapter", json={"lora_name": "hot"})
    assert refused.status_code in (200, 409), refused.text  # 200 only if the stream just ended
    if refused.status_code == 409:
        assert refused.json()["error"]["code"] == "adapter_in_use"
        tally.refusals_in_use += 1
    await asyncio.wait_for(busy, TIMEOUT_S)
    if refused.status_code != 200:
        for _ in range(100):
            unloaded = await admin.post("/v1/unload_lora_adapter", json={"lora_name": "hot"})
            if unloaded.status_code == 200:
                break
            await asyncio.sleep(0.05)
        assert unloaded.status_code == 200, unloaded.text
    gone = await admin.post("/v1/completions", json=greedy_body("hot", ids, 4))
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"


async def test_load_and_unload_twenty_times_while_streaming(
    demo: DemoModel, adapter_tree: AdapterTree, tmp_path: Path
) -> None:
    tokenizer = Tokenizer(demo.base_path)
    prompts = [prompt_ids(tokenizer, q) for q in QUESTIONS]
    hot_ids = prompt_ids(tokenizer, QUESTION)
    hot_reference = {
        folder: tokenizer.decode(peft_greedy(demo, adapter_tree.path(folder), hot_ids, NUM_TOKENS))
        for folder in HOT_FOLDERS
    }
    expected = {
        (model, tuple(ids)): tokenizer.decode(peft_greedy(demo, demo.adapters[model], ids, NUM_TOKENS))
        for model in (CONSULT, TCM)
        for ids in prompts
    }
    tally = Tally()
    with _server(demo, adapter_tree, tmp_path) as server:
        process = psutil.Process(server.process.pid if server.process else 0)
        root_url = server.base_url.removesuffix("/v1")
        async with (
            httpx2.AsyncClient(base_url=root_url, headers=admin_headers(), timeout=TIMEOUT_S) as admin,
            openai.AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0) as oai,
        ):
            stop = asyncio.Event()
            streamers = [
                asyncio.create_task(_stream_forever(oai, model, prompts, expected, tally, stop))
                for model in (CONSULT, TCM)
            ]
            rss_start = 0
            try:
                for cycle in range(NUM_CYCLES):
                    folder = HOT_FOLDERS[cycle % 2]
                    await _cycle(admin, oai, folder, hot_ids, hot_reference[folder], tally)
                    if cycle == 1:  # after both checkpoints have been through once
                        rss_start = process.memory_info().rss
            finally:
                stop.set()
                await asyncio.wait_for(asyncio.gather(*streamers), TIMEOUT_S)
            rss_delta_mib = (process.memory_info().rss - rss_start) / 2**20
    print(
        f"\nT13 hot-swap under load: cycles={NUM_CYCLES} requests={tally.requests} leaks={tally.leaks} "
        f"errors={len(tally.errors)} refused_in_use={tally.refusals_in_use} "
        f"load_s p50={statistics.median(tally.load_s):.3f} max={max(tally.load_s):.3f} "
        f"RSS delta={rss_delta_mib:+.1f} MiB (cycles 2..{NUM_CYCLES})"
    )
    assert tally.leaks == 0 and tally.errors == []
    assert tally.requests >= NUM_CYCLES * 2
    assert tally.refusals_in_use > 0  # the in-use path was exercised
