"""Fixed-shape decode steps (what CUDA graphs replay) give the ordinary path's tokens. On the CPU they run
eagerly through the same buffers; on a GPU (marked `gpu`) they are captured and replayed."""

from __future__ import annotations

import pytest
import torch

from engine.core import EngineCore
from engine.demo import DemoModel
from engine.model.decode_graphs import DecodeGraphs, batch_buckets
from engine.model.llama import StackedAdapters, StackedLora
from engine.types import RequestOutput, SamplingParams
from tests.conftest import engine_config, transformers_greedy

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
QUESTIONS = (
    "问：头痛发热三天怎么办？\n答：",
    "问：失眠多梦。\n答：",
    "问：咳嗽\n答：",
    "问：胃胀\n答：",
    "问：腰痛\n答：",
)
ADAPTERS = ["chatmed-tcm", None, "chatmed-consult", "chatmed-tcm", None]


def _prompts(core: EngineCore) -> list[list[int]]:
    return [core.tokenizer.encode(q) for q in QUESTIONS]


def _tokens(outputs: list[RequestOutput]) -> list[list[int]]:
    return [o.token_ids for o in outputs]


def test_buckets_grow_by_doubling_then_by_16_and_cover_the_largest_batch() -> None:
    assert batch_buckets(1) == [1]
    assert batch_buckets(5) == [1, 2, 4, 8]
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert batch_buckets(70)[-1] == 80


@pytest.fixture(scope="module")
def eager(demo: DemoModel) -> EngineCore:
    return EngineCore(engine_config(demo))


@pytest.mark.parametrize("count", [1, 3, 5])
def test_fixed_decode_gives_the_ordinary_tokens(demo: DemoModel, eager: EngineCore, count: int) -> None:
    """Batches padded to a bucket (3 -> 4, 5 -> 8), adapters mixed with the base, and one adapter alone."""
    fixed = EngineCore(engine_config(demo))
    fixed.runner.use_fixed_decode(16, fixed.max_model_len, capture=False)
    prompts, adapters = _prompts(fixed)[:count], ADAPTERS[:count]
    assert _tokens(fixed.generate(prompts, GREEDY, adapters)) == _tokens(
        eager.generate(prompts, GREEDY, adapters)
    )
    graphs = fixed.runner.graphs
    assert graphs is not None and graphs.entries, "no decode step went through the fixed buffers"
    assert fixed.allocator.num_free == fixed.allocator.num_blocks


def test_fixed_decode_with_one_device_slot_follows_evictions(demo: DemoModel, eager: EngineCore) -> None:
    """--max-loras 1: the adapters take turns on the device; entries reading an evicted one are dropped."""
    fixed = EngineCore(engine_config(demo, max_loras=1))
    fixed.runner.use_fixed_decode(16, fixed.max_model_len, capture=False)
    prompts = _prompts(fixed)
    assert _tokens(fixed.generate(prompts, GREEDY, ADAPTERS)) == _tokens(
        eager.generate(prompts, GREEDY, ADAPTERS)
    )
    graphs = fixed.runner.graphs
    assert graphs is not None
    resident = {id(a) for a in fixed.loras.resident.values()}
    assert all(id(a) in resident for entry in graphs.entries.values() for a in entry.adapters)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_graph_replays_give_the_eager_tokens(demo: DemoModel, dtype: str) -> None:
    graphed = EngineCore(engine_config(demo, device="cuda", dtype=dtype))
    eager = EngineCore(engine_config(demo, device="cuda", dtype=dtype, enforce_eager=True))
    assert graphed.runner.graphs is not None and eager.runner.graphs is None
    prompts = _prompts(graphed)
    for count in (1, 3, 5):
        ours = graphed.generate(prompts[:count], GREEDY, ADAPTERS[:count])
        assert _tokens(ours) == _tokens(eager.generate(prompts[:count], GREEDY, ADAPTERS[:count]))
    assert graphed.runner.graphs.num_captured > 0 and graphed.runner.graphs.num_replays > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("adapter", ["chatmed-tcm", None])
def test_cuda_greedy_tokens_equal_transformers_generate(demo: DemoModel, adapter: str | None) -> None:
    """Triton ops, prefill and replayed decode graphs in float32 against transformers (+ peft) on the CPU."""
    core = EngineCore(engine_config(demo, device="cuda"))
    prompt = _prompts(core)[0]
    ours = core.generate([prompt], GREEDY, [adapter])[0]
    assert ours.token_ids == transformers_greedy(demo, prompt, adapter, GREEDY.max_tokens)
    assert core.runner.model.ops.name == "triton"


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_stacked_lora_gives_each_row_its_own_adapter_whatever_the_targets(kernels: str) -> None:
    """Two adapters with different ranks and targets side by side, rows of each and of the base mixed:
    every row gets exactly its own adapter's delta (or none), by torch matmuls and a mask or by the
    Triton shrink and masked expand (on the GPU when there is one, else under Triton's interpreter)."""
    g = torch.Generator().manual_seed(5)
    triton_ops = pytest.importorskip("engine.model.triton_ops") if kernels == "triton" else None
    device = torch.device("cuda" if triton_ops is not None and torch.cuda.is_available() else "cpu")

    def pair(rank: int, d_in: int, d_out: int) -> tuple[torch.Tensor, torch.Tensor]:
        a, b_t = torch.randn(rank, d_in, generator=g), torch.randn(rank, d_out, generator=g)
        return a.to(device), b_t.to(device)

    first = [{"qkv": pair(3, 8, 12), "down": pair(2, 8, 8)}, {"o": pair(3, 8, 8)}]
    second = [{"qkv": pair(5, 8, 12)}, {"o": pair(4, 8, 8), "down": pair(4, 8, 8)}]
    row_adapter = torch.tensor([1, -1, 0, 0, 1, -1], device=device)
    x = torch.randn(6, 8, generator=g).to(device)
    stacked = StackedAdapters.stack([first, second], device)
    lora = StackedLora(stacked, row_adapter, torch.float32, triton_ops)
    for layer in range(2):
        for fused, width in (("qkv", 12), ("o", 8), ("down", 8)):
            y = torch.zeros(6, width, device=device)
            lora.add_delta(y, x, layer, fused)
            for row, which in enumerate(row_adapter.tolist()):
                weights = {0: first, 1: second}.get(which)
                pair_ = weights[layer].get(fused) if weights is not None else None
                expected = torch.zeros(width) if pair_ is None else (x[row] @ pair_[0].t()) @ pair_[1]
                torch.testing.assert_close(y[row], expected, atol=1e-5, rtol=1e-5)


def test_old_entries_and_their_stacked_weights_are_let_go(demo: DemoModel, eager: EngineCore) -> None:
    """Beyond max_graphs the least recently used entry goes, and with it any stack no entry reads."""
    fixed = EngineCore(engine_config(demo))
    runner = fixed.runner
    runner.graphs = DecodeGraphs(
        runner.model, runner.kv, 16, 16, fixed.max_model_len, capture=False, max_graphs=2
    )
    prompts = _prompts(fixed)
    for count in (1, 2, 3, 4, 5):  # batch sizes and adapter sets change from run to run
        ours = fixed.generate(prompts[:count], GREEDY, ADAPTERS[:count])
        assert _tokens(ours) == _tokens(eager.generate(prompts[:count], GREEDY, ADAPTERS[:count]))
        assert len(runner.graphs.entries) <= 2
        live = {tuple(id(a) for a in e.adapters) for e in runner.graphs.entries.values()}
        assert set(runner.graphs.stacks) <= live


def test_fixed_decode_with_the_triton_lora_gives_the_ordinary_tokens(
    demo: DemoModel, eager: EngineCore
) -> None:
    """The Triton ops with their stacked-LoRA kernels on, decode steps through the fixed buffers (replayed
    as CUDA graphs on a GPU), against the ordinary path on the torch ops: mixed adapters and the base."""
    pytest.importorskip("triton")
    from engine.model.ops import TritonOps

    device = "cuda" if torch.cuda.is_available() else "cpu"
    fixed = EngineCore(engine_config(demo, device=device, enforce_eager=True))
    ops = TritonOps()
    ops.triton_lora = True
    fixed.runner.model.ops = ops
    fixed.runner.use_fixed_decode(16, fixed.max_model_len, capture=device == "cuda")
    prompts = _prompts(fixed)
    assert _tokens(fixed.generate(prompts, GREEDY, ADAPTERS)) == _tokens(
        eager.generate(prompts, GREEDY, ADAPTERS)
    )
    graphs = fixed.runner.graphs
    assert graphs is not None and graphs.entries
