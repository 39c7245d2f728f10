"""EngineCore end to end on the tiny demo: batching invariants, preemption, adapters, sampling, stops."""

from __future__ import annotations

import pytest
import torch

from engine import core as core_module
from engine.core import EngineCore, resolve_dtype
from engine.demo import DemoModel
from engine.errors import InvalidRequest, PromptTooLong, UnknownAdapter
from engine.tokenizer import CHATMED_TEMPLATE
from engine.types import FinishReason, SamplingParams
from tests.conftest import engine_config, transformers_greedy

QUESTIONS = [
    "头痛发热三天，应该吃什么药？",
    "孩子咳嗽一周了怎么办？",
    "黄芪的功效是什么？",
    "高血压患者能喝咖啡吗？",
    "失眠多梦，舌红少苔，中医怎么调理？",
    "What should I do about a sore throat?",
]
ADAPTERS: list[str | None] = [None, "chatmed-consult", "chatmed-tcm"]
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def core(demo: DemoModel) -> EngineCore:
    return EngineCore(engine_config(demo))


def _prompts(core: EngineCore) -> list[list[int]]:
    return [core.tokenizer.encode_chat([{"role": "user", "content": q}], CHATMED_TEMPLATE) for q in QUESTIONS]


def _adapters(n: int) -> list[str | None]:
    return [ADAPTERS[i % 3] for i in range(n)]


def test_batched_greedy_equals_one_at_a_time(core: EngineCore) -> None:
    prompts = _prompts(core)
    adapters = _adapters(len(prompts))
    batched = core.generate(prompts, GREEDY, adapters)
    for prompt, adapter, out in zip(prompts, adapters, batched, strict=True):
        alone = core.generate([prompt], GREEDY, [adapter])[0]
        assert out.token_ids == alone.token_ids
        assert out.text == alone.text
        assert out.finish_reason is FinishReason.LENGTH and len(out.token_ids) == GREEDY.max_tokens
    assert core.allocator.num_free == core.allocator.num_blocks


@pytest.mark.parametrize("adapter", ["chatmed-tcm", None])
def test_greedy_tokens_equal_transformers_generate(
    core: EngineCore, demo: DemoModel, adapter: str | None
) -> None:
    prompt = _prompts(core)[0]
    ours = core.generate([prompt], GREEDY, [adapter])[0]
    assert ours.token_ids == transformers_greedy(demo, prompt, adapter, GREEDY.max_tokens)


def test_preempted_requests_give_the_same_tokens(demo: DemoModel, core: EngineCore) -> None:
    prompts = _prompts(core) * 2
    adapters = _adapters(len(prompts))
    reference = core.generate(prompts, GREEDY, adapters)
    # 12 blocks of 4 tokens cannot hold 12 sequences of ~40 tokens: the scheduler must preempt.
    small = EngineCore(engine_config(demo, num_kv_blocks=24, block_size=4))
    outs = small.generate(prompts, GREEDY, adapters)
    assert small.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == [r.token_ids for r in reference]
    assert small.allocator.num_free == small.allocator.num_blocks


def test_abort_frees_blocks_wherever_the_request_is(core: EngineCore) -> None:
    prompts = _prompts(core)
    for i, p in enumerate(prompts):
        core.add_request(f"abort-{i}", p, GREEDY, _adapters(len(prompts))[i])
    core.step()
    core.step()
    assert core.allocator.num_free < core.allocator.num_blocks
    for i in range(len(prompts)):
        assert core.abort(f"abort-{i}")
    assert not core.has_unfinished()
    assert core.allocator.num_free == core.allocator.num_blocks
    assert not core.abort("abort-0")


def test_seeded_sampling_is_independent_of_the_batch(core: EngineCore) -> None:
    prompts = _prompts(core)
    seeded = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)
    alone = core.generate([prompts[0]], seeded, ["chatmed-consult"])[0]
    others = [SamplingParams(max_tokens=16, temperature=1.0, ignore_eos=True)] * (len(prompts) - 1)
    mixed = core.generate([*prompts[1:], prompts[0]], [*others, seeded], [*_adapters(5), "chatmed-consult"])
    assert mixed[-1].token_ids == alone.token_ids
    again = core.generate([prompts[0]], seeded, ["chatmed-consult"])[0]
    assert again.token_ids == alone.token_ids


def test_text_increments_join_to_the_full_decode(core: EngineCore) -> None:
    params = SamplingParams(max_tokens=40, temperature=1.0, seed=7, ignore_eos=True)
    prompt = _prompts(core)[2]
    core.add_request("stream", prompt, params, "chatmed-tcm")
    deltas, ids = [], []
    while core.has_unfinished():
        for out in core.step():
            deltas.append(out.text)
            ids += out.token_ids
    assert "".join(deltas) == core.tokenizer.decode(ids)


def test_stop_string_ends_the_request_and_is_not_returned(core: EngineCore) -> None:
    prompt = _prompts(core)[1]
    free = core.generate([prompt], GREEDY, ["chatmed-consult"])[0]
    text = free.text
    assert len(text) > 4
    stop = text[3:5]
    out = core.generate(
        [prompt],
        SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, stop=(stop,)),
        ["chatmed-consult"],
    )[0]
    assert out.finish_reason is FinishReason.STOP and out.stop_reason == stop
    assert out.text == text[: text.index(stop)]


def test_stop_token_id_finishes_with_stop(core: EngineCore) -> None:
    prompt = _prompts(core)[0]
    first = core.generate([prompt], GREEDY, [None])[0].token_ids[0]
    params = SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=(first,))
    out = core.generate([prompt], params, [None])[0]
    assert out.finish_reason is FinishReason.STOP and out.stop_reason == first and out.text == ""


def test_logprobs_are_returned_per_token(core: EngineCore) -> None:
    prompt = _prompts(core)[0]
    out = core.generate([prompt], SamplingParams(max_tokens=5, temperature=0.0, logprobs=3, ignore_eos=True))[
        0
    ]
    assert out.logprobs is not None and len(out.logprobs) == 5
    for lp, tok in zip(out.logprobs, out.token_ids, strict=True):
        assert lp.token_id == tok and lp.logprob <= 0 and len(lp.top) == 3
        assert lp.top[0][0] == tok  # greedy picks the most likely token


def test_bad_requests_are_refused_before_queueing(core: EngineCore) -> None:
    prompt = _prompts(core)[0]
    with pytest.raises(InvalidRequest):
        core.add_request("e1", [], GREEDY)
    with pytest.raises(InvalidRequest):
        core.add_request("e2", [10**9], GREEDY)
    with pytest.raises(UnknownAdapter):
        core.add_request("e3", prompt, GREEDY, "no-such-adapter")
    with pytest.raises(PromptTooLong) as info:
        core.add_request("e4", prompt, SamplingParams(max_tokens=core.max_model_len))
    assert info.value.param == "max_tokens"
    assert not core.has_unfinished()


def test_one_device_slot_still_serves_every_adapter_correctly(demo: DemoModel, core: EngineCore) -> None:
    prompts = _prompts(core)
    adapters = _adapters(len(prompts))
    reference = core.generate(prompts, GREEDY, adapters)
    narrow = EngineCore(engine_config(demo, max_loras=1, max_cpu_loras=1))
    outs = narrow.generate(prompts, GREEDY, adapters)
    assert [o.token_ids for o in outs] == [r.token_ids for r in reference]
    assert len(narrow.loras.resident) == 1
    assert set(narrow.loras.paths) == {"chatmed-consult", "chatmed-tcm"}


def test_steps_of_many_tokens_run_on_the_prefill_threads(
    demo: DemoModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prompts (a step of PREFILL_STEP_TOKENS prompt tokens or more) on prefill_threads, decode steps on
    num_threads, switched on the calling thread; the tokens do not depend on it."""
    import torch

    from engine.config import PREFILL_STEP_TOKENS

    before = torch.get_num_threads()
    try:
        core = EngineCore(engine_config(demo, num_threads=1, prefill_threads=2))
        seen: list[tuple[int, int]] = []
        run = core.runner.run

        def counted(items, *args):  # type: ignore[no-untyped-def]
            seen.append(
                (sum(i.num_new_tokens for i in items if i.num_new_tokens > 1), torch.get_num_threads())
            )
            return run(items, *args)

        monkeypatch.setattr(core.runner, "run", counted)
        prompts = [p * 12 for p in _prompts(core)[:2]]  # long enough for one step of many tokens
        params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        ours = core.generate(prompts, params)
        assert any(n >= PREFILL_STEP_TOKENS for n, _ in seen) and any(
            n < PREFILL_STEP_TOKENS for n, _ in seen
        )
        assert all(threads == (2 if n >= PREFILL_STEP_TOKENS else 1) for n, threads in seen), seen
        plain = EngineCore(engine_config(demo, num_threads=1))
        assert [o.token_ids for o in ours] == [o.token_ids for o in plain.generate(prompts, params)]
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="prefill_threads"):
        engine_config(demo, prefill_threads=2)
    with pytest.raises(ValueError, match="num_threads"):
        engine_config(demo, num_threads=0, prefill_threads=2)


def test_auto_dtype_is_the_devices_fast_one(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    for name in ("float32", "float16", "bfloat16"):
        assert resolve_dtype(name, cpu) == getattr(torch, name)
    monkeypatch.setattr(core_module, "cpu_has_bfloat16_matmuls", lambda: True)
    assert resolve_dtype("auto", cpu) == torch.bfloat16
    monkeypatch.setattr(core_module, "cpu_has_bfloat16_matmuls", lambda: False)
    assert resolve_dtype("auto", cpu) == torch.float32  # emulated bfloat16 would be slower
    asked: list[torch.device] = []
    for capability, expected in [((9, 0), torch.bfloat16), ((8, 0), torch.bfloat16), ((7, 5), torch.float16)]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d, c=capability: asked.append(d) or c)
        assert resolve_dtype("auto", torch.device("cuda:1")) == expected
    assert asked == [torch.device("cuda:1")] * 3  # the configured device, not the current one


def test_an_auto_engine_serves_in_the_resolved_dtype(demo: DemoModel) -> None:
    auto = EngineCore(engine_config(demo, dtype="auto"))
    assert auto.dtype == resolve_dtype("auto", torch.device("cpu"))
    assert auto.runner.kv.keys[0].dtype == auto.dtype
    prompts = _prompts(auto)
    outputs = auto.generate(prompts, GREEDY, _adapters(len(prompts)))
    assert all(len(out.token_ids) == GREEDY.max_tokens for out in outputs)
    assert auto.allocator.num_free == auto.allocator.num_blocks
