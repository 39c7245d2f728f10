"""Smoke tests of the benchmark tools: the statistics on known inputs, the SSE parser, and the load
generator driving a real server (the baseline on the tiny demo) and an in-process streaming app.

No figure here is timed: the benchmarks print speeds, the tests check that what they count is right.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx2
import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from bench.baseline_server import (
    BadRequest,
    BaselineHTTPServer,
    BaselineService,
    parse_chat_request,
)
from bench.hf_baseline import PeftGenerator
from bench.prompts import (
    CONSULT_ADAPTER,
    TCM_ADAPTER,
    interleave,
    load_mixed_chatmed,
    load_questions,
    random_questions,
    strip_chatmed_template,
)
from bench.report import format_table, load_note
from bench.serve import LoadConfig, build_body, run_load, summarize_records
from bench.stats import percentile, ratio, summarize
from bench.stream_client import RequestRecord, SSEParser
from engine import CHATMED_TEMPLATE, Tokenizer
from engine.demo import DemoModel
from tests.conftest import DATA_DIR

# ---- statistics -------------------------------------------------------------------------------------


def test_percentile_interpolates_between_ranks() -> None:
    values = [4.0, 1.0, 3.0, 2.0]  # unsorted on purpose
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile(values, 50) == pytest.approx(2.5)
    assert percentile(values, 99) == pytest.approx(3.97)
    assert percentile(list(range(1, 101)), 90) == pytest.approx(90.1)
    assert percentile([7.0], 99) == 7.0


def test_percentile_edge_cases() -> None:
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_summarize_and_ratio() -> None:
    summary = summarize([10.0, 20.0, 30.0, 40.0, 100.0])
    assert summary.mean == pytest.approx(40.0)
    assert summary.p50 == pytest.approx(30.0)
    assert summary.p99 == pytest.approx(97.6)
    assert summary.count == 5
    empty = summarize([])
    assert empty.count == 0 and math.isnan(empty.mean) and math.isnan(empty.p99)
    assert ratio(30.0, 3.0) == pytest.approx(10.0)
    assert math.isnan(ratio(1.0, 0.0)) and math.isnan(ratio(math.nan, 1.0))


def test_format_table_aligns_and_marks_missing() -> None:
    table = format_table(["run", "tok/s"], [["ours", 123.456], ["other", math.nan]]).splitlines()
    assert table[0].split() == ["run", "tok/s"]
    assert table[2].split() == ["ours", "123.5"]
    assert table[3].split() == ["other", "n/a"]
    assert len({len(line) for line in table[:3]}) == 1
    assert load_note().startswith("load average ")


# ---- prompts ----------------------------------------------------------------------------------------


def test_strip_chatmed_template() -> None:
    assert strip_chatmed_template("<s>问：\n头痛怎么办？\n答：\n") == "头痛怎么办？"
    assert strip_chatmed_template("问：\n多行\n问题\n答：\n") == "多行\n问题"
    assert strip_chatmed_template("plain text") == "plain text"


def test_load_questions_and_interleave(tmp_path: Path) -> None:
    path = tmp_path / "q.jsonl"
    lines = [json.dumps({"query": f"<s>问：\nq{i}\n答：\n", "response": "r"}) for i in range(3)]
    path.write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    assert load_questions(path) == ["q0", "q1", "q2"]
    assert interleave([["a0", "a1", "a2"], ["b0", "b1"]]) == ["a0", "b0", "a1", "b1"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1"):
        load_questions(bad)
    assert random_questions(2, 5, seed=1) == random_questions(2, 5, seed=1)
    assert all(len(q) == 5 for q in random_questions(3, 5, seed=2))


@pytest.mark.skipif(not DATA_DIR.is_dir(), reason="ChatMed data files not present")
def test_real_prompts_alternate_adapters() -> None:
    pairs = load_mixed_chatmed(DATA_DIR)
    assert len(pairs) == 2 * 201  # the TCM file has 201 questions, the shorter of the two
    assert [adapter for _, adapter in pairs[:4]] == [CONSULT_ADAPTER, TCM_ADAPTER] * 2
    assert not any(q.startswith("<s>") or q.endswith("答：\n") for q, _ in pairs)


# ---- SSE parsing ------------------------------------------------------------------------------------

_STREAM = (
    ": keep-alive comment\r\n\r\n"
    'data: {"choices":[{"delta":{"content":"你好"}}]}\r\n\r\n'
    "event: message\r\ndata: line one\r\ndata: line two\n\n"
    'data: {"choices":[{"delta":{"content":"！"}}]}\r\r'
    "data: [DONE]"  # the last event has no blank line: close() must flush it
).encode()


def _parse_in_pieces(size: int) -> list[str]:
    parser = SSEParser()
    events = []
    for start in range(0, len(_STREAM), size):
        events += parser.feed(_STREAM[start : start + size])
    events += parser.close()
    return [event.data for event in events]


@pytest.mark.parametrize("size", [1, 2, 3, 7, len(_STREAM)])
def test_sse_parser_handles_any_split(size: int) -> None:
    # Splits of 1-3 bytes cut UTF-8 characters and CRLF pairs in half.
    assert _parse_in_pieces(size) == [
        '{"choices":[{"delta":{"content":"你好"}}]}',
        "line one\nline two",
        '{"choices":[{"delta":{"content":"！"}}]}',
        "[DONE]",
    ]


# ---- figures from records ---------------------------------------------------------------------------


def _record(index: int, sent: float, chunk_times: list[float], usage: int | None) -> RequestRecord:
    record = RequestRecord(index, "m", sent_s=sent, ok=True)
    record.first_token_s = chunk_times[0]
    record.content_times_s = chunk_times
    record.num_content_chunks = len(chunk_times)
    record.done_s = chunk_times[-1]
    record.usage_output_tokens = usage
    return record


def test_summarize_records_known_timings() -> None:
    a = _record(0, 0.0, [0.5, 0.6, 0.7, 0.8, 0.9], usage=5)  # TTFT 500 ms, TPOT 100 ms
    b = _record(1, 1.0, [1.2, 1.5, 1.8], usage=None)  # 3 deltas counted: TTFT 200 ms, TPOT 300 ms
    failed = RequestRecord(2, "m", ok=False, error="HTTP 500: boom")
    result = summarize_records([a, b, failed], duration_s=2.0)
    assert (result.completed, result.failed) == (2, 1)
    assert result.total_output_tokens == 8
    assert result.output_throughput == pytest.approx(4.0)
    assert result.request_throughput == pytest.approx(1.0)
    assert result.ttft_ms.mean == pytest.approx(350.0)
    assert result.tpot_ms.mean == pytest.approx(200.0)
    assert result.e2e_ms.p50 == pytest.approx(850.0)
    assert result.itl_ms.count == 4 + 2
    assert result.itl_ms.p50 == pytest.approx(100.0)
    assert result.errors == {"HTTP 500: boom": 1}


def test_build_body_round_robin_and_extras() -> None:
    config = LoadConfig(
        base_url="http://127.0.0.1:1/v1",
        models=("a", "b"),
        prompts=("p0", "p1", "p2"),
        num_requests=4,
        max_tokens=9,
        extra_body={"repetition_penalty": 1.0},
    )
    bodies = [build_body(config, i) for i in range(4)]
    assert [body["model"] for body in bodies] == ["a", "b", "a", "b"]
    assert [body["messages"][0]["content"] for body in bodies] == ["p0", "p1", "p2", "p0"]
    assert bodies[0]["ignore_eos"] is True and bodies[0]["max_tokens"] == 9
    assert bodies[0]["stream"] is True and bodies[0]["stream_options"] == {"include_usage": True}
    assert bodies[0]["repetition_penalty"] == 1.0 and "seed" not in bodies[0]


# ---- the load generator against real servers ---------------------------------------------------------


@pytest.fixture(scope="module")
def baseline_url(demo: DemoModel) -> Iterator[str]:
    """The baseline server on the tiny demo, in a thread on a free 127.0.0.1 port."""
    generator = PeftGenerator(demo.base_path, sorted(demo.adapters.items()))
    server = BaselineHTTPServer(("127.0.0.1", 0), BaselineService(generator))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


async def test_load_against_baseline_server(baseline_url: str) -> None:
    config = LoadConfig(
        base_url=baseline_url,
        models=(CONSULT_ADAPTER, TCM_ADAPTER),
        prompts=("头痛怎么办？", "腹痛属于什么证候？"),
        num_requests=4,
        max_tokens=8,
        concurrency=2,
        warmup_requests=1,
    )
    result = await run_load(config)
    assert (result.completed, result.failed) == (4, 0), result.errors
    assert [r.model for r in result.records] == [CONSULT_ADAPTER, TCM_ADAPTER] * 2
    # ignore_eos makes the baseline generate exactly max_tokens tokens, reported in the usage chunk.
    assert all(r.usage_output_tokens == 8 for r in result.records)
    assert result.total_output_tokens == 32
    assert all(r.finish_reason == "length" for r in result.records)
    # The whole answer comes as one chunk: no per-token time can be measured.
    assert all(r.num_content_chunks == 1 and r.tpot_s is None for r in result.records)
    assert result.tpot_ms.count == 0 and result.ttft_ms.count == 4
    assert all(r.ttft_s is not None and r.e2e_s is not None and r.ttft_s <= r.e2e_s for r in result.records)


async def test_load_counts_failures(baseline_url: str) -> None:
    config = LoadConfig(
        base_url=baseline_url, models=("no-such-model",), prompts=("q",), num_requests=3, max_tokens=4
    )
    result = await run_load(config)
    assert (result.completed, result.failed) == (0, 3)
    assert result.errors == {"HTTP 404: unknown model": 3}
    assert math.isnan(result.output_throughput) or result.output_throughput == 0.0


def test_baseline_prompt_matches_engine_tokenizer(demo: DemoModel) -> None:
    generator = PeftGenerator(demo.base_path)
    messages = [{"role": "user", "content": "头痛怎么办？"}]
    ids = generator.chatmed_prompt_ids(messages)
    assert ids == Tokenizer(demo.base_path).encode_chat(messages, CHATMED_TEMPLATE)
    assert ids.count(generator.tokenizer.bos_token_id) == 1


def test_baseline_request_parsing() -> None:
    request = parse_chat_request(
        {
            "model": "m",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "q"}]}],
            "max_tokens": 5,
            "ignore_eos": True,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    assert request.messages == [{"role": "user", "content": "q"}]
    assert request.options.max_new_tokens == request.options.min_new_tokens == 5
    assert request.options.temperature == 0 and request.stream and request.include_usage
    defaults = parse_chat_request({"model": "m", "messages": [{"role": "user", "content": "q"}]})
    assert defaults.options.repetition_penalty == pytest.approx(1.3)  # ChatMed's own default
    bad_fields: list[dict[str, object]] = [
        {"messages": []},
        {"messages": [{"role": "tool", "content": "x"}]},
        {"max_tokens": "9"},
        {"max_tokens": 0},
    ]
    for body in bad_fields:
        with pytest.raises(BadRequest):
            parse_chat_request({"model": "m", "messages": [{"role": "user", "content": "q"}], **body})


def _streaming_app(num_chunks: int, send_usage: bool) -> FastAPI:
    """A stand-in OpenAI server that streams `num_chunks` one-character deltas."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat() -> StreamingResponse:
        async def frames() -> AsyncIterator[str]:
            for i in range(num_chunks):
                yield f"data: {json.dumps({'choices': [{'delta': {'content': str(i)}, 'index': 0}]})}\n\n"
            finish = {"choices": [{"delta": {}, "index": 0, "finish_reason": "length"}]}
            yield f"data: {json.dumps(finish)}\n\n"
            if send_usage:
                usage = {"prompt_tokens": 3, "completion_tokens": 2 * num_chunks}
                yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(frames(), media_type="text/event-stream")

    return app


@pytest.mark.parametrize("send_usage", [True, False])
async def test_token_count_prefers_usage_chunk(send_usage: bool) -> None:
    transport = httpx2.ASGITransport(app=_streaming_app(num_chunks=5, send_usage=send_usage))
    config = LoadConfig(base_url="http://bench.test/v1", models=("m",), prompts=("q",), num_requests=2)
    result = await run_load(config, transport=transport)
    assert (result.completed, result.failed) == (2, 0), result.errors
    expected = 10 if send_usage else 5  # usage says 2 tokens per chunk; without it, deltas are counted
    assert all(r.output_tokens == expected and r.num_content_chunks == 5 for r in result.records)
    assert result.itl_ms.count == 2 * 4


async def test_requests_after_max_duration_are_not_sent() -> None:
    transport = httpx2.ASGITransport(app=_streaming_app(num_chunks=2, send_usage=True))
    config = LoadConfig(
        base_url="http://bench.test/v1", models=("m",), prompts=("q",), num_requests=3, max_duration_s=1e-9
    )
    result = await run_load(config, transport=transport)
    assert (result.completed, result.failed, result.not_sent) == (0, 0, 3)
    assert result.total_output_tokens == 0
    with pytest.raises(ValueError):
        LoadConfig(base_url="x", models=("m",), prompts=("q",), num_requests=1, max_duration_s=0)


class _StallingHandler(BaseHTTPRequestHandler):
    """Streams two content deltas, then stalls until the test releases it (a server that hangs)."""

    release: threading.Event

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        for i in range(2):
            delta = {"choices": [{"delta": {"content": str(i)}, "index": 0}]}
            self.wfile.write(f"data: {json.dumps(delta)}\n\n".encode())
            self.wfile.flush()
        self.release.wait(timeout=30)

    def log_message(self, format: str, *args: object) -> None:
        pass


async def test_bounded_run_cuts_requests_in_flight() -> None:
    release = threading.Event()
    handler = type("Handler", (_StallingHandler,), {"release": release})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        config = LoadConfig(
            base_url=f"http://127.0.0.1:{server.server_address[1]}/v1",
            models=("m",),
            prompts=("q",),
            num_requests=3,
            concurrency=2,
            max_duration_s=1.0,
            drain_timeout_s=0.0,
        )
        result = await run_load(config)
    finally:
        release.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    # Two requests stalled mid-stream and were cut; the third waited for a slot past the deadline.
    assert (result.completed, result.failed, result.cut, result.not_sent) == (0, 0, 2, 1)
    assert result.total_output_tokens == 4  # the deltas the cut requests had streamed still count
    assert math.isnan(result.mean_output_tokens) and result.e2e_ms.count == 0


def test_http_cost_counts_frames_and_cpu(demo: DemoModel, tmp_path: Path) -> None:
    from bench.http_cost import main

    out = tmp_path / "http.json"
    cache = demo.base_path.parent.parent
    argv = ["--streams", "3", "--tokens", "8", "--rounds", "1", "--cache-dir", str(cache), "--json", str(out)]
    assert main(argv) == 0
    runs = {run["way"]: run for run in json.loads(out.read_text(encoding="utf-8"))["runs"]}
    # Keeping up: the role chunk, one chunk per token, the finish chunk and [DONE] per stream.
    assert runs["keeps up"]["frames"] == 3 * (8 + 3)
    # Four steps behind: the eight tokens go out in two joined chunks (the last with the finish).
    assert runs["falls behind"]["frames"] == 3 * (2 + 3)
    assert all(run["tokens"] == 24 and run["cpu_s"] > 0 for run in runs.values())


# ---- the benchmark commands end to end (slow: the ~20M bench model, real subprocess servers) ----------


@pytest.mark.slow
@pytest.mark.skipif(not DATA_DIR.is_dir(), reason="ChatMed data files not present")
def test_engine_benchmark_runs(tmp_path: Path) -> None:
    from bench.engine import main

    out = tmp_path / "engine.json"
    argv = ["--data", str(DATA_DIR), "--num-requests", "4", "--num-serial-requests", "2"]
    argv += ["--max-tokens", "8", "--concurrency", "1,4", "--json", str(out)]
    assert main(argv) == 0
    payload = json.loads(out.read_text(encoding="utf-8"))
    assert [run["concurrency"] for run in payload["ours"]] == [1, 4]
    assert [run["output_tokens"] for run in payload["ours"]] == [16, 32]
    assert payload["baseline"]["output_tokens"] == 16
    assert set(payload["ratios_vs_baseline"]) == {"1", "4"}


@pytest.mark.slow
@pytest.mark.skipif(not DATA_DIR.is_dir(), reason="ChatMed data files not present")
def test_compare_runs_ours_and_baseline(tmp_path: Path) -> None:
    from bench.compare import main

    out = tmp_path / "compare.json"
    argv = ["--data", str(DATA_DIR), "--systems", "ours-mixed,baseline", "--num-requests", "4"]
    argv += ["--concurrency", "2", "--max-tokens", "8", "--warmup", "1", "--work-dir", str(tmp_path)]
    assert main([*argv, "--json", str(out)]) == 0
    payload = json.loads(out.read_text(encoding="utf-8"))
    for name in ("ours-mixed", "baseline"):
        result = payload["systems"][name]["result"]
        assert (result["completed"], result["failed"]) == (4, 0)
        assert result["total_output_tokens"] == 32
    assert payload["ratios"]["ours_mixed/baseline"]["wall"] > 0
