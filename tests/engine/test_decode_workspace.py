"""Decode workspaces (torch ops): keys kept contiguous from step to step give exactly the logits of
gathering every block afresh, through sequences joining and leaving, groups splitting, workspaces
growing, and a step that fails half-way."""

from __future__ import annotations

import pytest
import torch

from engine.core import EngineCore
from engine.demo import DemoModel
from engine.model.attention import DecodeGroup, DecodeWorkspace
from engine.model_runner import ModelRunner
from engine.scheduler import ScheduledSeq, Sequence
from engine.types import RequestOutput, SamplingParams
from tests.conftest import engine_config

QUESTIONS = (
    "问：头痛发热三天，夜里咳嗽加重，应该怎么办？\n答：",
    "问：失眠\n答：",
    "问：舌苔发白，胃胀，食欲不振，是什么原因？\n答：",
    "问：腰痛\n答：",
    "问：孩子咳嗽一周了\n答：",
    "问：月经不调怎么调理？\n答：",
)
ADAPTERS = ["chatmed-tcm", None, "chatmed-consult", "chatmed-tcm", None, "chatmed-consult"]


def _generate(core: EngineCore) -> list[RequestOutput]:
    """Different lengths and budgets, four sequences at most at once: rows finish and others join."""
    prompts = [core.tokenizer.encode(q) for q in QUESTIONS]
    params = [
        SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=2)
        for n in (30, 7, 45, 12, 3, 25)
    ]
    return core.generate(prompts, params, ADAPTERS)


def _count_plans(monkeypatch: pytest.MonkeyPatch) -> dict[bool, int]:
    counts = {True: 0, False: 0}
    plan = DecodeWorkspace.plan

    def counting(self: DecodeWorkspace, lens: list[int], width: int, refill: bool) -> None:
        counts[refill] += 1
        plan(self, lens, width, refill)

    monkeypatch.setattr(DecodeWorkspace, "plan", counting)
    return counts


@pytest.mark.parametrize("block_size", [4, 16])
def test_workspaces_give_the_logprobs_of_a_fresh_gather(
    demo: DemoModel, monkeypatch: pytest.MonkeyPatch, block_size: int
) -> None:
    gathering = EngineCore(engine_config(demo, block_size=block_size, max_num_seqs=4))
    gathering.runner.workspace_budget = 0  # no room: every decode step gathers the blocks
    reference = _generate(gathering)
    assert not gathering.runner.workspaces

    counts = _count_plans(monkeypatch)
    core = EngineCore(engine_config(demo, block_size=block_size, max_num_seqs=4))
    outputs = _generate(core)
    assert counts[False] > 3 * counts[True] > 0, counts  # mostly appends, a few refills
    for ours, ref in zip(outputs, reference, strict=True):
        assert ours.token_ids == ref.token_ids
        assert ours.logprobs == ref.logprobs  # bit for bit
    assert core.allocator.num_free == core.allocator.num_blocks


def _step(core: EngineCore, seqs: list[Sequence]) -> torch.Tensor:
    """One decode step of every sequence (its last token); returns the logits."""
    items = [ScheduledSeq(seq, seq.num_tokens - 1, 1) for seq in seqs]
    for item in items:
        need = core.allocator.blocks_needed(item.seq.num_tokens, len(item.seq.block_table))
        item.seq.block_table.extend(core.allocator.allocate(need))
    return core.runner.run(items, core.loras)


def _decode(core: EngineCore, fail_at: int | None, monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """Prefill the questions, then eight greedy decode steps; step `fail_at` first fails in its second
    layer, after the first layer wrote into the workspaces, and is run again."""
    seqs = []
    for i, question in enumerate(QUESTIONS):
        ids = core.tokenizer.encode(question)
        seq = Sequence(f"s{i}", ids, len(ids), ADAPTERS[i])
        seq.block_table = core.allocator.allocate(core.allocator.blocks_needed(len(ids), 0))
        logits = core.runner.run([ScheduledSeq(seq, 0, len(ids))], core.loras)
        seq.token_ids.append(int(logits[-1].argmax()))
        seqs.append(seq)
    steps = []
    for step in range(8):
        if step == fail_at:

            def failing(
                self: DecodeWorkspace, layer: int, *args: object, real=DecodeWorkspace.keys_values
            ) -> object:
                if layer == 1:
                    raise RuntimeError("injected fault")
                return real(self, layer, *args)  # type: ignore[arg-type]

            with monkeypatch.context() as m:
                m.setattr(DecodeWorkspace, "keys_values", failing)
                with pytest.raises(RuntimeError, match="injected fault"):
                    _step(core, seqs)
        logits = _step(core, seqs)
        steps.append(logits)
        for seq, row in zip(seqs, logits, strict=True):
            seq.token_ids.append(int(row.argmax()))
    for seq in seqs:
        core.allocator.free(seq.block_table)
    return steps


def test_a_step_that_fails_half_way_refills_the_workspace(
    demo: DemoModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = _decode(EngineCore(engine_config(demo, block_size=4)), None, monkeypatch)
    counts = _count_plans(monkeypatch)
    # The first decode step refills: failing in its second layer leaves the later layers unfilled.
    ours = _decode(EngineCore(engine_config(demo, block_size=4)), 0, monkeypatch)
    # Refills: the first decode step, the failed step's retry, and growth (4 blocks of 4 at most).
    assert counts[True] >= 2 and counts[False] > 0, counts
    for got, want in zip(ours, reference, strict=True):
        assert torch.equal(got, want)


def test_workspaces_stay_within_their_budget(demo: DemoModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """Groups whose workspace would not fit gather afresh; the rest keep theirs; the tokens do not change."""
    usage: list[tuple[int, int]] = []  # per step: (bytes held by the groups' workspaces, groups without)
    decode_groups = ModelRunner._decode_groups

    def recording(self: ModelRunner, lengths: list[int], seqs: list[Sequence]) -> list[DecodeGroup]:
        groups = decode_groups(self, lengths, seqs)
        held = [g.workspace for g in groups if g.workspace is not None]
        usage.append((sum(w.keys.nbytes + w.values.nbytes for w in held), len(groups) - len(held)))
        return groups

    monkeypatch.setattr(ModelRunner, "_decode_groups", recording)
    core = EngineCore(engine_config(demo, block_size=4, max_num_seqs=4))
    reference = _generate(core)
    peak = max(used for used, _ in usage)
    assert all(without == 0 for _, without in usage)  # the default budget holds them all

    usage.clear()
    core = EngineCore(engine_config(demo, block_size=4, max_num_seqs=4))
    core.runner.workspace_budget = peak // 2
    outputs = _generate(core)
    assert all(used <= peak // 2 for used, _ in usage)
    assert any(without for _, without in usage) and any(used for used, _ in usage)
    assert [o.token_ids for o in outputs] == [o.token_ids for o in reference]


def test_groups_and_workspaces_carry_on_while_the_sequences_stay(
    demo: DemoModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows cross block boundaries every fourth step, which would move the best short/long split; the
    groups stay as they are while the same sequences decode, so only the first decode step refills."""
    counts = _count_plans(monkeypatch)
    core = EngineCore(engine_config(demo, block_size=4))
    _decode(core, None, monkeypatch)  # eight decode steps of six sequences, 16 positions of room
    assert counts[False] > 0
    assert counts[True] == len(core.runner.workspaces), counts
