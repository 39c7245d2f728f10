"""AsyncEngine: the engine thread behind asyncio — streaming, aborts, failures, a dead engine, adapters."""

from __future__ import annotations

import asyncio
import ctypes
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch

from engine import CHATMED_TEMPLATE, AsyncEngine, EngineCore, SamplingParams
from engine.async_engine import RequestStream
from engine.demo import DemoModel
from engine.errors import AdapterExists, AdapterInUse, EngineDead, QueueFull, RequestFailed, UnknownAdapter
from engine.types import FinishReason, RequestOutput, TokenLogprob
from tests.conftest import engine_config

GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
TIMEOUT_S = 60


@pytest.fixture(scope="module")
def reference(demo: DemoModel) -> EngineCore:
    """A separate synchronous engine for expected outputs (the async engine's core is its thread's alone)."""
    return EngineCore(engine_config(demo))


@pytest.fixture
async def engine(demo: DemoModel) -> AsyncIterator[AsyncEngine]:
    eng = AsyncEngine(engine_config(demo))
    eng.start()
    yield eng
    eng.shutdown()


def _prompt(engine: AsyncEngine, question: str) -> list[int]:
    return engine.tokenizer.encode_chat([{"role": "user", "content": question}], CHATMED_TEMPLATE)


async def _collect(
    engine: AsyncEngine, rid: str, prompt: list[int], params: SamplingParams, adapter: str | None
) -> list[RequestOutput]:
    stream = engine.generate(rid, prompt, params, adapter)
    try:
        return [out async for out in stream]
    finally:
        await stream.aclose()


async def _wait_until_idle(engine: AsyncEngine) -> None:
    for _ in range(200):
        s = engine.stats()
        if s.num_running == 0 and s.num_waiting == 0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("engine did not become idle")


async def test_streams_equal_the_synchronous_engine(engine: AsyncEngine, reference: EngineCore) -> None:
    questions = ["头痛发热三天，应该吃什么药？", "黄芪的功效是什么？", "孩子咳嗽一周了怎么办？"]
    adapters: list[str | None] = ["chatmed-consult", "chatmed-tcm", None]
    prompts = [_prompt(engine, q) for q in questions]
    results = await asyncio.wait_for(
        asyncio.gather(
            *(
                _collect(engine, f"r{i}", p, GREEDY, a)
                for i, (p, a) in enumerate(zip(prompts, adapters, strict=True))
            )
        ),
        TIMEOUT_S,
    )
    for outs, prompt, adapter in zip(results, prompts, adapters, strict=True):
        assert outs[-1].finished and all(not o.finished for o in outs[:-1])
        ids = [t for o in outs for t in o.token_ids]
        expected = reference.generate([prompt], GREEDY, [adapter])[0]
        assert ids == expected.token_ids
        assert "".join(o.text for o in outs) == expected.text


def _increment(text: str, token: int, count: int, finish: FinishReason | None = None) -> RequestOutput:
    logprob = TokenLogprob(token, text, -0.5 * token)
    return RequestOutput("r", text, [token], 5, count, finish, None, [logprob])


async def test_increments_that_queue_up_are_read_as_one(engine: AsyncEngine) -> None:
    """A reader that keeps up gets each step's increment; one that fell behind gets those waiting joined
    (text, tokens, logprobs; the last one's counts and finish), and an error queued after them next."""
    stream = RequestStream(engine, "r")
    stream.put(_increment("头", 1, 1))
    first = await anext(stream)
    assert (first.text, first.token_ids) == ("头", [1])
    for text, token, count in [("痛", 2, 2), ("发", 3, 3), ("热", 4, 4)]:
        stream.put(_increment(text, token, count))
    joined = await anext(stream)
    assert (joined.text, joined.token_ids, joined.num_output_tokens) == ("痛发热", [2, 3, 4], 4)
    assert joined.logprobs is not None and [lp.token_id for lp in joined.logprobs] == [2, 3, 4]
    assert not joined.finished
    stream.put(_increment("，", 5, 5))
    stream.put(RequestFailed("boom"))
    assert (await anext(stream)).text == "，"
    with pytest.raises(RequestFailed):
        await anext(stream)
    with pytest.raises(StopAsyncIteration):
        await anext(stream)

    ending = RequestStream(engine, "s")
    ending.put(_increment("好", 6, 1))
    ending.put(_increment("。", 7, 2, FinishReason.LENGTH))
    last = await anext(ending)
    assert (last.text, last.finish_reason, last.num_output_tokens) == ("好。", FinishReason.LENGTH, 2)
    with pytest.raises(StopAsyncIteration):
        await anext(ending)


async def test_a_slow_reader_gets_the_same_text_in_fewer_increments(
    engine: AsyncEngine, reference: EngineCore
) -> None:
    prompt = _prompt(engine, "失眠多梦，舌红少苔，中医怎么调理？")
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True, logprobs=2)
    stream = engine.generate("slow", prompt, params, "chatmed-tcm")
    outs = []
    try:
        async with asyncio.timeout(TIMEOUT_S):
            async for out in stream:
                outs.append(out)
                await asyncio.sleep(0.05)  # several engine steps pass while this reader is away
    finally:
        await stream.aclose()
    expected = reference.generate([prompt], params, ["chatmed-tcm"])[0]
    assert [t for o in outs for t in o.token_ids] == expected.token_ids
    assert "".join(o.text for o in outs) == expected.text
    assert [lp.token_id for o in outs for lp in o.logprobs or ()] == expected.token_ids
    assert outs[-1].finished and outs[-1].num_output_tokens == 32
    assert len(outs) < 32  # joined while the reader slept


async def test_closing_a_stream_aborts_and_frees_blocks(engine: AsyncEngine) -> None:
    prompt = _prompt(engine, "失眠多梦怎么办？")
    stream = engine.generate("leaver", prompt, SamplingParams(max_tokens=200, ignore_eos=True), None)
    first = await asyncio.wait_for(stream.__anext__(), TIMEOUT_S)
    assert not first.finished
    await stream.aclose()
    await _wait_until_idle(engine)
    stats = engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks


async def test_one_failing_request_fails_alone(engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    original = engine.core._advance

    def faulty(req, token_id, now):  # type: ignore[no-untyped-def]
        if req.seq.request_id == "victim":
            raise RuntimeError("injected fault")
        return original(req, token_id, now)

    monkeypatch.setattr(engine.core, "_advance", faulty)
    await _only_the_victim_fails(engine, GREEDY, "chatmed-tcm")


async def _only_the_victim_fails(engine: AsyncEngine, victim_params: SamplingParams, bystander: str) -> None:
    """The request "victim" (on chatmed-tcm) fails with RequestFailed; a greedy bystander on `bystander`
    runs beside it to the end; the engine lives on and every KV block comes back."""
    prompt = _prompt(engine, "胃痛怎么办？")
    victim = asyncio.create_task(_collect(engine, "victim", prompt, victim_params, "chatmed-tcm"))
    other = asyncio.create_task(_collect(engine, "bystander", prompt, GREEDY, bystander))
    with pytest.raises(RequestFailed):
        await asyncio.wait_for(victim, TIMEOUT_S)
    outs = await asyncio.wait_for(other, TIMEOUT_S)
    assert outs[-1].finished and sum(len(o.token_ids) for o in outs) == GREEDY.max_tokens
    assert not engine.is_dead
    await _wait_until_idle(engine)
    assert engine.stats().num_free_blocks == engine.stats().num_total_blocks


async def test_a_request_whose_sampling_fails_fails_alone(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DESIGN: an exception in one request's processing fails that request only, sampling included."""
    original = engine.core.sampler.sample
    calls = {"batched": 0}

    def faulty(logits, rows):  # type: ignore[no-untyped-def]
        if any(row.params.seed == 666 for row in rows):
            calls["batched"] += len(rows) > 1
            raise RuntimeError("injected sampler fault")
        return original(logits, rows)

    monkeypatch.setattr(engine.core.sampler, "sample", faulty)
    doomed = SamplingParams(max_tokens=GREEDY.max_tokens, temperature=0.7, seed=666)
    await _only_the_victim_fails(engine, doomed, "chatmed-consult")
    assert calls["batched"] >= 1  # the two were sampled together, then one by one


async def test_a_dead_engine_ends_every_stream(engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> list[RequestOutput]:
        raise RuntimeError("injected engine fault")

    monkeypatch.setattr(engine.core, "step", broken)
    prompt = _prompt(engine, "胃痛怎么办？")
    streams = [engine.generate(f"s{i}", prompt, GREEDY, None) for i in range(3)]
    for stream in streams:
        with pytest.raises(EngineDead):
            await asyncio.wait_for(stream.__anext__(), TIMEOUT_S)
    assert engine.is_dead
    with pytest.raises(EngineDead):
        engine.generate("late", prompt, GREEDY, None)


async def test_queue_limit_refuses_at_once(demo: DemoModel) -> None:
    eng = AsyncEngine(engine_config(demo, max_queued_requests=2))  # not started: nothing drains the queue
    prompt = _prompt(eng, "头痛")
    eng.generate("a", prompt, GREEDY, None)
    eng.generate("b", prompt, GREEDY, None)
    with pytest.raises(QueueFull):
        eng.check_capacity()
    with pytest.raises(QueueFull):
        eng.generate("c", prompt, GREEDY, None)


async def test_adapters_are_added_and_removed_while_running(
    engine: AsyncEngine, demo: DemoModel, reference: EngineCore
) -> None:
    prompt = _prompt(engine, "黄芪的功效是什么？")
    expected = reference.generate([prompt], GREEDY, ["chatmed-tcm"])[0].token_ids
    await engine.add_adapter("tcm-copy", demo.adapters["chatmed-tcm"])
    assert engine.adapters()["tcm-copy"] == demo.adapters["chatmed-tcm"]
    with pytest.raises(AdapterExists):
        await engine.add_adapter("tcm-copy", demo.adapters["chatmed-tcm"])
    outs = await asyncio.wait_for(_collect(engine, "copy", prompt, GREEDY, "tcm-copy"), TIMEOUT_S)
    assert [t for o in outs for t in o.token_ids] == expected
    long_running = engine.generate(
        "busy", prompt, SamplingParams(max_tokens=100, ignore_eos=True), "tcm-copy"
    )
    await asyncio.wait_for(long_running.__anext__(), TIMEOUT_S)
    with pytest.raises(AdapterInUse):
        await engine.remove_adapter("tcm-copy")
    await long_running.aclose()
    await _wait_until_idle(engine)
    await engine.remove_adapter("tcm-copy")
    assert "tcm-copy" not in engine.adapters()
    with pytest.raises(UnknownAdapter):
        engine.generate("gone", prompt, GREEDY, "tcm-copy")


def test_engine_imports_nothing_web_related() -> None:
    code = (
        "import sys, engine\n"
        "web = {'fastapi', 'starlette', 'pydantic', 'uvicorn', 'sse_starlette'}\n"
        "loaded = sorted(web & {m.split('.')[0] for m in sys.modules})\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


async def test_evicted_adapters_are_read_back_and_never_mixed(demo: DemoModel, reference: EngineCore) -> None:
    eng = AsyncEngine(engine_config(demo, max_loras=1, max_cpu_loras=1))
    eng.start()
    try:
        await eng.add_adapter("tcm-copy", demo.adapters["chatmed-tcm"])
        prompt = _prompt(eng, "黄芪的功效是什么？")
        names: list[str | None] = ["chatmed-consult", "chatmed-tcm", "tcm-copy", None] * 2
        results = await asyncio.wait_for(
            asyncio.gather(*(_collect(eng, f"e{i}", prompt, GREEDY, n) for i, n in enumerate(names))),
            TIMEOUT_S,
        )
        expected = {
            n: reference.generate([prompt], GREEDY, ["chatmed-tcm" if n == "tcm-copy" else n])[0]
            for n in set(names)
        }
        for name, outs in zip(names, results, strict=True):
            assert [t for o in outs for t in o.token_ids] == expected[name].token_ids
        assert len(eng.core.loras.host) == 1
    finally:
        eng.shutdown()


async def test_the_engine_thread_runs_on_the_configured_number_of_threads(demo: DemoModel) -> None:
    """OpenMP keeps a thread count per calling thread: torch.set_num_threads on the thread that built the
    engine leaves the engine thread's matmuls on every core unless that thread sets it too."""
    libgomp = next((Path(torch.__file__).parent / "lib").glob("libgomp*.so*"), None)
    if libgomp is None:
        pytest.skip("this torch build does not ship GNU OpenMP")
    omp_get_max_threads = ctypes.CDLL(str(libgomp)).omp_get_max_threads
    eng = AsyncEngine(engine_config(demo, num_threads=1))
    eng.start()
    try:
        assert await asyncio.wait_for(eng._call(omp_get_max_threads), TIMEOUT_S) == 1
    finally:
        eng.shutdown()
