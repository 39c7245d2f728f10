"""The CPU LoRA kernel (engine/model/lora_cpu.c) in float32 and bfloat16 against float64 matmuls, its
bfloat16 rounding against torch's, its row-by-row determinism, its use by the engine, and the torch
fallback when it cannot be built."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from engine.core import EngineCore
from engine.demo import DemoModel
from engine.model import lora_cpu
from engine.model.llama import LoraSegment, SegmentLora
from engine.model.lora_cpu import Block, LoraKernel, PackedAdapter, load_kernel
from engine.scheduler import ScheduledSeq, Sequence
from engine.types import SamplingParams
from tests.conftest import engine_config

Site = tuple[torch.Tensor, torch.Tensor, tuple[Block, ...]]


@pytest.fixture(scope="module")
def kernel() -> LoraKernel:
    if not lora_cpu.find_compiler():
        pytest.skip("no C compiler: the engine uses torch matmuls (tested below)")
    found = load_kernel()
    assert found is not None, "a C compiler is here, so the kernel must build"
    return found


@pytest.fixture
def threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _site(gen: torch.Generator, in_dim: int, parts: list[tuple[int, int]], gap: int = 0) -> Site:
    """A fused projection's (A, B^T, blocks): `parts` = [(rank, out columns)], with `gap` columns of no
    part (a projection the adapter does not train) before the last part."""
    rank = sum(r for r, _ in parts)
    out = sum(c for _, c in parts) + gap
    a = torch.randn(rank, in_dim, generator=gen)
    b_t = torch.zeros(rank, out)
    blocks, row, col = [], 0, 0
    for i, (r, c) in enumerate(parts):
        if i == len(parts) - 1:
            col += gap
        b_t[row : row + r, col : col + c] = torch.randn(r, c, generator=gen)
        blocks.append((row, row + r, col, col + c))
        row, col = row + r, col + c
    return a, b_t, tuple(blocks)


def _reference(y: torch.Tensor, x: torch.Tensor, site: Site) -> torch.Tensor:
    a, b_t, _ = site
    return (y.double() + x.double() @ a.double().t() @ b_t.double()).to(y.dtype)


def _assert_close(got: torch.Tensor, expected: torch.Tensor, x: torch.Tensor, site: Site) -> None:
    """Float32 sums of in_dim terms err in proportion to the sum of the terms' magnitudes; in bfloat16 the
    result is rounded once more, so it may land one unit (2^-7 relative) off the rounded exact sum."""
    a, b_t, _ = site
    scale = float((x.double().abs() @ a.double().abs().t() @ b_t.double().abs()).max())
    rtol = 1e-5 if got.dtype == torch.float32 else 2**-7
    torch.testing.assert_close(got, expected, rtol=rtol, atol=1e-5 + 2e-6 * scale)


def _as(dtype: torch.dtype, site: Site) -> Site:
    a, b_t, blocks = site
    return a.to(dtype), b_t.to(dtype), blocks


DTYPES = [torch.float32, torch.bfloat16]


SHAPES = {
    "qkv-like, three blocks": (512, [(8, 512), (8, 256), (8, 256)], 0),
    "odd sizes, partial tiles": (100, [(3, 40), (5, 24)], 0),
    "one block, long input": (1100, [(16, 37)], 0),
    "a part left out": (64, [(4, 48), (4, 16)], 32),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 5, 8, 13, 32, 40, 70])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_kernel_matches_float64_matmuls(
    kernel: LoraKernel, rows: int, shape: tuple, dtype: torch.dtype
) -> None:
    in_dim, parts, gap = shape
    gen = torch.Generator().manual_seed(rows)
    site = _as(dtype, _site(gen, in_dim, parts, gap))
    out = site[1].shape[1]
    # x and y are column slices of wider tensors (row strides that are not the width), and the segment
    # starts at row 2: rows and columns outside it must stay as they are.
    x_full = torch.randn(rows + 4, in_dim + 7, generator=gen).to(dtype)
    y_full = torch.randn(rows + 4, out + 5, generator=gen).to(dtype)
    x, y = x_full[:, :in_dim], y_full[:, :out]
    expected = y_full.clone()
    expected[2 : rows + 2, :out] = _reference(y[2 : rows + 2], x[2 : rows + 2], site)
    plan = kernel.plan([(2, rows + 2, PackedAdapter([site]))])
    plan.add(y, x, 0)
    _assert_close(y_full, expected, x, site)


def test_bfloat16_sums_are_rounded_as_torch_rounds(kernel: LoraKernel) -> None:
    """With small integers in x, A and B every product and sum is exact in float32, so the kernel's one
    rounding of y + delta to bfloat16 must give torch's bits: to nearest, ties to even, in every tile and
    in the partial one."""
    gen = torch.Generator().manual_seed(5)
    a = torch.randint(-3, 4, (8, 64), generator=gen).to(torch.bfloat16)
    b_t = torch.randint(-3, 4, (8, 40), generator=gen).to(torch.bfloat16)
    site = (a, b_t, ((0, 8, 0, 40),))
    x = torch.randint(-4, 5, (13, 64), generator=gen).to(torch.bfloat16)
    y = (torch.randn(13, 40, generator=gen) * 300).to(torch.bfloat16)
    delta = x.float() @ a.float().t() @ b_t.float()  # exact: integers far below 2^24
    expected = (y.float() + delta).to(torch.bfloat16)
    got = y.clone()
    kernel.plan([(0, 13, PackedAdapter([site]))]).add(got, x, 0)
    assert torch.equal(got.view(torch.int16), expected.view(torch.int16))
    # Ties: y + delta lands exactly halfway between two bfloat16 values (1 + 2^-8 + k 2^-7 and so on).
    one = torch.ones(1, 8, dtype=torch.bfloat16)
    unit = (torch.eye(8, dtype=torch.bfloat16), torch.eye(8, 16, dtype=torch.bfloat16), ((0, 8, 0, 16),))
    halves = torch.tensor([[2**-8, 3 * 2**-8, -(2**-8), 2**-9, 1.5, 2**-8, 0, 3 * 2**-8]]).to(torch.bfloat16)
    tie = one.clone()[:, :8].expand(1, 8).contiguous()
    y_tie = torch.cat([tie, tie], dim=1)
    got = y_tie.clone()
    kernel.plan([(0, 1, PackedAdapter([unit]))]).add(got, halves, 0)
    expected = (y_tie.float() + torch.cat([halves.float(), torch.zeros(1, 8)], dim=1)).to(torch.bfloat16)
    assert torch.equal(got.view(torch.int16), expected.view(torch.int16))
    # A zero delta: y + 0 as torch computes it, non-finite and subnormal values too (-0 + 0 is +0). A NaN
    # stays a NaN; its bits are not compared (torch's own conversions differ there by path).
    special = torch.tensor([[float("inf"), float("-inf"), float("nan"), -0.0, 1e-40, -3.5, 65504.0, 0.1]])
    y_special = torch.cat([special, special], dim=1).to(torch.bfloat16)
    got = y_special.clone()
    kernel.plan([(0, 1, PackedAdapter([unit]))]).add(got, torch.zeros(1, 8, dtype=torch.bfloat16), 0)
    expected = (y_special.float() + torch.zeros(1, 16)).to(torch.bfloat16)
    nan = expected.isnan()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(got[~nan].view(torch.int16), expected[~nan].view(torch.int16))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_rows_result_depends_on_nothing_else(kernel: LoraKernel, threads: None, dtype: torch.dtype) -> None:
    """A row gets the same bits alone, among 8 rows, among 70 (where threads split the rows), and on one
    thread or two."""
    gen = torch.Generator().manual_seed(0)
    site = _as(dtype, _site(gen, 1100, [(16, 96), (16, 80)]))
    packed = PackedAdapter([site])
    x = torch.randn(70, 1100, generator=gen).to(dtype)
    y0 = torch.randn(70, 176, generator=gen).to(dtype)
    results = []
    for num_threads in (1, 2):
        torch.set_num_threads(num_threads)
        for start, end in [(5, 6), (0, 8), (0, 70)]:
            y = y0.clone()
            kernel.plan([(start, end, packed)]).add(y, x, 0)
            results.append(y[5])
    for other in results[1:]:
        assert torch.equal(other, results[0])


def test_each_segment_gets_its_own_adapter_and_others_rows_stay(kernel: LoraKernel) -> None:
    gen = torch.Generator().manual_seed(1)
    first, second = _site(gen, 64, [(4, 32)]), _site(gen, 64, [(8, 32)])
    x, y = torch.randn(10, 64, generator=gen), torch.randn(10, 32, generator=gen)
    expected = y.clone()
    expected[0:3] = _reference(y[0:3], x[0:3], first)
    expected[5:9] = _reference(y[5:9], x[5:9], second)
    plan = kernel.plan([(0, 3, PackedAdapter([first])), (5, 9, PackedAdapter([second]))])
    plan.add(y, x, 0)
    _assert_close(y, expected, x, first)
    _assert_close(y, expected, x, second)


def test_a_projection_without_lora_is_left_alone(kernel: LoraKernel) -> None:
    gen = torch.Generator().manual_seed(2)
    packed = PackedAdapter([None, _site(gen, 16, [(2, 16)])])
    x, y = torch.randn(4, 16, generator=gen), torch.randn(4, 16, generator=gen)
    before = y.clone()
    kernel.plan([(0, 4, packed)]).add(y, x, 0)
    assert torch.equal(y, before)


def _step_logits(core: EngineCore, lora_by: str) -> torch.Tensor:
    """Logits of every row of one prefill step over three sequences (base, consult, tcm), the adapters
    added by the kernel, by torch matmuls, or not at all ("kernel", "torch", "none")."""
    seqs = [
        Sequence("a", list(range(3, 40)), 37, None),
        Sequence("b", list(range(5, 30)), 25, "chatmed-consult"),
        Sequence("c", list(range(7, 20)), 13, "chatmed-tcm"),
    ]
    items = [ScheduledSeq(seqs[0], 0, 37), ScheduledSeq(seqs[1], 0, 25), ScheduledSeq(seqs[2], 0, 13)]
    for item in items:
        item.seq.block_table.extend(
            core.allocator.allocate(core.allocator.blocks_needed(item.num_new_tokens, 0))
        )
    runner = core.runner
    inputs = runner.prepare(items)
    lora = core.loras.segments(inputs.spans)
    assert isinstance(lora, SegmentLora)
    assert lora.plan is not None
    if lora_by == "torch":
        lora.plan = None
    elif lora_by == "none":
        lora = SegmentLora([])
    with torch.inference_mode():
        hidden = runner.model(inputs.input_ids, inputs.positions, runner.kv, inputs.attention, lora)
        logits = runner.model.compute_logits(hidden)
    for seq in seqs:
        core.allocator.free(seq.block_table)
    return logits


def test_engine_adds_deltas_with_the_kernel_as_torch_does(kernel: LoraKernel, demo: DemoModel) -> None:
    core = EngineCore(engine_config(demo))
    assert core.loras.kernel is not None
    ours, torch_path, bare = (_step_logits(core, how) for how in ("kernel", "torch", "none"))
    torch.testing.assert_close(ours, torch_path, rtol=1e-5, atol=1e-5)
    assert torch.equal(ours[:37], bare[:37])  # the base rows: no adapter
    for start, end in [(37, 62), (62, 75)]:  # each adapter's rows: its delta
        assert (ours[start:end] - bare[start:end]).abs().max() > 1e-3


def test_in_bfloat16_the_kernel_errs_no_more_than_torch(kernel: LoraKernel, demo: DemoModel) -> None:
    """Against the float32 engine, a bfloat16 step's logits err by bfloat16's roundings either way; the
    kernel's (one rounding of y + delta) must be no larger than torch's matmuls' (which also round
    x A^T), and both far below the adapters' effect."""
    reference = _step_logits(EngineCore(engine_config(demo)), "kernel")
    core = EngineCore(engine_config(demo, dtype="bfloat16"))
    assert core.loras.kernel is not None
    ours, torch_path, bare = (_step_logits(core, how).float() for how in ("kernel", "torch", "none"))
    assert torch.equal(ours[:37], bare[:37])
    rows = slice(37, 75)  # the adapters' rows
    error = (ours[rows] - reference[rows]).abs().mean()
    torch_error = (torch_path[rows] - reference[rows]).abs().mean()
    effect = (reference[rows] - bare[rows]).abs().mean()
    assert error <= 1.05 * torch_error
    assert error < 0.05 * effect


def test_a_step_of_base_rows_alone_makes_no_kernel_call(kernel: LoraKernel, demo: DemoModel) -> None:
    core = EngineCore(engine_config(demo))
    assert core.loras.segments([(None, 0, 6)]).plan is None
    assert core.loras.segments([(None, 0, 6), ("chatmed-tcm", 6, 9)]).plan is not None


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_requests_output_does_not_depend_on_its_step(
    kernel: LoraKernel, demo: DemoModel, dtype: str
) -> None:
    """The same greedy tokens and logprobs alone and beside three long prompts (a step of over 256
    adapter rows), in both dtypes: the kernel takes every step, and each row's sums have one order."""
    core = EngineCore(engine_config(demo, dtype=dtype, max_num_batched_tokens=1024))
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=0)
    gen = torch.Generator().manual_seed(0)
    target = torch.randint(10, 200, (60,), generator=gen).tolist()
    others = [torch.randint(10, 200, (120,), generator=gen).tolist() for _ in range(3)]
    alone = core.generate([target], params, ["chatmed-tcm"])[0]
    together = core.generate([target, *others], params, ["chatmed-tcm"] * 4)[0]
    assert together.token_ids == alone.token_ids
    # The base's matmuls may round a row differently in another batch shape (float32 did, by 2e-7);
    # switching a step's adapter rows between the kernel and torch's matmuls moved them by 0.06.
    logprobs = [torch.tensor([lp.logprob for lp in out.logprobs or ()]) for out in (alone, together)]
    torch.testing.assert_close(logprobs[1], logprobs[0], rtol=0, atol=1e-5)


def test_adapters_are_packed_as_they_are_read_not_in_a_step(kernel: LoraKernel, demo: DemoModel) -> None:
    core = EngineCore(engine_config(demo))
    adapter = core.read_adapter("tcm-again", demo.adapters["chatmed-tcm"])  # the async engine's thread
    assert adapter.packed is not None
    core.add_adapter(adapter)
    # Made resident in a step: the adapter as read, nothing copied or packed on the engine thread.
    assert core.loras.resident_adapter("tcm-again", {"tcm-again"}) is adapter


def test_columns_that_are_not_contiguous_take_the_torch_path(kernel: LoraKernel) -> None:
    gen = torch.Generator().manual_seed(3)
    a, b_t, blocks = _site(gen, 16, [(4, 8)])
    x = torch.randn(16, 6, generator=gen).t()  # [6, 16], column stride 6
    y = torch.randn(6, 8, generator=gen)
    # The plan's own weights are empty: had the kernel run, y would be unchanged.
    plan = kernel.plan([(0, 6, PackedAdapter([None] * 4))])
    assert not plan.accepts(x, y)
    expected = _reference(y, x, (a, b_t, blocks))
    lora = SegmentLora([LoraSegment(0, 6, [{"o": (a, b_t)}])], plan)
    lora.add_delta(y, x, 0, "o")
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


@pytest.fixture
def fresh_kernel(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """load_kernel() without its process-wide cache, building into an empty folder."""
    monkeypatch.setenv("CHATMED_CACHE_DIR", str(tmp_path))
    load_kernel.cache_clear()
    yield
    load_kernel.cache_clear()


def test_disabled_by_the_environment(
    fresh_kernel: None, monkeypatch: pytest.MonkeyPatch, demo: DemoModel
) -> None:
    monkeypatch.setenv(lora_cpu.DISABLE_ENV, "1")
    assert load_kernel() is None
    core = EngineCore(engine_config(demo))
    assert core.loras.kernel is None
    lora = core.loras.segments([("chatmed-tcm", 0, 4)])
    assert isinstance(lora, SegmentLora) and lora.plan is None


def test_a_compiler_that_fails_leaves_the_torch_path_and_is_not_retried(
    fresh_kernel: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    monkeypatch.setenv("CC", "false")
    with caplog.at_level(logging.WARNING, logger=lora_cpu.__name__):
        assert load_kernel() is None
    assert "torch matmuls" in caplog.text
    failed = sorted(p.name for p in (tmp_path / "kernels").iterdir())
    assert failed and all(name.endswith(".failed") for name in failed)  # no temporary file left
    load_kernel.cache_clear()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=lora_cpu.__name__):
        assert load_kernel() is None
    assert "failed before" in caplog.text


def test_a_compiler_that_hangs_is_given_up_on(
    fresh_kernel: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    slow = tmp_path / "slow-cc"
    slow.write_text('#!/bin/sh\n[ "$1" = --version ] && exit 0\nsleep 5\n')
    slow.chmod(0o755)
    monkeypatch.setenv("CC", str(slow))
    monkeypatch.setattr(lora_cpu, "COMPILE_TIMEOUT_S", 0.2)
    assert load_kernel() is None
    assert not [p for p in (tmp_path / "kernels").iterdir() if p.suffix == ".tmp"]


def test_the_kernel_runs_on_torchs_openmp_threads_where_torch_has_libgomp(kernel: LoraKernel) -> None:
    if not lora_cpu._torch_uses_libgomp():
        pytest.skip("torch does not run on libgomp.so.1 here: the kernel is built without OpenMP")
    assert b"GOMP_parallel" in kernel.library.read_bytes()


def test_tensors_of_another_dtype_are_refused(kernel: LoraKernel) -> None:
    """The C code reads whatever memory it is given as the plan's element type: a float32 plan handed
    bfloat16 tensors (or the other way) would read past them."""
    gen = torch.Generator().manual_seed(6)
    site = _site(gen, 32, [(4, 16)])
    for dtype, other in [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)]:
        plan = kernel.plan([(0, 4, PackedAdapter([_as(dtype, site)]))])
        assert plan.dtype == dtype
        with pytest.raises(ValueError, match="tensors"):
            plan.add(torch.zeros(4, 16, dtype=other), torch.zeros(4, 32, dtype=other), 0)
    with pytest.raises(ValueError, match="one dtype"):
        PackedAdapter([site, _as(torch.bfloat16, site)])
    with pytest.raises(ValueError, match="one dtype"):
        kernel.plan([(0, 2, PackedAdapter([site])), (2, 4, PackedAdapter([_as(torch.bfloat16, site)]))])
    with pytest.raises(ValueError, match="one dtype"):
        PackedAdapter([_as(torch.float16, site)])


def test_shapes_that_do_not_fit_the_weights_are_refused(kernel: LoraKernel) -> None:
    gen = torch.Generator().manual_seed(4)
    plan = kernel.plan([(0, 4, PackedAdapter([_site(gen, 32, [(4, 16)])]))])
    y = torch.zeros(4, 16)
    with pytest.raises(ValueError, match="site 0"):
        plan.add(y, torch.zeros(4, 31), 0)  # x narrower than A's input
    with pytest.raises(ValueError, match="site 0"):
        plan.add(torch.zeros(4, 15), torch.zeros(4, 32), 0)  # y narrower than B's output
    with pytest.raises(ValueError, match="4 rows"):
        plan.add(torch.zeros(3, 16), torch.zeros(3, 32), 0)
    with pytest.raises(IndexError):
        plan.add(y, torch.zeros(4, 32), 1)  # no such site
    with pytest.raises(IndexError):
        plan.add(y, torch.zeros(4, 32), -1)
    with pytest.raises(ValueError, match="overlap"):
        plan.add(torch.zeros(1, 16).expand(4, 16), torch.zeros(4, 32), 0)  # rows written in parallel


def test_an_adapter_without_sites_joins_a_plan_of_any_dtype(kernel: LoraKernel) -> None:
    gen = torch.Generator().manual_seed(7)
    bf16 = PackedAdapter([_as(torch.bfloat16, _site(gen, 16, [(2, 16)]))])
    plan = kernel.plan([(0, 2, PackedAdapter([None])), (2, 4, bf16)])
    assert plan.dtype == torch.bfloat16


def test_the_build_is_cached_by_source_and_host(
    fresh_kernel: None, kernel: LoraKernel, tmp_path: Path
) -> None:
    built = load_kernel()
    assert built is not None and built.library.parent == tmp_path / "kernels"
    load_kernel.cache_clear()
    again = load_kernel()
    assert again is not None and again.library == built.library
    assert [p.name for p in (tmp_path / "kernels").iterdir()] == [built.library.name]  # no temporary left
