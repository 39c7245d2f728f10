"""What the adapters cost the engine: the same requests on the base alone, with both adapters added by
the CPU LoRA kernel, and with both added by torch matmuls, alternated in one process.

    python -m bench.lora_cost [--concurrency 16] [--num-requests 32] [--max-tokens 64] [--rounds 4] \\
        [--threads N] [--dtype float32|bfloat16] [--json PATH]

Runs go base, kernel, matmuls, base, kernel, ... for --rounds rounds on the bench model at ChatMed's
sampling defaults (temperature 0.2, top_p 0.9, repetition penalty 1.3), each request exactly
--max-tokens tokens. Prints the median output tokens/s and model ms per step of each way, and each
adapter way's median over base-only's: the target of DESIGN.md is at least 0.9.
"""

from __future__ import annotations

import argparse
import logging
import statistics
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from bench.engine import Decoding, RunResult, bench_core, build_workloads, run_engine
from bench.prompts import DEFAULT_DATA_DIR
from bench.report import Cell, format_table, load_note, write_json
from bench.stats import ratio
from engine import EngineCore
from engine.demo import DemoSpec, build_demo
from server.registry import CHATMED_DEFAULTS

logger = logging.getLogger(__name__)

BASE, KERNEL, MATMULS = "base only", "adapters, CPU kernel", "adapters, torch matmuls"
# The served models' generation defaults (CHATMED.md), as the server applies them.
CHATMED = Decoding(CHATMED_DEFAULTS.temperature, CHATMED_DEFAULTS.top_p, CHATMED_DEFAULTS.repetition_penalty)


def measure(
    core: EngineCore, data: Path, concurrency: int, num_requests: int, max_tokens: int, rounds: int
) -> dict[str, list[RunResult]]:
    """Each way's runs, alternated. Without the kernel (no compiler, disabled), its runs are left out."""
    mixed = build_workloads(core, data, num_requests, seed=0)
    bare = [replace(w, adapter=None) for w in mixed]  # the same prompts on the base
    kernel = core.loras.kernel
    ways = [BASE, KERNEL, MATMULS] if kernel is not None else [BASE, MATMULS]
    run_engine(core, mixed[:4], 8, CHATMED, 4)  # warm-up: both adapters resident, first calls
    results: dict[str, list[RunResult]] = {way: [] for way in ways}
    try:
        for round_ in range(rounds):
            for way in ways:
                core.loras.kernel = kernel if way == KERNEL else None  # None: SegmentLora's matmuls
                logger.info("round %d/%d: %s", round_ + 1, rounds, way)
                workloads = bare if way == BASE else mixed
                results[way].append(run_engine(core, workloads, max_tokens, CHATMED, concurrency))
    finally:
        core.loras.kernel = kernel
    return results


def _median(runs: Sequence[RunResult], figure: str) -> float:
    values = [r.output_throughput if figure == "tok/s" else r.per_step_ms(r.forward_s) for r in runs]
    return statistics.median(values)


def table(results: dict[str, list[RunResult]]) -> str:
    base_rate = _median(results[BASE], "tok/s")
    rows: list[list[Cell]] = []
    for way, runs in results.items():
        rate = _median(runs, "tok/s")
        rows.append(
            [
                way,
                len(runs),
                " ".join(f"{r.output_throughput:.0f}" for r in runs),
                rate,
                _median(runs, "model ms"),
                f"{ratio(rate, base_rate):.3f}",
            ]
        )
    return format_table(["way", "runs", "out tok/s per run", "median tok/s", "model ms", "/ base"], rows)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.lora_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA_DIR, help="folder of the ChatMed files")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="weight dtype")
    parser.add_argument("--cache-dir", type=Path, default=None, help="demo model cache")
    parser.add_argument("--json", type=Path, default=None, help="write results here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    if min(args.concurrency, args.num_requests, args.max_tokens, args.rounds) < 1:
        raise SystemExit("--concurrency, --num-requests, --max-tokens and --rounds must be positive")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    load_before = load_note()
    demo = build_demo(DemoSpec.bench(), args.cache_dir)
    core = bench_core(demo, args.concurrency, args.threads, dtype=args.dtype)
    results = measure(core, args.data, args.concurrency, args.num_requests, args.max_tokens, args.rounds)
    print(table(results))
    print(
        f"{args.num_requests} requests, {args.concurrency} concurrent, {args.max_tokens} tokens each, "
        f"both adapters 50/50 (base only: the same prompts without), ChatMed's sampling defaults; "
        f"{args.dtype}; torch threads {torch.get_num_threads()}; medians over {args.rounds} alternated rounds"
    )
    if KERNEL not in results:
        print("the CPU LoRA kernel is not in use here (no C compiler, or CHATMED_DISABLE_NATIVE_LORA=1)")
    print(f"at start: {load_before}\nat end: {load_note()}")
    if args.json is not None:
        payload: dict[str, Any] = {
            "benchmark": "lora_cost",
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "runs": {
                way: [
                    {"output_throughput": r.output_throughput, "model_ms": r.per_step_ms(r.forward_s)}
                    for r in runs
                ]
                for way, runs in results.items()
            },
        }
        write_json(args.json, payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
