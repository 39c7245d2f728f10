"""Side-by-side serving benchmark (`make bench`): the same HTTP load against

  (a) our server, both adapters mixed 50/50        (b) our server, base model only
  (c) the baseline built like the original service (d) `transformers serve --continuous-batching`, bare base

each started in turn on 127.0.0.1 at a free port on the ~20M-parameter bench model: 16 concurrent
streaming clients, 128 tokens per request (EOS ignored), N real ChatMed prompts. Prints one table and
the ratios ours/(c), ours/(d) and mixed/base-only, measured in this one run.

    python -m bench.compare [--num-requests 32] [--concurrency 16] [--max-tokens 128] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import shlex
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.prompts import DEFAULT_DATA_DIR, TCM_ADAPTER, load_mixed_chatmed
from bench.report import Cell, format_ratio, format_table, load_note, write_json
from bench.serve import LoadConfig, LoadResult, run_load, stderr_progress
from bench.servers import ServerProcess, ServerSpec, ServerStartError, command_available
from bench.stats import ratio
from engine import CHATMED_TEMPLATE
from engine.demo import DemoModel, DemoSpec, build_demo

logger = logging.getLogger(__name__)

BASE_NAME = "chatmed-base"
MIXED, BASE_ONLY, BASELINE, TSERVE = "ours-mixed", "ours-base", "baseline", "transformers-serve"
ALL_SYSTEMS = (MIXED, BASE_ONLY, BASELINE, TSERVE)
LABELS = {
    MIXED: "(a) ours, 2 adapters 50/50",
    BASE_ONLY: "(b) ours, base only",
    BASELINE: "(c) baseline (original way)",
    TSERVE: "(d) transformers serve --cb",
}


@dataclass
class SystemRun:
    """One system's outcome: its load result, or why it did not run."""

    system: str
    result: LoadResult | None = None
    server_cpu_s: float = math.nan
    skipped: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def tokens_per_cpu_s(self) -> float:
        if self.result is None:
            return math.nan
        return ratio(float(self.result.total_output_tokens), self.server_cpu_s)

    @property
    def throughput(self) -> float:
        return self.result.output_throughput if self.result is not None else math.nan


@dataclass(frozen=True)
class Target:
    """A server to start and the request shape it understands."""

    spec: ServerSpec
    models: tuple[str, ...]
    extra_body: dict[str, Any]
    ignore_eos: bool = True
    note: str | None = None


def _python() -> str:
    return sys.executable


def _adapter_flags(demo: DemoModel) -> list[str]:
    flags = []
    for name, path in sorted(demo.adapters.items()):
        flags += ["--adapter", f"{name}={path}"]
    return flags


def ours_target(demo: DemoModel, with_adapters: bool) -> Target:
    command = [_python(), "-m", "server", "--base-model", str(demo.base_path)]
    command += _adapter_flags(demo) if with_adapters else []
    command += ["--served-model-name", BASE_NAME, "--host", "127.0.0.1", "--port", "{port}"]
    # float32 as every other system here computes: our default (auto) would take bfloat16 on a CPU
    # with bfloat16 matrix instructions (bench/README.md, "The CPU in bfloat16").
    command += ["--log-level", "warning", "--dtype", "float32"]
    models = tuple(sorted(demo.adapters)) if with_adapters else (BASE_NAME,)
    name = MIXED if with_adapters else BASE_ONLY
    # Our registry applies ChatMed's repetition_penalty 1.3 when a request leaves it out; every system
    # here runs without it so that the work per token is the same.
    return Target(ServerSpec(name, tuple(command)), models, {"repetition_penalty": 1.0})


def baseline_target(demo: DemoModel) -> Target:
    command = [_python(), "-m", "bench.baseline_server", "--base-model", str(demo.base_path)]
    command += [*_adapter_flags(demo), "--served-model-name", BASE_NAME, "--port", "{port}"]
    return Target(
        ServerSpec(BASELINE, tuple(command)),
        tuple(sorted(demo.adapters)),
        {"repetition_penalty": 1.0},
        note="(c) sends each answer whole at the end: its TTFT equals its end-to-end latency",
    )


def transformers_serve_target(
    demo: DemoModel, work_dir: Path, max_tokens: int, extra_args: Sequence[str] = ()
) -> Target | str:
    """The `transformers serve --continuous-batching` target, or the reason it cannot run here."""
    cli = Path(_python()).parent / "transformers"
    ok, output = command_available([str(cli), "serve", "--help"])
    if not ok:
        return f"`transformers serve --help` failed: {output.strip()[-300:]}"
    if "--continuous-batching" not in output:
        return "this transformers has no `serve --continuous-batching`"
    folder = templated_base(demo.base_path, work_dir / "tserve-base")
    command = [str(cli), "serve", str(folder), "--continuous-batching", "--device", "cpu"]
    command += ["--host", "127.0.0.1", "--port", "{port}", *extra_args]
    # It refuses unknown fields (ignore_eos, repetition_penalty) with 422, and its continuous batching
    # takes eos_token_id per request but sampling from the first request's generation config: a
    # generation_config with eos_token_id -1 (disabled) gives exactly max_tokens tokens, greedy.
    generation = {"max_new_tokens": max_tokens, "do_sample": False, "eos_token_id": -1}
    return Target(
        ServerSpec(TSERVE, tuple(command)),
        (str(folder),),
        {"generation_config": json.dumps(generation)},
        ignore_eos=False,
        note="(d) serves the bare base (it has no multi-LoRA); EOS disabled through generation_config",
    )


def templated_base(base: Path, folder: Path) -> Path:
    """A view of the base folder (symlinks) plus chat_template.jinja: `transformers serve` renders
    prompts with the tokenizer's own template, and the demo base ships none."""
    folder.mkdir(parents=True, exist_ok=True)
    for item in base.iterdir():
        link = folder / item.name
        if not link.exists():
            link.symlink_to(item.resolve())
    (folder / "chat_template.jinja").write_text(CHATMED_TEMPLATE, encoding="utf-8")
    return folder


def run_system(target: Target, args: argparse.Namespace, prompts: Sequence[str], work_dir: Path) -> SystemRun:
    """Start the server, run the load, stop it. A server that does not start is reported, not fatal."""
    run = SystemRun(target.spec.name, notes=[target.note] if target.note else [])
    log_path = work_dir / f"{target.spec.name}.log"
    try:
        with ServerProcess(target.spec, log_path, args.startup_timeout_s) as server:
            config = LoadConfig(
                base_url=server.base_url,
                models=target.models,
                prompts=tuple(prompts),
                num_requests=args.num_requests,
                max_tokens=args.max_tokens,
                concurrency=args.concurrency,
                ignore_eos=target.ignore_eos,
                temperature=0.0,
                top_p=1.0,
                seed=args.seed,
                extra_body=target.extra_body,
                timeout_s=args.timeout_s,
                warmup_requests=args.warmup,
                max_duration_s=args.max_duration_s or None,
                drain_timeout_s=args.drain_timeout_s,
            )
            before: list[float] = []  # CPU seconds at the start of the measured run, after the warm-up

            def mark_start() -> None:
                before.append(server.cpu_seconds())

            progress = stderr_progress(target.spec.name)
            run.result = asyncio.run(run_load(config, progress=progress, on_start=mark_start))
            run.server_cpu_s = server.cpu_seconds() - before[0]
    except (ServerStartError, RuntimeError) as exc:
        run.skipped = f"{type(exc).__name__}: {exc}".strip()
        logger.error("%s did not run; log: %s", target.spec.name, log_path)
    return run


def _targets(args: argparse.Namespace, demo: DemoModel, work_dir: Path) -> list[Target | SystemRun]:
    chosen = [name.strip() for name in args.systems.split(",") if name.strip()]
    unknown = set(chosen) - set(ALL_SYSTEMS)
    if unknown:
        raise SystemExit(f"unknown systems {sorted(unknown)}; choose from {', '.join(ALL_SYSTEMS)}")
    targets: list[Target | SystemRun] = []
    for name in chosen:
        if name in (MIXED, BASE_ONLY):
            targets.append(ours_target(demo, with_adapters=name == MIXED))
        elif name == BASELINE:
            targets.append(baseline_target(demo))
        else:
            extra = shlex.split(args.tserve_args)
            found = transformers_serve_target(demo, work_dir, args.max_tokens, extra)
            targets.append(found if isinstance(found, Target) else SystemRun(TSERVE, skipped=found))
    return targets


def results_table(runs: Sequence[SystemRun]) -> str:
    headers = ["system", "ok", "fail", "out tok/s", "tok/req", "req/s", "TTFT p50", "TTFT p99"]
    headers += ["TPOT p50", "E2E p50", "E2E p99", "srv CPU s", "tok/CPU-s"]
    rows: list[list[Cell]] = []
    for run in runs:
        r = run.result
        if r is None:
            rows.append([LABELS[run.system], *(["n/a"] * (len(headers) - 1))])
            continue
        rows.append(
            [
                LABELS[run.system],
                r.completed,
                r.failed,
                r.output_throughput,
                r.mean_output_tokens,
                r.request_throughput,
                r.ttft_ms.p50,
                r.ttft_ms.p99,
                r.tpot_ms.p50,
                r.e2e_ms.p50,
                r.e2e_ms.p99,
                run.server_cpu_s,
                run.tokens_per_cpu_s,
            ]
        )
    return format_table(headers, rows)


def ratios(runs: Sequence[SystemRun]) -> dict[str, dict[str, float]]:
    """Throughput ratios by wall time and by server CPU time (the latter resists a busy machine)."""
    by_name = {run.system: run for run in runs}

    def pair(a: str, b: str) -> dict[str, float]:
        if a not in by_name or b not in by_name:
            return {"wall": math.nan, "cpu": math.nan}
        x, y = by_name[a], by_name[b]
        return {
            "wall": ratio(x.throughput, y.throughput),
            "cpu": ratio(x.tokens_per_cpu_s, y.tokens_per_cpu_s),
        }

    return {
        "ours_mixed/baseline": pair(MIXED, BASELINE),
        "ours_mixed/transformers_serve": pair(MIXED, TSERVE),
        "ours_mixed/ours_base_only": pair(MIXED, BASE_ONLY),
    }


def report(runs: Sequence[SystemRun], args: argparse.Namespace) -> str:
    lines = [results_table(runs), ""]
    for name, values in ratios(runs).items():
        wall, cpu = format_ratio(values["wall"]), format_ratio(values["cpu"])
        lines.append(f"{name:32s} {wall:>8s} by out tok/s   {cpu:>8s} by tok/CPU-s")
    lines.append("")
    lines.append(
        f"{args.num_requests} requests, {args.concurrency} concurrent streaming clients, "
        f"{args.max_tokens} tokens each (EOS ignored), greedy; latencies in ms; "
        "srv CPU s = the server's user+system CPU seconds during the run"
    )
    for run in runs:
        lines += [f"note: {note}" for note in run.notes]
        if run.result is not None:
            lines += [f"{run.system} error x{count}: {msg}" for msg, count in run.result.errors.items()]
            if run.result.not_sent or run.result.cut:
                lines.append(
                    f"note: {run.system} ran out of time: of {args.num_requests} requests "
                    f"{run.result.not_sent} not sent, {run.result.cut} cut off in flight"
                )
            if run.result.completed and abs(run.result.mean_output_tokens - args.max_tokens) > 0.5:
                lines.append(f"warning: {run.system} did not give {args.max_tokens} tokens per request")
        if run.skipped:
            lines.append(f"{run.system} did not run: {run.skipped}")
    return "\n".join(lines)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA_DIR, help="folder of the ChatMed files")
    parser.add_argument("--num-requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--systems", default=",".join(ALL_SYSTEMS), help="comma-separated subset to run")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured requests per system")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=None, help="demo model cache")
    parser.add_argument("--work-dir", type=Path, default=None, help="server logs (default: a temp dir)")
    parser.add_argument("--startup-timeout-s", type=float, default=300.0)
    parser.add_argument("--timeout-s", type=float, default=1800.0, help="per request")
    parser.add_argument(
        "--max-duration-s",
        type=float,
        default=60.0,
        help="per system: send no request after this many seconds of load (0: no limit)",
    )
    parser.add_argument(
        "--drain-timeout-s",
        type=float,
        default=30.0,
        help="then give requests in flight this long before cutting them off",
    )
    parser.add_argument(
        "--tserve-args", default="", help="extra flags for transformers serve, e.g. '--cb-num-blocks 256'"
    )
    parser.add_argument("--json", type=Path, default=None, help="write results here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx2").setLevel(logging.WARNING)  # one line per request drowns the progress
    load_before = load_note()
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="chatmed-bench-"))
    demo = build_demo(DemoSpec.bench(), args.cache_dir)
    pairs = load_mixed_chatmed(args.data)
    # Consult/TCM questions alternate and so do the two adapters: each question meets its own adapter.
    assert pairs[1][1] == TCM_ADAPTER, "prompts must alternate Consult, TCM"
    prompts = [question for question, _ in pairs]
    runs: list[SystemRun] = []
    for target in _targets(args, demo, work_dir):
        runs.append(target if isinstance(target, SystemRun) else run_system(target, args, prompts, work_dir))
    print(report(runs, args))
    print(f"at start: {load_before}\nat end: {load_note()}")
    print(f"server logs: {work_dir}")
    if args.json is not None:
        write_json(args.json, _payload(args, runs))
    # Exit 1 when our own server failed; the other systems' failures are reported, not fatal.
    ours = [run for run in runs if run.system in (MIXED, BASE_ONLY)]
    return 0 if all(run.result is not None and run.result.failed == 0 for run in ours) else 1


def _payload(args: argparse.Namespace, runs: Sequence[SystemRun]) -> dict[str, Any]:
    return {
        "benchmark": "compare",
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "cpu_count": os.cpu_count(),
        "load_average_end": os.getloadavg()[0],
        "systems": {
            run.system: {
                "label": LABELS[run.system],
                "result": run.result.to_dict() if run.result else None,
                "server_cpu_s": run.server_cpu_s,
                "tokens_per_cpu_s": run.tokens_per_cpu_s,
                "skipped": run.skipped,
                "notes": run.notes,
            }
            for run in runs
        },
        "ratios": ratios(runs),
    }


if __name__ == "__main__":
    raise SystemExit(main())
