"""bench.lora_cost on the tiny demo: every way runs, alternated, and the engine gets its kernel back."""

from __future__ import annotations

from bench.lora_cost import BASE, KERNEL, MATMULS, measure, table
from engine.core import EngineCore
from engine.demo import DemoModel
from tests.conftest import DATA_DIR, engine_config


def test_each_way_runs_every_round_and_the_kernel_is_restored(demo: DemoModel) -> None:
    core = EngineCore(engine_config(demo))
    kernel = core.loras.kernel
    results = measure(core, DATA_DIR, concurrency=2, num_requests=2, max_tokens=3, rounds=2)
    assert core.loras.kernel is kernel
    assert list(results) == ([BASE, KERNEL, MATMULS] if kernel is not None else [BASE, MATMULS])
    for runs in results.values():
        assert len(runs) == 2
        assert all(r.output_tokens == 2 * 3 and r.output_throughput > 0 for r in runs)
    printed = table(results)
    assert printed.count("\n") == len(results) + 1 and "1.000" in printed
