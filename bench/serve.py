"""An OpenAI-HTTP load generator for any OpenAI-compatible server (ours, vLLM, `transformers serve`).

    python -m bench.serve --base-url http://127.0.0.1:8000/v1 --models chatmed-consult,chatmed-tcm \\
        --dataset ../shared/data/chatmed/ChatMed-Consult_test.json \\
        --dataset ../shared/data/chatmed/ShenNong-TCM_test.jsonl \\
        --num-requests 64 --concurrency 16 --max-tokens 128 --ignore-eos --json results.json

Streams chat completions, assigns models round-robin, limits concurrency or sends at a Poisson rate,
and reports request/s, output tokens/s, TTFT, TPOT, ITL and end-to-end latency (mean, p50, p99).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2

from bench.prompts import cycle_to, load_dataset_files, random_questions
from bench.report import format_table, write_json
from bench.stats import Summary, summarize
from bench.stream_client import RequestRecord, stream_chat

ProgressFn = Callable[[int, int, int], None]  # (done, total, failed)
WARMUP_MAX_TOKENS = 16


@dataclass(frozen=True)
class LoadConfig:
    """One load run. `prompts` are bare questions, cycled when fewer than num_requests.

    concurrency None means no limit; request_rate inf sends everything at once (then the
    concurrency limit paces the run), a finite rate draws Poisson arrivals from `seed`.
    max_duration_s bounds a run on a slow server: no request is sent after it and the unsent ones
    are reported as `not_sent`; requests in flight then get drain_timeout_s (None: as long as they
    need) before they are cancelled and reported as `cut`.
    """

    base_url: str
    models: tuple[str, ...]
    prompts: tuple[str, ...]
    num_requests: int
    max_tokens: int = 128
    concurrency: int | None = 16
    request_rate: float = math.inf
    ignore_eos: bool = True
    temperature: float | None = 0.0
    top_p: float | None = None
    seed: int = 0
    extra_body: dict[str, Any] = field(default_factory=dict)
    include_usage: bool = True
    api_key: str | None = None
    timeout_s: float = 600.0
    warmup_requests: int = 0
    max_duration_s: float | None = None
    drain_timeout_s: float | None = None

    def __post_init__(self) -> None:
        if self.num_requests < 1:
            raise ValueError("num_requests must be at least 1")
        if not self.models:
            raise ValueError("at least one model name is needed")
        if not self.prompts:
            raise ValueError("at least one prompt is needed")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if not self.request_rate > 0:
            raise ValueError("request_rate must be positive")
        if self.max_duration_s is not None and not self.max_duration_s > 0:
            raise ValueError("max_duration_s must be positive")
        if self.drain_timeout_s is not None and not self.drain_timeout_s >= 0:
            raise ValueError("drain_timeout_s must be >= 0")

    @property
    def chat_url(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"


@dataclass
class LoadResult:
    """What a run measured. Latencies in milliseconds; throughputs per second of wall time."""

    completed: int
    failed: int
    not_sent: int
    cut: int
    duration_s: float
    total_output_tokens: int
    request_throughput: float
    output_throughput: float
    ttft_ms: Summary
    tpot_ms: Summary
    itl_ms: Summary
    e2e_ms: Summary
    mean_output_tokens: float
    errors: dict[str, int]
    records: list[RequestRecord] = field(default_factory=list, repr=False)

    def to_dict(self, with_records: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "completed": self.completed,
            "failed": self.failed,
            "not_sent": self.not_sent,
            "cut": self.cut,
            "duration_s": self.duration_s,
            "total_output_tokens": self.total_output_tokens,
            "request_throughput": self.request_throughput,
            "output_throughput": self.output_throughput,
            "mean_output_tokens": self.mean_output_tokens,
            "ttft_ms": self.ttft_ms.to_dict(),
            "tpot_ms": self.tpot_ms.to_dict(),
            "itl_ms": self.itl_ms.to_dict(),
            "e2e_ms": self.e2e_ms.to_dict(),
            "errors": self.errors,
        }
        if with_records:
            out["records"] = [_record_dict(record) for record in self.records]
        return out


def build_body(config: LoadConfig, index: int) -> dict[str, Any]:
    """The request body of request `index`: model round-robin, prompt `index` (cycled)."""
    body: dict[str, Any] = {
        "model": config.models[index % len(config.models)],
        "messages": [{"role": "user", "content": config.prompts[index % len(config.prompts)]}],
        "max_tokens": config.max_tokens,
        "stream": True,
    }
    if config.include_usage:
        body["stream_options"] = {"include_usage": True}
    if config.temperature is not None:
        body["temperature"] = config.temperature
        if config.temperature > 0:
            body["seed"] = config.seed + index  # sampled runs stay reproducible request by request
    if config.top_p is not None:
        body["top_p"] = config.top_p
    if config.ignore_eos:
        # vLLM's extension (also ours): generate exactly max_tokens so every server does equal work.
        body["ignore_eos"] = True
    body.update(config.extra_body)
    return body


def summarize_records(records: Sequence[RequestRecord], duration_s: float, not_sent: int = 0) -> LoadResult:
    """Turn per-request records into the run's figures; failures are counted and their messages tallied.

    Output throughput counts every token received: all of a completed request's, and the content deltas
    a request cut off at the end of a bounded run had streamed (a server that sends the answer whole
    loses the request it was working on, at most max_tokens). Latencies and tok/req are of completed
    requests only.
    """
    done = [record for record in records if record.ok]
    cut = [record for record in records if record.cut]
    failed = [record for record in records if not record.ok and not record.cut]
    done_tokens = sum(record.output_tokens for record in done)
    total_tokens = done_tokens + sum(record.num_content_chunks for record in cut)
    ms = 1000.0
    return LoadResult(
        completed=len(done),
        failed=len(failed),
        not_sent=not_sent,
        cut=len(cut),
        duration_s=duration_s,
        total_output_tokens=total_tokens,
        request_throughput=len(done) / duration_s if duration_s > 0 else math.nan,
        output_throughput=total_tokens / duration_s if duration_s > 0 else math.nan,
        ttft_ms=summarize([r.ttft_s * ms for r in done if r.ttft_s is not None]),
        tpot_ms=summarize([r.tpot_s * ms for r in done if r.tpot_s is not None]),
        itl_ms=summarize([gap * ms for r in done for gap in r.inter_chunk_s()]),
        e2e_ms=summarize([r.e2e_s * ms for r in done if r.e2e_s is not None]),
        mean_output_tokens=done_tokens / len(done) if done else math.nan,
        errors=dict(Counter(record.error or "unknown" for record in failed)),
        records=list(records),
    )


async def run_load(
    config: LoadConfig,
    progress: ProgressFn | None = None,
    transport: httpx2.AsyncBaseTransport | None = None,
    on_start: Callable[[], None] | None = None,
) -> LoadResult:
    """Run the load and summarise it. `transport` lets tests drive an in-process ASGI app;
    `on_start` is called after the warm-up, when the measured run begins."""
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else None
    pool = config.concurrency or config.num_requests
    limits = httpx2.Limits(max_connections=pool + 1, max_keepalive_connections=pool + 1)
    timeout = httpx2.Timeout(config.timeout_s, connect=min(config.timeout_s, 30.0))
    async with httpx2.AsyncClient(limits=limits, timeout=timeout, transport=transport) as client:
        await _warm_up(client, config, headers)
        if on_start is not None:
            on_start()
        start = time.monotonic()
        sent = await _Dispatch(client, config, headers, progress).run()
        duration = time.monotonic() - start
    records = [record for record in sent if record is not None]
    return summarize_records(records, duration, not_sent=len(sent) - len(records))


async def _warm_up(client: httpx2.AsyncClient, config: LoadConfig, headers: dict[str, str] | None) -> None:
    # Warm-up requests use the same bodies as the run, so lazy server set-up (a first-request
    # initialisation, allocator growth) is paid before the clock starts. Their figures are dropped.
    for index in range(config.warmup_requests):
        body = build_body(config, index)
        body["max_tokens"] = min(config.max_tokens, WARMUP_MAX_TOKENS)  # set-up, not throughput
        record = RequestRecord(index, body["model"])
        await stream_chat(client, config.chat_url, body, record, headers)
        if not record.ok:
            raise RuntimeError(f"warm-up request failed: {record.error}")


class _Dispatch:
    """One run's sending: pacing, the concurrency limit, the deadline and the cut-off after it."""

    def __init__(
        self,
        client: httpx2.AsyncClient,
        config: LoadConfig,
        headers: dict[str, str] | None,
        progress: ProgressFn | None,
    ) -> None:
        self.client = client
        self.config = config
        self.headers = headers
        self.progress = progress
        self.limit = asyncio.Semaphore(config.concurrency or config.num_requests)
        self.records: dict[int, RequestRecord] = {}
        self.num_done = 0
        self.num_failed = 0
        duration = math.inf if config.max_duration_s is None else config.max_duration_s
        self.deadline = time.monotonic() + duration
        drain = math.inf if config.drain_timeout_s is None else config.drain_timeout_s
        self.cutoff = self.deadline + drain

    async def run(self) -> list[RequestRecord | None]:
        """Per request index its record, or None when it was never sent (the deadline had passed)."""
        rng = random.Random(self.config.seed)
        tasks: list[asyncio.Task[None]] = []
        for index in range(self.config.num_requests):
            if index > 0 and math.isfinite(self.config.request_rate):
                gap_s = rng.expovariate(self.config.request_rate)
                await asyncio.sleep(max(min(gap_s, self.deadline - time.monotonic()), 0.0))
            tasks.append(asyncio.create_task(self._one(index)))
        timeout = None if math.isinf(self.cutoff) else max(self.cutoff - time.monotonic(), 0.0)
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for record in self.records.values():
            # Cancelled mid-stream at the cut-off: neither completed nor failed.
            record.cut = not record.ok and record.error is None
        if self.progress is not None and pending:
            self.progress(self.config.num_requests, self.config.num_requests, self.num_failed)
        return [self.records.get(index) for index in range(self.config.num_requests)]

    async def _one(self, index: int) -> None:
        body = build_body(self.config, index)
        async with self.limit:
            if time.monotonic() <= self.deadline:
                record = self.records[index] = RequestRecord(index, body["model"])
                await stream_chat(self.client, self.config.chat_url, body, record, self.headers)
                self.num_failed += 0 if record.ok else 1
        self.num_done += 1
        if self.progress is not None:
            self.progress(self.num_done, self.config.num_requests, self.num_failed)


def _record_dict(record: RequestRecord) -> dict[str, Any]:
    return {
        "index": record.index,
        "model": record.model,
        "ok": record.ok,
        "error": record.error,
        "output_tokens": record.output_tokens,
        "prompt_tokens": record.prompt_tokens,
        "finish_reason": record.finish_reason,
        "ttft_s": record.ttft_s,
        "tpot_s": record.tpot_s,
        "e2e_s": record.e2e_s,
    }


def result_rows(name: str, result: LoadResult) -> list[Any]:
    """One table row per run, in the order of RESULT_HEADERS."""
    return [
        name,
        result.completed,
        result.failed,
        result.request_throughput,
        result.output_throughput,
        result.mean_output_tokens,
        result.ttft_ms.mean,
        result.ttft_ms.p50,
        result.ttft_ms.p99,
        result.tpot_ms.mean,
        result.tpot_ms.p50,
        result.tpot_ms.p99,
        result.itl_ms.p50,
        result.itl_ms.p99,
        result.e2e_ms.mean,
        result.e2e_ms.p50,
        result.e2e_ms.p99,
    ]


RESULT_HEADERS = (
    "run",
    "ok",
    "fail",
    "req/s",
    "out tok/s",
    "tok/req",
    "TTFT mean",
    "TTFT p50",
    "TTFT p99",
    "TPOT mean",
    "TPOT p50",
    "TPOT p99",
    "ITL p50",
    "ITL p99",
    "E2E mean",
    "E2E p50",
    "E2E p99",
)


def stderr_progress(label: str) -> ProgressFn:
    """A progress callback that rewrites one stderr line (figures go to stdout, progress to stderr)."""

    def report(done: int, total: int, failed: int) -> None:
        end = "\n" if done == total else ""
        sys.stderr.write(f"\r[{label}] {done}/{total} done, {failed} failed{end}")
        sys.stderr.flush()

    return report


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--models", required=True, help="comma-separated model names, used round-robin")
    parser.add_argument("--dataset", type=Path, action="append", default=[], help="JSONL with `query`")
    parser.add_argument("--random-input-chars", type=int, default=64, help="random prompt length")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16, help="max requests in flight; 0: no limit")
    parser.add_argument("--request-rate", type=float, default=math.inf, help="Poisson rate, requests/s")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--extra-body", type=json.loads, default={}, help="JSON merged into each body")
    parser.add_argument("--no-usage", action="store_true", help="do not ask for the usage chunk")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--timeout-s", type=float, default=600.0)
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured requests before the run")
    parser.add_argument("--max-duration-s", type=float, default=None, help="send nothing after this")
    parser.add_argument(
        "--drain-timeout-s", type=float, default=None, help="after max-duration-s, cancel what still runs"
    )
    parser.add_argument("--json", type=Path, default=None, help="write results here")
    parser.add_argument("--save-records", action="store_true", help="per-request records in the JSON")
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> LoadConfig:
    if args.dataset:
        prompts = load_dataset_files(args.dataset)
    else:
        prompts = random_questions(args.num_requests, args.random_input_chars, args.seed)
    if not isinstance(args.extra_body, dict):
        raise SystemExit("--extra-body must be a JSON object")
    return LoadConfig(
        base_url=args.base_url,
        models=tuple(name.strip() for name in args.models.split(",") if name.strip()),
        prompts=tuple(cycle_to(prompts, args.num_requests)),
        num_requests=args.num_requests,
        max_tokens=args.max_tokens,
        concurrency=args.concurrency or None,
        request_rate=args.request_rate,
        ignore_eos=args.ignore_eos,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        extra_body=args.extra_body,
        include_usage=not args.no_usage,
        api_key=args.api_key,
        timeout_s=args.timeout_s,
        warmup_requests=args.warmup,
        max_duration_s=args.max_duration_s,
        drain_timeout_s=args.drain_timeout_s,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    config = config_from_args(args)
    result = asyncio.run(run_load(config, progress=stderr_progress("serve")))
    print(format_table(RESULT_HEADERS, [result_rows(args.base_url, result)]))
    print("latencies in ms; TPOT = (e2e - TTFT) / (tokens - 1), n/a when a server sends one chunk")
    for message, count in result.errors.items():
        print(f"error x{count}: {message}")
    if result.not_sent or result.cut:
        print(f"{result.not_sent} requests not sent and {result.cut} cut: --max-duration-s ran out")
    if args.json is not None:
        payload = {"config": _config_dict(config), "result": result.to_dict(args.save_records)}
        write_json(args.json, payload)
    return 0 if result.failed == 0 else 1


def _config_dict(config: LoadConfig) -> dict[str, Any]:
    return {
        "base_url": config.base_url,
        "models": list(config.models),
        "num_requests": config.num_requests,
        "max_tokens": config.max_tokens,
        "concurrency": config.concurrency,
        "request_rate": None if math.isinf(config.request_rate) else config.request_rate,
        "ignore_eos": config.ignore_eos,
        "temperature": config.temperature,
        "top_p": config.top_p,
        "seed": config.seed,
        "extra_body": config.extra_body,
        "warmup_requests": config.warmup_requests,
        "max_duration_s": config.max_duration_s,
        "drain_timeout_s": config.drain_timeout_s,
    }


if __name__ == "__main__":
    raise SystemExit(main())
