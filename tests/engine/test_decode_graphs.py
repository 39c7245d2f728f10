"""Fixed-shape decode steps (what CUDA graphs replay) give the ordinary path's tokens. On the CPU they run
eagerly through the same buffers; on a GPU (marked `gpu`) they are captured and replayed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.core import EngineCore
from engine.demo import DemoModel
from engine.lora import LoraAdapter
from engine.model.decode_graphs import DecodeGraphs, batch_buckets
from engine.model.llama import FUSED, Llama, LlamaArgs, StackedAdapters, StackedLora
from engine.model.lora_rows import LoraRows, RowsLora
from engine.model.ops import TritonOps
from engine.types import RequestOutput, SamplingParams
from tests.conftest import engine_config, transformers_greedy

LoraPair = tuple[torch.Tensor, torch.Tensor]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
QUESTIONS = (
    "问：头痛发热三天怎么办？\n答：",
    "问：失眠多梦。\n答：",
    "问：咳嗽\n答：",
    "问：胃胀\n答：",
    "问：腰痛\n答：",
)
ADAPTERS = ["chatmed-tcm", None, "chatmed-consult", "chatmed-tcm", None]
# Where an engine on the Triton ops runs: natively on a GPU, else on the CPU under Triton's interpreter
# (tests/conftest.py turns it on where there is no CUDA; Triton refuses CPU tensors otherwise).
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


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


@pytest.mark.parametrize("ops", ["torch", "triton"])
def test_fixed_decode_with_one_device_slot_follows_evictions(
    demo: DemoModel, eager: EngineCore, ops: str
) -> None:
    """--max-loras 1: the adapters take turns on the device; entries reading an evicted one are dropped.
    With the Triton ops each adapter in turn takes the LoRA rows' one slot."""
    if ops == "triton":
        pytest.importorskip("triton")
    device = TRITON_DEVICE if ops == "triton" else "cpu"
    fixed = EngineCore(engine_config(demo, device=device, max_loras=1, enforce_eager=True))
    if ops == "triton":
        fixed.runner.model.ops = TritonOps()
    fixed.runner.use_fixed_decode(16, fixed.max_model_len, capture=False, lora_units=fixed.lora_units)
    assert (fixed.runner.graphs is not None and fixed.runner.graphs.rows is not None) == (ops == "triton")
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
    """Replayed graphs against eager steps. In float32 the eager steps take the ordinary path. In bfloat16
    they are the same fixed-shape steps without capture: there the LoRA rows compute a step's base and
    shrink columns in one matmul, which rounds a last bit differently from the ordinary path's separate
    matmuls, and this random model's greedy tokens can part on that (on an H200, one row of three after
    two tokens); float32 shows that the two paths compute the same thing."""
    graphed = EngineCore(engine_config(demo, device="cuda", dtype=dtype))
    eager = EngineCore(engine_config(demo, device="cuda", dtype=dtype, enforce_eager=True))
    assert graphed.runner.graphs is not None and eager.runner.graphs is None
    if dtype == "bfloat16":
        eager.runner.use_fixed_decode(16, eager.max_model_len, capture=False, lora_units=eager.lora_units)
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


def _adapter_pair(g: torch.Generator, device: torch.device, rank: int, d_in: int, d_out: int) -> LoraPair:
    a, b_t = torch.randn(rank, d_in, generator=g), torch.randn(rank, d_out, generator=g)
    return a.to(device), b_t.to(device)


def _own_delta(weights: list | None, x: torch.Tensor, layer: int, fused: str, width: int) -> torch.Tensor:
    pair = weights[layer].get(fused) if weights is not None else None
    return torch.zeros(width, device=x.device) if pair is None else (x @ pair[0].t()) @ pair[1]


def test_stacked_lora_gives_each_row_its_own_adapter_whatever_the_targets() -> None:
    """Two adapters with different ranks and targets side by side, rows of each and of the base mixed:
    every row gets exactly its own adapter's delta (or none), by torch matmuls and a mask."""
    g = torch.Generator().manual_seed(5)
    device = torch.device("cpu")
    first = [{"qkv": _adapter_pair(g, device, 3, 8, 12), "down": _adapter_pair(g, device, 2, 8, 8)}, {}]
    second = [{"qkv": _adapter_pair(g, device, 5, 8, 12)}, {"down": _adapter_pair(g, device, 4, 8, 8)}]
    row_adapter = torch.tensor([1, -1, 0, 0, 1, -1])
    x = torch.randn(6, 8, generator=g)
    lora = StackedLora(StackedAdapters.stack([first, second], device), row_adapter, torch.float32)
    for layer in range(2):
        for fused, width in (("qkv", 12), ("down", 8)):
            y = torch.zeros(6, width)
            lora.add_delta(y, x, layer, fused)
            for row, which in enumerate(row_adapter.tolist()):
                expected = _own_delta({0: first, 1: second}.get(which), x[row], layer, fused, width)
                torch.testing.assert_close(y[row], expected, atol=1e-5, rtol=1e-5)


def _tiny_llama(device: torch.device) -> Llama:
    args = LlamaArgs(32, 8, 12, 2, 2, 1, 4, 10000.0, 1e-6, False, 32)  # q/k/v 8+4+4 rows, gate/up 24
    model = Llama(args, 32)
    g = torch.Generator().manual_seed(7)
    for p in model.parameters():
        p.data = torch.randn(p.shape, generator=g)
    return model.to(device)


def _lora_adapter(name: str, rank: int, weights: list) -> LoraAdapter:
    return LoraAdapter(name, Path(name), rank, (), weights, [])


@pytest.mark.parametrize("masked", [True, False])
def test_lora_rows_give_each_row_its_own_adapter_whatever_the_targets(masked: bool) -> None:
    """The adapters' A's as rows under the weights (the Triton ops' fixed-shape LoRA, on the GPU when
    there is one, else under Triton's interpreter): each row of x W^T gets exactly its own adapter's
    delta, with rows of two adapters and the base mixed (masked) and with one adapter alone."""
    triton_ops = pytest.importorskip("engine.model.triton_ops")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(5)
    model = _tiny_llama(device)
    weights = {f: getattr(model.layers[1], f).clone() for f in FUSED}
    first = _lora_adapter(
        "first", 3, [{"qkv": _adapter_pair(g, device, 6, 8, 16)}, {"o": _adapter_pair(g, device, 3, 8, 8)}]
    )
    second = _lora_adapter(
        "second",
        5,
        [
            {"qkv": _adapter_pair(g, device, 15, 8, 16)},
            {"gate_up": _adapter_pair(g, device, 10, 8, 24), "down": _adapter_pair(g, device, 5, 12, 8)},
        ],
    )
    rows = LoraRows(model, units=8)
    assert not rows.place([first, second])
    for fused in FUSED:  # the weights the model multiplies by are unchanged
        assert torch.equal(getattr(model.layers[1], fused), weights[fused])
    adapters = [second, first] if masked else [first]
    row_adapter = torch.tensor([1, -1, 0, 0, 1, -1], device=device) if masked else None
    lora = RowsLora(rows, rows.stack(adapters, device), row_adapter, triton_ops)
    ops = TritonOps()
    for layer in range(2):
        for fused in FUSED:
            weight = getattr(model.layers[layer], fused)
            x = torch.randn(6, weight.shape[1], generator=g).to(device)
            y = lora.linear(x, weight, layer, fused, ops)
            assert y.is_contiguous() and y.shape == (6, weight.shape[0])
            for row in range(6):
                which = row_adapter[row].item() if row_adapter is not None else 0
                own = adapters[which].weights if which >= 0 else None
                expected = x[row] @ weight.t() + _own_delta(own, x[row], layer, fused, weight.shape[0])
                torch.testing.assert_close(y[row], expected, atol=1e-4, rtol=1e-4)


def test_lora_rows_skip_the_rows_of_other_adapters_between_the_steps_own() -> None:
    """Three adapters placed; a step with the first and the last: the rows of the middle one lie in the
    span the matmul reads, but its B^T is not copied and its columns add nothing."""
    triton_ops = pytest.importorskip("engine.model.triton_ops")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(11)
    model = _tiny_llama(device)
    first, middle, last = (
        _lora_adapter(
            name,
            rank,
            [{"o": _adapter_pair(g, device, rank, 8, 8)}, {"o": _adapter_pair(g, device, rank, 8, 8)}],
        )
        for name, rank in (("first", 2), ("middle", 4), ("last", 3))
    )
    rows = LoraRows(model, units=9)
    rows.place([first, middle, last])
    stack = rows.stack([last, first], device)
    spec = stack.layers[0]["o"]
    assert spec.hi - spec.lo == 9 and spec.b_t.shape[0] == 5 and spec.index is not None
    row_adapter = torch.tensor([0, 1, -1, 1], device=device)
    lora = RowsLora(rows, stack, row_adapter, triton_ops)
    ops = TritonOps()
    for layer in range(2):
        weight = model.layers[layer].o
        x = torch.randn(4, 8, generator=g).to(device)
        y = lora.linear(x, weight, layer, "o", ops)
        for row, which in enumerate(row_adapter.tolist()):
            own = [last, first][which].weights if which >= 0 else None
            expected = x[row] @ weight.t() + _own_delta(own, x[row], layer, "o", 8)
            torch.testing.assert_close(y[row], expected, atol=1e-4, rtol=1e-4)


def test_fixed_decode_follows_rows_laid_out_again_elsewhere(demo: DemoModel, eager: EngineCore) -> None:
    """Another user of the same rows (bench.gpu's variants make a second DecodeGraphs) moving or dropping
    the adapters' rows changes no LoraSlots version: the graphs still notice, drop what read the old rows
    and place the resident adapters again."""
    pytest.importorskip("triton")
    fixed = EngineCore(engine_config(demo, device=TRITON_DEVICE, enforce_eager=True))
    fixed.runner.model.ops = TritonOps()
    fixed.runner.use_fixed_decode(16, fixed.max_model_len, capture=False, lora_units=fixed.lora_units)
    graphs = fixed.runner.graphs
    assert graphs is not None and graphs.rows is not None
    prompts = _prompts(fixed)
    expected = _tokens(eager.generate(prompts, GREEDY, ADAPTERS))
    assert _tokens(fixed.generate(prompts, GREEDY, ADAPTERS)) == expected
    version = fixed.loras.version
    graphs.rows.place([])  # everything leaves, as another placement might have moved it
    assert _tokens(fixed.generate(prompts, GREEDY, ADAPTERS)) == expected
    assert fixed.loras.version == version and graphs.rows_layout == graphs.rows.layout
    assert all(graphs.rows.placed[id(a)][0] is a for a in fixed.loras.resident.values())


def test_lora_rows_are_not_made_once_a_graph_reads_the_weights() -> None:
    """Making the rows moves every weight: after a capture that would leave graphs on freed memory."""
    model = _tiny_llama(torch.device("cpu"))
    model.in_graphs = True
    with pytest.raises(RuntimeError):
        LoraRows.attach(model, 8)


def test_lora_rows_keep_placements_and_lay_out_again_when_fragmented() -> None:
    """Adapters keep their rows while others come and go; when no gap is wide enough every adapter is
    written again, in order, and place() says so."""
    device = torch.device("cpu")
    g = torch.Generator().manual_seed(3)
    model = _tiny_llama(device)
    rows = LoraRows(model, units=10)

    def adapter(name: str, rank: int) -> LoraAdapter:
        return _lora_adapter(name, rank, [{"o": _adapter_pair(g, device, rank, 8, 8)}, {}])

    a, b, c, d = adapter("a", 3), adapter("b", 2), adapter("c", 3), adapter("d", 4)
    assert not rows.place([a, b, c])
    assert [rows.unit_of(x) for x in (a, b, c)] == [0, 3, 5]
    assert not rows.place([a, c]) and rows.layout == 1  # b leaves a gap of 2 at unit 3; its rows are stale
    assert rows.place([a, c, d])  # d needs 4 units: the gap 3..5 and the end 8..10 are too narrow
    assert [rows.unit_of(x) for x in (a, c, d)] == [0, 3, 6] and rows.layout == 2
    buffer = rows.buffers[0]["o"]
    for x in (a, c, d):
        first = 8 + rows.unit_of(x)
        assert torch.equal(buffer[first : first + x.rank], x.weights[0]["o"][0])


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


def test_fixed_decode_with_the_lora_rows_gives_the_ordinary_tokens(
    demo: DemoModel, eager: EngineCore
) -> None:
    """The Triton ops with the adapters as rows under the weights, decode steps through the fixed buffers
    (replayed as CUDA graphs on a GPU), against the ordinary path on the torch ops: mixed adapters and
    the base."""
    pytest.importorskip("triton")

    fixed = EngineCore(engine_config(demo, device=TRITON_DEVICE, enforce_eager=True))
    fixed.runner.model.ops = TritonOps()
    fixed.runner.use_fixed_decode(
        16, fixed.max_model_len, capture=TRITON_DEVICE == "cuda", lora_units=fixed.lora_units
    )
    prompts = _prompts(fixed)
    assert _tokens(fixed.generate(prompts, GREEDY, ADAPTERS)) == _tokens(
        eager.generate(prompts, GREEDY, ADAPTERS)
    )
    graphs = fixed.runner.graphs
    assert graphs is not None and graphs.entries and graphs.rows is not None
