"""Engine throughput: our EngineCore at several concurrency levels against transformers `generate` + peft
one request at a time (the original ChatMed service's way), on the ~20M-parameter bench model.

    python -m bench.engine [--data ../shared/data/chatmed] [--num-requests 32] [--max-tokens 128] \\
        [--concurrency 1,8,32] [--temperature 0] [--top-p 1] [--repetition-penalty 1] [--json results.json]

Both adapters mixed 50/50 (Consult questions on chatmed-consult, TCM questions on chatmed-tcm), exactly
--max-tokens new tokens per request (EOS ignored), greedy unless --temperature > 0 (then seeded per
request, with --top-p; `--temperature 0.2 --top-p 0.9 --repetition-penalty 1.3` are ChatMed's defaults).
Both systems get the same prompt ids and settings. Prints one table; the ratio column is output tokens/s
over the baseline's, measured in the same run.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import platform
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

from bench.hf_baseline import GenerateOptions, PeftGenerator
from bench.prompts import DEFAULT_DATA_DIR, load_mixed_chatmed
from bench.report import Cell, format_ratio, format_table, load_note, write_json
from bench.stats import mean, ratio
from bench.timing import call_timer, synchronize
from engine import CHATMED_TEMPLATE, EngineConfig, EngineCore, SamplingParams
from engine.demo import DemoModel, DemoSpec, build_demo

logger = logging.getLogger(__name__)

BASELINE_NAME = "transformers generate + peft"
OURS_NAME = "chatmed engine"


@dataclass(frozen=True)
class Workload:
    """One request of the benchmark: prompt ids (shared by both systems), adapter and seed."""

    prompt_ids: list[int]
    adapter: str
    seed: int


@dataclass(frozen=True)
class RunResult:
    """Figures of one run: throughput over wall time, plus request latency for context."""

    system: str
    concurrency: int
    num_requests: int
    output_tokens: int
    duration_s: float
    mean_latency_s: float
    # Ours: engine steps, and the seconds of all of them spent in the model (ModelRunner.run, to a
    # device synchronize) and in the sampler; the rest is scheduling, detokenizing and this loop.
    steps: int = 0
    forward_s: float = math.nan
    sampler_s: float = math.nan

    @property
    def output_throughput(self) -> float:
        return self.output_tokens / self.duration_s if self.duration_s > 0 else math.nan

    def per_step_ms(self, seconds: float) -> float:
        return seconds / self.steps * 1e3 if self.steps else math.nan

    @property
    def rest_s(self) -> float:
        return self.duration_s - self.forward_s - self.sampler_s

    @property
    def tokens_per_request(self) -> float:
        return self.output_tokens / self.num_requests if self.num_requests else math.nan


@dataclass(frozen=True)
class Decoding:
    """How every request of a run decodes, in both systems: greedy at temperature 0, else seeded sampling."""

    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def params(self, max_tokens: int, seed: int) -> SamplingParams:
        """Ours: exactly max_tokens tokens (EOS ignored)."""
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            repetition_penalty=self.repetition_penalty,
            ignore_eos=True,
            seed=seed if self.temperature > 0 else None,
        )

    def options(self, max_tokens: int, seed: int) -> GenerateOptions:
        """The baseline's: generate(max_new_tokens=min_new_tokens=max_tokens)."""
        return GenerateOptions(
            max_new_tokens=max_tokens,
            min_new_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            repetition_penalty=self.repetition_penalty,
            seed=seed,
        )


def run_engine(
    core: EngineCore, workloads: Sequence[Workload], max_tokens: int, decoding: Decoding, concurrency: int
) -> RunResult:
    """Feed at most `concurrency` requests at a time through add_request/step until all finish."""
    sync = partial(synchronize, core.device)
    with call_timer(core.runner, "run", sync) as forward_s, call_timer(core.sampler, "sample") as sampler_s:
        result = _run_engine(core, workloads, max_tokens, decoding, concurrency)
    return replace(result, forward_s=sum(forward_s), sampler_s=sum(sampler_s))


def _run_engine(
    core: EngineCore, workloads: Sequence[Workload], max_tokens: int, decoding: Decoding, concurrency: int
) -> RunResult:
    pending = deque(enumerate(workloads))
    started: dict[str, float] = {}
    latencies: list[float] = []
    output_tokens = 0
    # Every step produces at least one token for some running request, so this bounds the loop.
    max_steps = 4 * sum(len(w.prompt_ids) + max_tokens for w in workloads) + 100
    steps = 0
    start = time.perf_counter()
    for _ in range(max_steps):
        while pending and len(started) < concurrency:
            index, work = pending.popleft()
            request_id = f"bench-{concurrency}-{index}"
            params = decoding.params(max_tokens, work.seed)
            core.add_request(request_id, work.prompt_ids, params, work.adapter)
            started[request_id] = time.perf_counter()
        if not started:
            break
        outputs = core.step()
        steps += 1
        for output in outputs:
            if output.finished:
                output_tokens += output.num_output_tokens
                latencies.append(time.perf_counter() - started.pop(output.request_id))
        for request_id, error in core.failed:
            raise RuntimeError(f"request {request_id} failed in the engine") from error
    else:
        raise RuntimeError(f"the engine did not finish within {max_steps} steps")
    duration = time.perf_counter() - start
    return RunResult(OURS_NAME, concurrency, len(workloads), output_tokens, duration, mean(latencies), steps)


def run_baseline(
    generator: PeftGenerator, workloads: Sequence[Workload], max_tokens: int, decoding: Decoding
) -> RunResult:
    """One request at a time, `set_adapter` per request, generate(max_new_tokens=min_new_tokens=N)."""
    latencies: list[float] = []
    output_tokens = 0
    start = time.perf_counter()
    for work in workloads:
        options = decoding.options(max_tokens, work.seed)
        began = time.perf_counter()
        output_tokens += len(generator.generate(work.prompt_ids, work.adapter, options))
        latencies.append(time.perf_counter() - began)
    duration = time.perf_counter() - start
    return RunResult(BASELINE_NAME, 1, len(workloads), output_tokens, duration, mean(latencies))


def build_workloads(core: EngineCore, data_dir: Path, count: int, seed: int) -> list[Workload]:
    """`count` requests from the real prompts, Consult/TCM alternating, prompts cycled if needed."""
    pairs = load_mixed_chatmed(data_dir)
    workloads = []
    for i in range(count):
        question, adapter = pairs[i % len(pairs)]
        ids = core.tokenizer.encode_chat([{"role": "user", "content": question}], CHATMED_TEMPLATE)
        workloads.append(Workload(ids, adapter, seed + i))
    return workloads


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.engine", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA_DIR, help="folder of the ChatMed files")
    parser.add_argument("--num-requests", type=int, default=32, help="requests per batched run")
    parser.add_argument(
        "--num-serial-requests",
        type=int,
        default=4,
        help="requests for one-at-a-time runs (baseline, concurrency 1): their rate does not depend on N",
    )
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated concurrency levels")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0, help="with --temperature > 0")
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-baseline", action="store_true", help="skip transformers generate + peft")
    parser.add_argument("--cache-dir", type=Path, default=None, help="demo model cache")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None, help="write results here")
    return parser.parse_args(argv)


def _levels(text: str) -> list[int]:
    levels = sorted({int(part) for part in text.split(",") if part.strip()})
    if not levels or levels[0] < 1:
        raise SystemExit("--concurrency needs positive integers, e.g. 1,8,32")
    return levels


def bench_core(
    demo: DemoModel, max_num_seqs: int, threads: int | None, device: str = "cpu", dtype: str = "float32"
) -> EngineCore:
    """Our engine over the bench model with both adapters."""
    config = EngineConfig(
        model_path=demo.base_path,
        adapters=tuple(sorted(demo.adapters.items())),
        device=device,
        dtype=dtype,
        max_num_seqs=max_num_seqs,
        num_threads=threads,
    )
    return EngineCore(config)


def run(args: argparse.Namespace) -> tuple[list[RunResult], RunResult | None]:
    """Build the model, run our engine at each level, then the baseline. Returns (ours, baseline)."""
    levels = _levels(args.concurrency)
    demo = build_demo(DemoSpec.bench(), args.cache_dir)
    core = bench_core(demo, max(levels), args.threads, args.device, args.dtype)
    workloads = build_workloads(core, args.data, max(args.num_requests, args.num_serial_requests), args.seed)
    serial = workloads[: args.num_serial_requests]
    # Warm-up (unmeasured): first-call allocations and kernel selection, both adapters.
    decoding = Decoding(args.temperature, args.top_p, args.repetition_penalty)
    run_engine(core, workloads[:2], 8, decoding, 2)
    ours = []
    for level in levels:
        chosen = serial if level == 1 else workloads[: args.num_requests]
        logger.info("our engine: %d requests at concurrency %d", len(chosen), level)
        ours.append(run_engine(core, chosen, args.max_tokens, decoding, level))
    del core
    baseline = None
    if not args.no_baseline:
        generator = PeftGenerator(demo.base_path, sorted(demo.adapters.items()), args.device, args.dtype)
        run_baseline(generator, workloads[:2], 8, decoding)
        logger.info("baseline: %d requests one at a time", len(serial))
        baseline = run_baseline(generator, serial, args.max_tokens, decoding)
    return ours, baseline


def results_table(ours: Sequence[RunResult], baseline: RunResult | None) -> str:
    headers = ["system", "concurrency", "requests", "out tokens", "tok/req", "seconds", "out tok/s"]
    headers += ["vs base", "steps", "model ms", "sampler ms", "rest ms"]
    runs = ([baseline] if baseline else []) + list(ours)
    base_rate = baseline.output_throughput if baseline else math.nan
    rows: list[list[Cell]] = [
        [
            r.system,
            r.concurrency,
            r.num_requests,
            r.output_tokens,
            r.tokens_per_request,
            r.duration_s,
            r.output_throughput,
            format_ratio(ratio(r.output_throughput, base_rate)),
            r.steps or "n/a",
            r.per_step_ms(r.forward_s),
            r.per_step_ms(r.sampler_s),
            r.per_step_ms(r.rest_s),
        ]
        for r in runs
    ]
    return format_table(headers, rows)


def _payload(args: argparse.Namespace, ours: Sequence[RunResult], baseline: RunResult | None) -> dict:
    def figures(r: RunResult) -> dict[str, Any]:
        return {**asdict(r), "output_throughput": r.output_throughput}

    base_rate = baseline.output_throughput if baseline else math.nan
    return {
        "benchmark": "engine",
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "load_average_end": os.getloadavg()[0],
        },
        "baseline": figures(baseline) if baseline else None,
        "ours": [figures(r) for r in ours],
        "ratios_vs_baseline": {str(r.concurrency): ratio(r.output_throughput, base_rate) for r in ours},
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    load_before = load_note()
    ours, baseline = run(args)
    print(results_table(ours, baseline))
    print(
        f"{args.max_tokens} new tokens per request, EOS ignored, both adapters 50/50; "
        f"temperature {args.temperature}, top_p {args.top_p}, repetition_penalty {args.repetition_penalty}; "
        f"torch threads {torch.get_num_threads()}; vs base = out tok/s / baseline's"
    )
    print(f"at start: {load_before}\nat end: {load_note()}")
    if args.json is not None:
        write_json(args.json, _payload(args, ours, baseline))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
