"""Overlapped decode steps (EngineConfig.overlap_steps): a fixed-shape decode step leaves its tokens on the
device and the next step reads them back while it runs. Whatever happens in between (stops, aborts,
arrivals, preemption, logprobs), every request gets the tokens, text and finish it gets without overlap.
On the CPU the fixed-shape steps run eagerly through the same buffers as on a GPU; `gpu` tests capture."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from engine import AsyncEngine
from engine import sampler as sampler_module
from engine.core import EngineCore
from engine.demo import DemoModel
from engine.types import RequestOutput, SamplingParams
from tests.conftest import engine_config
from tests.engine.test_decode_graphs import ADAPTERS, QUESTIONS


def _core(demo: DemoModel, overlap: bool, **overrides: object) -> EngineCore:
    core = EngineCore(engine_config(demo, overlap_steps=overlap, **overrides))
    if core.runner.graphs is None:  # the CPU: fixed-shape steps without capture
        core.runner.use_fixed_decode(16, core.max_model_len, capture=False, lora_units=core.lora_units)
    return core


@pytest.fixture(scope="module")
def plain(demo: DemoModel) -> EngineCore:
    return _core(demo, overlap=False)


@pytest.fixture(scope="module")
def overlapped(demo: DemoModel) -> EngineCore:
    return _core(demo, overlap=True)


@pytest.fixture(autouse=True)
def _leaves_nothing_behind(request: pytest.FixtureRequest) -> Iterator[None]:
    """Tests on the shared overlapped engine: it overlapped steps, and ends idle with every block free."""
    if "overlapped" not in request.fixturenames:
        yield
        return
    overlapped = request.getfixturevalue("overlapped")
    before = overlapped.num_overlapped
    yield
    assert not overlapped.has_unfinished()
    assert overlapped.allocator.num_free == overlapped.allocator.num_blocks
    assert overlapped.num_overlapped > before, "no step ran while the host read the step before"


def _prompts(core: EngineCore) -> list[list[int]]:
    return [core.tokenizer.encode(q) for q in QUESTIONS]


def _same(ours: list[RequestOutput], theirs: list[RequestOutput]) -> None:
    for a, b in zip(ours, theirs, strict=True):
        assert (a.token_ids, a.text, a.finish_reason, a.stop_reason) == (
            b.token_ids,
            b.text,
            b.finish_reason,
            b.stop_reason,
        )


def _params(**common: object) -> list[SamplingParams]:
    """Greedy and seeded draws (repetition penalty; top-p on the two that end by the 9th token, whose
    steps are therefore not deferred), lengths that end at different steps."""
    settings = [(12, 0.0, 1.0), (5, 0.7, 0.9), (20, 0.2, 1.0), (1, 0.0, 1.0), (9, 1.0, 0.9)]
    return [
        SamplingParams(
            max_tokens=n, temperature=t, top_p=p, repetition_penalty=1.3, seed=i, ignore_eos=True, **common
        )
        for i, (n, t, p) in enumerate(settings)
    ]


def test_overlapped_steps_give_each_request_its_own_tokens(plain: EngineCore, overlapped: EngineCore) -> None:
    prompts = _prompts(plain)
    _same(overlapped.generate(prompts, _params(), ADAPTERS), plain.generate(prompts, _params(), ADAPTERS))


def test_stops_found_in_unread_tokens_end_requests_as_without_overlap(
    plain: EngineCore, overlapped: EngineCore
) -> None:
    """A stop token or string that shows up only when the host reads the tokens: the request's row in the
    step already running is dropped."""
    prompts = _prompts(plain)[:3]
    free = plain.generate(
        prompts, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True), ADAPTERS[:3]
    )
    params = [
        SamplingParams(max_tokens=16, temperature=0.0, stop_token_ids=[free[0].token_ids[4]]),
        SamplingParams(max_tokens=16, temperature=0.0, stop=[free[1].text[3:5]]),
        SamplingParams(max_tokens=16, temperature=0.0),
    ]
    ours = overlapped.generate(prompts, params, ADAPTERS[:3])
    _same(ours, plain.generate(prompts, params, ADAPTERS[:3]))
    assert ours[0].stop_reason == free[0].token_ids[4] and len(ours[0].token_ids) <= 5
    assert ours[1].stop_reason == free[1].text[3:5]


def test_a_failed_batched_sampling_leaves_seeded_draws_as_without_overlap(
    plain: EngineCore, overlapped: EngineCore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When a deferred step's batched sampling raises, the step is sampled again the usual way: the
    seeded rows' generators are first put back, so each row draws as often as without overlap."""
    original = sampler_module.sample_from_probs
    failures = itertools.count()

    def flaky(*args: Any) -> torch.Tensor:
        # Some batches fail, each row alone succeeds; which ones depends on the logits, so both engines
        # fail at the same steps. Called after the draws.
        probs = args[0]
        if probs.shape[0] > 1 and int(probs[0].argmax()) % 3 == 0:
            next(failures)
            raise RuntimeError("batched sampling failed")
        return original(*args)

    monkeypatch.setattr(sampler_module, "sample_from_probs", flaky)
    prompts = _prompts(plain)[:2]
    params = [SamplingParams(max_tokens=12, temperature=0.8, seed=5 + i, ignore_eos=True) for i in range(2)]
    _same(overlapped.generate(prompts, params, [None, None]), plain.generate(prompts, params, [None, None]))
    assert next(failures) > 2


def test_unread_tokens_outlive_a_step_that_raises(
    plain: EngineCore, overlapped: EngineCore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step that fails after taking the unread tokens (here its forward) leaves them for the next."""
    prompts = _prompts(plain)[:2]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        overlapped.add_request(f"x{i}", prompt, params)
    got: dict[str, list[int]] = {"x0": [], "x1": []}
    run = overlapped.runner.run
    failed = False

    def fails_once(*args: Any) -> torch.Tensor:
        nonlocal failed
        if not failed and args[2] is not None:  # a step that carries unread tokens
            failed = True
            raise RuntimeError("the forward failed")
        return run(*args)

    monkeypatch.setattr(overlapped.runner, "run", fails_once)
    for _ in range(100):
        if not overlapped.has_unfinished():
            break
        try:
            outputs = overlapped.step()
        except RuntimeError:
            continue
        for out in outputs:
            got[out.request_id] += out.token_ids
    assert failed
    expected = plain.generate(prompts, params)
    assert [got["x0"], got["x1"]] == [e.token_ids for e in expected]


def _drive(core: EngineCore, events: dict[int, list[tuple]], steps: int) -> dict[str, list[RequestOutput]]:
    """Step `core`, adding ("add", id, prompt, params, adapter) or ("abort", id) before the given steps;
    returns every request's increments."""
    got: dict[str, list[RequestOutput]] = {}
    aborted: set[str] = set()
    for step in range(steps):
        for event in events.get(step, []):
            if event[0] == "add":
                core.add_request(*event[1:])
                got[event[1]] = []
            else:
                if core.abort(event[1]):  # False: it had finished
                    aborted.add(event[1])
        for out in core.step():
            assert out.request_id not in aborted, "an increment after the request was aborted"
            got[out.request_id].append(out)
        if step > max(events) and not core.has_unfinished():
            return got
    raise AssertionError(f"unfinished after {steps} steps")


def test_arrivals_and_aborts_between_overlapped_steps(plain: EngineCore, overlapped: EngineCore) -> None:
    """Requests join while others decode (their prefill reads the unread tokens first) and one is aborted
    while its token is unread: the others' increments are those of the same schedule without overlap."""
    prompts = _prompts(plain)
    greedy = SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True)
    sampled = SamplingParams(max_tokens=10, temperature=0.8, seed=7, ignore_eos=True)
    events: dict[int, list[tuple]] = {
        0: [("add", "a", prompts[0], greedy, "chatmed-tcm"), ("add", "b", prompts[1], sampled, None)],
        4: [("add", "c", prompts[2], greedy, "chatmed-consult")],
        6: [("abort", "b")],
        9: [("add", "d", prompts[3], sampled, None)],
    }
    ours, theirs = _drive(overlapped, events, 200), _drive(plain, events, 200)
    for rid in "acd":
        assert [o.token_ids for o in ours[rid]] == [o.token_ids for o in theirs[rid]]
        assert "".join(o.text for o in ours[rid]) == "".join(o.text for o in theirs[rid])
        assert ours[rid][-1].finished and not any(o.finished for o in ours[rid][:-1])
    assert not any(o.finished for o in ours["b"])
    # b streamed no further than without overlap (its unread token is dropped, not sent after the abort)
    assert [o.token_ids for o in ours["b"]] == [o.token_ids for o in theirs["b"]][: len(ours["b"])]


def test_steps_that_truncate_are_not_deferred(demo: DemoModel, plain: EngineCore) -> None:
    """Top-k or top-p reads the step back while sampling it, so deferring would only add the copy: such
    steps end with their tokens read, and once the truncating request ends the others' steps overlap."""
    core = _core(demo, overlap=True)
    prompts = _prompts(plain)[:2]
    truncating = [
        SamplingParams(max_tokens=8, temperature=0.7, top_k=k, top_p=p, seed=3, ignore_eos=True)
        for k, p in ((0, 0.9), (5, 1.0))
    ]
    for params in truncating:
        _same(core.generate(prompts[:1], params, [None]), plain.generate(prompts[:1], params, [None]))
    assert core.num_overlapped == 0
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    params = [truncating[0], greedy]
    _same(core.generate(prompts, params, ADAPTERS[:2]), plain.generate(prompts, params, ADAPTERS[:2]))
    # Only the greedy request's last 4 decode steps (tokens 9-12), alone, may be deferred; the 7 steps
    # it shares with the truncating request are not.
    assert 0 < core.num_overlapped <= 4


def test_a_request_with_logprobs_reads_its_step_at_once(plain: EngineCore, overlapped: EngineCore) -> None:
    prompts = _prompts(plain)[:2]
    params = [
        SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=2),
        SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True),
    ]
    ours, theirs = (
        overlapped.generate(prompts, params, [None, None]),
        plain.generate(prompts, params, [None, None]),
    )
    _same(ours, theirs)
    assert ours[0].logprobs == theirs[0].logprobs and ours[0].logprobs is not None


def test_requests_up_to_the_context_length_and_through_preemption(demo: DemoModel) -> None:
    """A request that ends at the last position of the context, and a KV cache so small that sequences
    are preempted and recomputed while tokens are unread."""
    kwargs: dict[str, object] = {"num_kv_blocks": 6, "max_model_len": 64}
    plain, overlapped = _core(demo, False, **kwargs), _core(demo, True, **kwargs)
    prompts = _prompts(plain)[:3]
    params = [
        SamplingParams(max_tokens=64 - len(prompts[0]), temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=25, temperature=0.5, seed=3, ignore_eos=True),
    ]
    ours = overlapped.generate(prompts, params, ADAPTERS[:3])
    _same(ours, plain.generate(prompts, params, ADAPTERS[:3]))
    assert overlapped.stats().num_preemptions > 0 and overlapped.num_overlapped > 0
    assert overlapped.allocator.num_free == overlapped.allocator.num_blocks
    assert len(ours[0].token_ids) == params[0].max_tokens


def _random_params(rng: random.Random, vocab_size: int, room: int) -> SamplingParams:
    """Greedy or seeded draws, truncation, penalties, min_tokens, stop ids and strings, logprobs."""
    greedy = rng.random() < 0.5
    kwargs: dict[str, Any] = {
        "max_tokens": rng.randint(1, min(30, room)),
        "temperature": 0.0 if greedy else rng.choice([0.3, 0.8, 1.5]),
        "seed": None if greedy else rng.randint(0, 1000),
        "ignore_eos": rng.random() < 0.5,
    }
    optional: dict[str, Any] = {
        "top_p": 0.9 if not greedy else 1.0,
        "top_k": 0 if greedy else rng.choice([3, 20]),
        "repetition_penalty": rng.choice([1.2, 0.8]),
        "frequency_penalty": rng.choice([0.5, -0.5]),
        "presence_penalty": rng.choice([0.7, -1.0]),
        "min_tokens": rng.randint(0, kwargs["max_tokens"]),
        "stop_token_ids": rng.sample(range(vocab_size), 30),
        "stop": [rng.choice(["的", "，", "。", "\n", "热", "痛"]) for _ in range(2)],
        "logprobs": rng.randint(0, 3),
    }
    kwargs.update({key: value for key, value in optional.items() if rng.random() < 0.3})
    return SamplingParams(**kwargs)


@pytest.mark.parametrize("cache", ["roomy", "preempting"])
def test_random_schedules_give_the_same_streams(demo: DemoModel, cache: str) -> None:
    """Seeded random mixes of arrivals, aborts and sampling settings, stepped alike by an engine with
    overlap and one without: the same increments (logprobs aside: a dropped row changes the batch, and
    these steps are not bit-identical across batch shapes)."""
    kwargs: dict[str, object] = {"num_kv_blocks": 6, "max_model_len": 64} if cache == "preempting" else {}
    plain, overlapped = _core(demo, False, **kwargs), _core(demo, True, **kwargs)
    for seed in range(6):
        rng = random.Random(seed)
        events: dict[int, list[tuple]] = {}
        for i in range(rng.randint(2, 6)):
            prompt = plain.tokenizer.encode(rng.choice(QUESTIONS))
            params = _random_params(rng, plain.model_args.vocab_size, plain.max_model_len - len(prompt))
            start = rng.randint(0, 20)
            events.setdefault(start, []).append(("add", f"q{i}", prompt, params, rng.choice(ADAPTERS)))
            if rng.random() < 0.2:
                events.setdefault(start + rng.randint(1, 10), []).append(("abort", f"q{i}"))
        ours, theirs = _drive(overlapped, events, 500), _drive(plain, events, 500)
        for rid, outs in theirs.items():
            mine = ours[rid]
            if any(e[0] == "abort" and e[1] == rid for step in events.values() for e in step):
                assert [o.token_ids for o in mine] == [o.token_ids for o in outs][: len(mine)]
                continue
            assert [(o.token_ids, o.text, o.finish_reason, o.stop_reason) for o in mine] == [
                (o.token_ids, o.text, o.finish_reason, o.stop_reason) for o in outs
            ], (seed, rid)
        assert overlapped.allocator.num_free == overlapped.allocator.num_blocks
    assert overlapped.num_overlapped > 0
    if cache == "preempting":
        assert overlapped.stats().num_preemptions > 0


async def test_async_streams_with_overlapped_steps(demo: DemoModel, plain: EngineCore) -> None:
    engine = AsyncEngine(engine_config(demo, overlap_steps=True))
    engine.core.runner.use_fixed_decode(16, engine.core.max_model_len, capture=False)
    engine.start()
    try:
        prompts = _prompts(plain)[:3]
        greedy = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)

        async def collect(i: int) -> list[RequestOutput]:
            return [out async for out in engine.generate(f"s{i}", prompts[i], greedy, ADAPTERS[i])]

        streams = await asyncio.wait_for(asyncio.gather(*(collect(i) for i in range(3))), 60)
        expected = plain.generate(prompts, greedy, ADAPTERS[:3])
        for outs, want in zip(streams, expected, strict=True):
            assert [t for o in outs for t in o.token_ids] == want.token_ids
            assert "".join(o.text for o in outs) == want.text
        assert engine.core.num_overlapped > 0
    finally:
        engine.shutdown()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_with_overlapped_steps_give_the_same_tokens(demo: DemoModel) -> None:
    graphed = EngineCore(engine_config(demo, device="cuda", overlap_steps=True))
    reference = EngineCore(engine_config(demo, device="cuda", overlap_steps=False))
    prompts = _prompts(graphed)
    _same(graphed.generate(prompts, _params(), ADAPTERS), reference.generate(prompts, _params(), ADAPTERS))
    assert graphed.num_overlapped > 0 and graphed.runner.graphs is not None
    assert graphed.runner.graphs.num_replays > 0
