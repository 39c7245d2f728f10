"""Our LLaMA + paged attention + batched LoRA against transformers (+ peft) on the same weights."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from engine.core import EngineCore
from engine.demo import DemoModel
from engine.scheduler import ScheduledSeq, Sequence
from tests.conftest import engine_config

ATOL = 2e-4


@pytest.fixture(scope="module")
def core(demo: DemoModel) -> EngineCore:
    return EngineCore(engine_config(demo))


def _reference_logits(
    demo: DemoModel, ids: list[int], adapter: str | None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(demo.base_path, dtype=dtype)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, demo.adapters[adapter], torch_dtype=dtype)
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()  # [n, vocab]


def _our_logits(core: EngineCore, seqs: list[tuple[Sequence, int, int]]) -> torch.Tensor:
    """Run one step over (seq, start, num_new) items and return logits for every token of the step."""
    items = [ScheduledSeq(seq, start, n) for seq, start, n in seqs]
    for item in items:
        need = core.allocator.blocks_needed(item.start + item.num_new_tokens, len(item.seq.block_table))
        item.seq.block_table.extend(core.allocator.allocate(need))
    runner = core.runner
    inputs = runner.prepare(items)
    with torch.inference_mode():
        hidden = runner.model(
            inputs.input_ids, inputs.positions, runner.kv, inputs.attention, core.loras.segments(inputs.spans)
        )
        return runner.model.compute_logits(hidden)


def _prompt(core: EngineCore, text: str) -> list[int]:
    return core.tokenizer.encode(text)


@pytest.mark.parametrize("adapter", [None, "chatmed-consult", "chatmed-tcm"])
def test_prefill_logits_match_transformers(core: EngineCore, demo: DemoModel, adapter: str | None) -> None:
    ids = _prompt(core, "问：\n头痛发热三天，应该吃什么药？\n答：\n")
    seq = Sequence("r", ids, len(ids), adapter)
    ours = _our_logits(core, [(seq, 0, len(ids))])
    ref = _reference_logits(demo, ids, adapter)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=1e-4)
    core.allocator.free(seq.block_table)


def test_chunked_prefill_and_decode_match_transformers(core: EngineCore, demo: DemoModel) -> None:
    ids = _prompt(core, "问：\n失眠多梦，舌红少苔，中医怎么调理？\n答：\n")
    seq = Sequence("r", ids, len(ids), "chatmed-tcm")
    n = len(ids)
    first, second = n // 3, n // 3 + 1
    parts = [_our_logits(core, [(seq, 0, first)]), _our_logits(core, [(seq, first, second)])]
    for pos in range(first + second, n):  # the rest one token at a time, as decode steps
        parts.append(_our_logits(core, [(seq, pos, 1)]))
    ref = _reference_logits(demo, ids, "chatmed-tcm")
    torch.testing.assert_close(torch.cat(parts), ref, atol=ATOL, rtol=1e-4)
    core.allocator.free(seq.block_table)


def test_mixed_adapter_step_gives_each_row_its_own_adapter(core: EngineCore, demo: DemoModel) -> None:
    prompts = {
        None: _prompt(core, "问：\n高血压患者能喝咖啡吗？\n答：\n"),
        "chatmed-consult": _prompt(core, "问：\n孩子咳嗽一周了怎么办？\n答：\n"),
        "chatmed-tcm": _prompt(core, "问：\n黄芪的功效是什么？\n答：\n"),
    }
    # Prefill all three in one step, adapters adjacent as the engine orders them.
    seqs = {a: Sequence(str(a), ids, len(ids), a) for a, ids in prompts.items()}
    ours = _our_logits(core, [(seqs[a], 0, len(prompts[a])) for a in prompts])
    offset = 0
    for adapter, ids in prompts.items():
        ref = _reference_logits(demo, ids, adapter)
        torch.testing.assert_close(ours[offset : offset + len(ids)], ref, atol=ATOL, rtol=1e-4)
        offset += len(ids)
    # Then one decode step mixing all three (each feeds its argmax token).
    decode_items = []
    for adapter, seq in seqs.items():
        ref = _reference_logits(demo, seq.token_ids, adapter)
        seq.token_ids.append(int(ref[-1].argmax()))
        decode_items.append((seq, seq.num_tokens - 1, 1))
    ours = _our_logits(core, decode_items)
    for row, (adapter, seq) in enumerate(seqs.items()):
        ref = _reference_logits(demo, seq.token_ids, adapter)
        torch.testing.assert_close(ours[row], ref[-1], atol=ATOL, rtol=1e-4)
        core.allocator.free(seq.block_table)


def test_adapters_change_the_output(core: EngineCore) -> None:
    ids = _prompt(core, "问：\n胃痛怎么办？\n答：\n")
    rows = [
        _our_logits(core, [(Sequence(str(a), ids, len(ids), a), 0, len(ids))])[-1]
        for a in (None, "chatmed-consult", "chatmed-tcm")
    ]
    assert (rows[0] - rows[1]).abs().max() > 1e-3
    assert (rows[1] - rows[2]).abs().max() > 1e-3


def test_decode_rows_of_very_different_lengths_match_transformers(core: EngineCore, demo: DemoModel) -> None:
    """Short and long contexts in one decode step: the torch ops attend them in two groups (less padding
    to gather), and every row still gets transformers' logits."""
    texts = [
        "问：\n咳嗽\n答：\n",
        "问：\n头痛\n答：\n",
        "问：\n发热\n答：\n",
        "问：\n" + "反复腹痛腹泻，" * 12 + "\n答：\n",
    ]
    seqs = []
    for i, text in enumerate(texts):
        ids = _prompt(core, text)
        seq = Sequence(f"g{i}", ids[:-1], len(ids) - 1, "chatmed-tcm" if i % 2 else None)
        _our_logits(core, [(seq, 0, len(ids) - 1)])
        seq.token_ids.append(ids[-1])
        seqs.append(seq)
    ours = _our_logits(core, [(seq, seq.num_tokens - 1, 1) for seq in seqs])
    items = [ScheduledSeq(seq, seq.num_tokens - 1, 1) for seq in seqs]
    groups = core.runner.prepare(items).attention.decode_groups
    assert groups is not None and len(groups) == 2
    for row, seq in enumerate(seqs):
        ref = _reference_logits(demo, seq.token_ids, seq.adapter)
        torch.testing.assert_close(ours[row], ref[-1], atol=ATOL, rtol=1e-4)
        core.allocator.free(seq.block_table)


def test_bfloat16_on_the_cpu_errs_no_more_than_transformers(demo: DemoModel) -> None:
    """A bfloat16 engine on the CPU (packed bfloat16 matmuls, the LoRA kernel in bfloat16, paged attention
    in bfloat16) against transformers + peft in float32 on the same weights: over a prefill of three
    prompts (base and both adapters) and a decode step of all three, its logits err by no more than
    twice transformers' own bfloat16 run does, and far less than the adapters change them."""
    core = EngineCore(engine_config(demo, dtype="bfloat16"))
    prompts = {
        None: _prompt(core, "问：\n高血压患者能喝咖啡吗？\n答：\n"),
        "chatmed-consult": _prompt(core, "问：\n孩子咳嗽一周了怎么办？\n答：\n"),
        "chatmed-tcm": _prompt(core, "问：\n黄芪的功效是什么？\n答：\n"),
    }
    lengths = {a: len(ids) for a, ids in prompts.items()}
    seqs = {a: Sequence(str(a), list(ids), len(ids), a) for a, ids in prompts.items()}
    prefill = _our_logits(core, [(seqs[a], 0, n) for a, n in lengths.items()]).float()
    offset = 0
    for adapter, seq in seqs.items():  # each feeds its argmax token to the decode step
        offset += lengths[adapter]
        seq.token_ids.append(int(prefill[offset - 1].argmax()))
    decode = _our_logits(core, [(seq, seq.num_tokens - 1, 1) for seq in seqs.values()]).float()
    offset = 0
    for row, (adapter, seq) in enumerate(seqs.items()):
        n = lengths[adapter]
        ours = torch.cat([prefill[offset : offset + n], decode[row : row + 1]])
        offset += n
        reference = _reference_logits(demo, seq.token_ids, adapter)
        theirs = _reference_logits(demo, seq.token_ids, adapter, torch.bfloat16)
        our_error = (ours - reference).abs().max()
        their_error = (theirs - reference).abs().max()
        assert our_error <= max(2 * their_error, 0.05), (adapter, our_error, their_error)
        if adapter is not None:
            effect = (reference - _reference_logits(demo, seq.token_ids, None)).abs().max()
            assert our_error < 0.2 * effect, (adapter, our_error, effect)
        core.allocator.free(seq.block_table)
