"""The CPU's packed-weight matmuls: the plain matmul's results, and the engine's tokens unchanged."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from engine.core import EngineCore
from engine.demo import DemoModel
from engine.model.ops import PackedCpuOps, TorchOps, ops_for, packing_works
from engine.types import SamplingParams
from tests.conftest import engine_config

CPU = torch.device("cpu")


def test_this_torch_packs_weights_and_the_cpu_uses_them(monkeypatch: pytest.MonkeyPatch) -> None:
    assert packing_works(torch.float32)
    assert isinstance(ops_for(CPU, torch.float32), PackedCpuOps)
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert isinstance(ops_for(CPU, torch.float32, memory // 4), PackedCpuOps)
    assert type(ops_for(CPU, torch.float32, memory // 4 + 1)) is TorchOps  # no room for a second copy
    monkeypatch.setenv("CHATMED_DISABLE_PACKED", "1")
    assert type(ops_for(CPU, torch.float32)) is TorchOps


@pytest.mark.parametrize("rows", [1, 3, 4, 16, 37])
def test_packed_linear_is_the_plain_linear(rows: int) -> None:
    g = torch.Generator().manual_seed(rows)
    weight, other = torch.randn(96, 64, generator=g), torch.randn(96, 64, generator=g)
    x = torch.randn(rows, 64, generator=g)
    ops = PackedCpuOps()
    ops.pack([weight])
    if rows < ops.min_rows:  # few rows: the plain weight, bit for bit
        assert torch.equal(ops.linear(x, weight), F.linear(x, weight))
    else:
        torch.testing.assert_close(ops.linear(x, weight), F.linear(x, weight), rtol=1e-5, atol=1e-5)
    assert torch.equal(ops.linear(x, other), F.linear(x, other))  # a weight never packed


def test_engine_on_packed_weights_generates_what_plain_weights_generate(demo: DemoModel) -> None:
    core = EngineCore(engine_config(demo))
    assert isinstance(core.runner.model.ops, PackedCpuOps)
    prompts = [core.tokenizer.encode(f"问：{q}\n答：") for q in ("头痛", "失眠多梦", "胃胀", "咳嗽", "腰痛")]
    adapters = ["chatmed-consult", None, "chatmed-tcm", "chatmed-tcm", None]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    packed = core.generate(prompts, params, adapters)
    core.runner.model.ops = TorchOps()
    plain = core.generate(prompts, params, adapters)
    assert [o.token_ids for o in packed] == [o.token_ids for o in plain]


def test_packed_kernels_see_a_handful_of_row_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    """oneDNN keeps a kernel (about half a MiB) for every row count it is given: rows are padded to a
    power of two so that any mix of batch sizes needs a few, not one per size (an RSS leak in a soak)."""
    seen: set[int] = set()
    kernel = torch.ops.mkldnn._linear_pointwise

    def spy(x: torch.Tensor, *args: object) -> torch.Tensor:
        seen.add(x.shape[0])
        return kernel(x, *args)

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", spy)
    ops, weight = PackedCpuOps(), torch.randn(48, 32)
    ops.pack([weight])
    for rows in range(1, 600):
        x = torch.randn(rows, 32)
        torch.testing.assert_close(ops.linear(x, weight), F.linear(x, weight), rtol=1e-5, atol=1e-5)
    assert seen == {4, 8, 16, 32, 64, 128, 256}
