"""Hot-swapping under traffic: adapters loaded while streams on other adapters run, and one device slot
shared by three adapters in use at once. Every output must be its own adapter's (no cross-adapter leak),
and eviction must never take an adapter from a request that is using it."""

from __future__ import annotations

import asyncio
import json
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import pytest

from engine import AsyncEngine, EngineCore, SamplingParams
from engine.demo import DemoModel
from engine.errors import UnknownAdapter
from tests.adapters.conftest import (
    AdapterTree,
    admin_app,
    admin_headers,
    greedy_body,
    peft_greedy,
    prompt_ids,
    serve_over_tcp,
)
from tests.conftest import engine_config
from tests.server.conftest import BASE, CONSULT, TCM, asgi_client

pytestmark = pytest.mark.asyncio(loop_scope="module")

TIMEOUT_S = 120
QUESTIONS = ("头痛发热三天，应该吃什么药？", "黄芪的功效是什么？", "失眠多梦，舌红少苔，中医怎么调理？")


async def _stream_text(client: httpx2.AsyncClient, body: dict[str, Any], marks: list[float]) -> str:
    """A streamed completion's text; appends the loop time of every event to `marks`."""
    loop = asyncio.get_running_loop()
    text = []
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: ") :])
            assert "error" not in event, event
            text.append(event["choices"][0]["text"])
            marks.append(loop.time())
    return "".join(text)


async def _load(client: httpx2.AsyncClient, name: str, folder: str) -> float:
    """Load an adapter and return the loop time at which the server confirmed it."""
    body = {"lora_name": name, "lora_path": folder}
    response = await client.post("/v1/load_lora_adapter", json=body, headers=admin_headers())
    assert response.status_code == 200, response.text
    return asyncio.get_running_loop().time()


async def test_adapters_load_while_other_adapters_stream(
    engine: AsyncEngine, demo: DemoModel, adapter_tree: AdapterTree
) -> None:
    num_stream_tokens, num_tokens = 200, 16
    ids = {
        model: prompt_ids(engine.tokenizer, q) for model, q in zip((CONSULT, TCM), QUESTIONS, strict=False)
    }
    async with serve_over_tcp(admin_app(engine, adapter_tree)) as client:
        # What each stream must produce, measured before any adapter changes.
        expected = {
            model: (
                await client.post("/v1/completions", json=greedy_body(model, p, num_stream_tokens))
            ).json()
            for model, p in ids.items()
        }
        marks: dict[str, list[float]] = {model: [] for model in ids}
        streams = {
            model: asyncio.create_task(
                _stream_text(client, greedy_body(model, p, num_stream_tokens), marks[model])
            )
            for model, p in ids.items()
        }
        for _ in range(1000):  # both streams under way
            if all(marks.values()):
                break
            await asyncio.sleep(0.01)
        loaded_at = [await _load(client, "hot-bin", "bin-r4"), await _load(client, "hot-rs", "rs-r32")]
        texts = await asyncio.wait_for(asyncio.gather(*streams.values()), TIMEOUT_S)
        for model, text in zip(streams, texts, strict=True):
            assert text == expected[model]["choices"][0]["text"]
            # The loads really happened mid-stream: events before the first and after the last.
            assert marks[model][0] < loaded_at[0] and marks[model][-1] > loaded_at[-1]
        question = prompt_ids(engine.tokenizer)
        for name, folder in (("hot-bin", "bin-r4"), ("hot-rs", "rs-r32")):
            reference = peft_greedy(demo, adapter_tree.root / folder, question, num_tokens)
            body = greedy_body(name, question, num_tokens)
            answer = (await client.post("/v1/completions", json=body)).json()
            assert answer["choices"][0]["text"] == engine.tokenizer.decode(reference)
            unloaded = await client.post(
                "/v1/unload_lora_adapter", json={"lora_name": name}, headers=admin_headers()
            )
            assert unloaded.status_code == 200


@dataclass
class EvictionLog:
    """Every adapter taken out of a tier, and whether a request was using it at that moment."""

    core: EngineCore
    evictions: list[tuple[str, str, bool]] = field(default_factory=list)
    max_running_adapters: int = 0

    def record(self, tier: str, name: str) -> None:
        if tier == "device":
            users = {seq.adapter for seq in self.core.scheduler.running}
        else:
            users = {req.seq.adapter for req in self.core.requests.values()}
        self.evictions.append((tier, name, name in users))


class _SpyTier(OrderedDict[str, Any]):
    """An LoraSlots tier that reports each removal to an EvictionLog (called on the engine thread, so the
    engine's state is consistent when it is read)."""

    def __init__(self, log: EvictionLog, tier: str, items: OrderedDict[str, Any]) -> None:
        super().__init__(items)
        self._log, self._tier = log, tier

    def __delitem__(self, name: str) -> None:
        self._log.record(self._tier, name)
        super().__delitem__(name)

    def pop(self, name: str, *default: Any) -> Any:
        if name in self:
            self._log.record(self._tier, name)
        return super().pop(name, *default)


def _spy_on(core: EngineCore) -> EvictionLog:
    log = EvictionLog(core)
    loras = core.loras
    loras.host = _SpyTier(log, "host", loras.host)
    loras.resident = _SpyTier(log, "device", loras.resident)
    segments = loras.segments

    def counting_segments(spans: list[tuple[str | None, int, int]]) -> Any:
        running = {seq.adapter for seq in core.scheduler.running if seq.adapter is not None}
        log.max_running_adapters = max(log.max_running_adapters, len(running))
        return segments(spans)

    loras.segments = counting_segments  # type: ignore[method-assign]
    return log


async def test_one_device_slot_three_adapters_in_use(demo: DemoModel, adapter_tree: AdapterTree) -> None:
    num_tokens = 12
    greedy = SamplingParams(max_tokens=num_tokens, temperature=0.0, ignore_eos=True)
    reference = EngineCore(engine_config(demo))
    reference.add_adapter(reference.read_adapter("hot-bin", adapter_tree.root / "bin-r4"))
    narrow = AsyncEngine(engine_config(demo, max_loras=1, max_cpu_loras=1, max_model_len=256))
    log = _spy_on(narrow.core)
    narrow.start()
    try:
        async with asgi_client(admin_app(narrow, adapter_tree)) as client:
            await _load(client, "hot-bin", "bin-r4")
            models = [CONSULT, TCM, "hot-bin", BASE]
            jobs = [(model, q) for q in QUESTIONS for model in models]  # interleaved: slots must churn
            bodies = [greedy_body(m, prompt_ids(narrow.tokenizer, q), num_tokens) for m, q in jobs]
            responses = await asyncio.wait_for(
                asyncio.gather(*(client.post("/v1/completions", json=b) for b in bodies)), TIMEOUT_S
            )
        for (model, question), response in zip(jobs, responses, strict=True):
            assert response.status_code == 200, response.text
            adapter = None if model == BASE else model
            ids = prompt_ids(narrow.tokenizer, question)
            expected = reference.generate([ids], greedy, [adapter])[0]
            assert response.json()["choices"][0]["text"] == expected.text, (model, question)
        assert log.max_running_adapters == 1
        assert any(tier == "device" for tier, _, _ in log.evictions)
        assert any(tier == "host" for tier, _, _ in log.evictions)
        assert [e for e in log.evictions if e[2]] == []  # nothing taken from a request using it
        assert len(narrow.core.loras.host) <= 1 and len(narrow.core.loras.resident) <= 1
        assert set(narrow.adapters()) == {CONSULT, TCM, "hot-bin"}
    finally:
        narrow.shutdown()


async def test_an_adapter_unloaded_during_its_re_read_stays_unloaded(demo: DemoModel) -> None:
    narrow = AsyncEngine(engine_config(demo, max_loras=1, max_cpu_loras=1))
    read = narrow.core.read_adapter

    def slow_read(name: str, path: Path) -> Any:  # on the worker thread: holds the re-read open
        time.sleep(0.5)
        return read(name, path)

    narrow.core.read_adapter = slow_read  # type: ignore[method-assign]
    narrow.start()
    try:
        evicted = next(name for name in (CONSULT, TCM) if name not in narrow.core.loras.host)
        params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        stream = narrow.generate("re-read", prompt_ids(narrow.tokenizer), params, evicted)
        await asyncio.sleep(0.1)  # the re-read is under way
        await narrow.remove_adapter(evicted)  # nothing in the core uses it yet: the unload succeeds
        with pytest.raises(UnknownAdapter):  # the request waiting for it is told it is gone
            await asyncio.wait_for(anext(stream), TIMEOUT_S)
        assert evicted not in narrow.adapters()
    finally:
        narrow.shutdown()
