"""What GET /metrics reports, in Prometheus' text format, under vLLM's names where one applies, so that
existing vLLM dashboards and LoRA-aware routers read this server unchanged.

Labels carry only the served base model's name, finish reasons, route templates, status codes and
adapter names: never prompt text, user ids or request ids. Everything here lives on the event loop
(one ServerMetrics per app, on `app.state.metrics`); the engine's own counters are read at scrape time.
"""

from __future__ import annotations

import bisect
import logging
import math
import time
from collections.abc import Iterable, Sequence

from engine import AsyncEngine, EngineStats, RequestOutput
from engine.errors import EngineDead, EngineError, QueueFull
from server.errors import BodyTooLarge, ServerDraining
from server.limits import Admission

logger = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's buckets, so that its dashboards' quantile panels keep their resolution.
TTFT_BUCKETS_S: tuple[float, ...] = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75)
TTFT_BUCKETS_S += (1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS_S: tuple[float, ...] = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0)
ITL_BUCKETS_S += (2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS_S: tuple[float, ...] = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0)
E2E_BUCKETS_S += (50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
FINISH_REASONS = ("stop", "length", "abort")
_STATS_TRIES = 3


class Histogram:
    """A Prometheus histogram: cumulative buckets, sum and count."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        if not math.isfinite(value):
            return
        value = max(value, 0.0)
        index = bisect.bisect_left(self.buckets, value)  # the first bucket with value <= le
        if index < len(self.buckets):
            self.counts[index] += 1
        self.sum += value
        self.count += 1

    def samples(self, name: str, labels: dict[str, str]) -> Iterable[str]:
        total = 0
        for le, count in zip(self.buckets, self.counts, strict=True):
            total += count
            yield _sample(f"{name}_bucket", {**labels, "le": _number(le)}, total)
        yield _sample(f"{name}_bucket", {**labels, "le": "+Inf"}, self.count)
        yield _sample(f"{name}_sum", labels, self.sum)
        yield _sample(f"{name}_count", labels, self.count)


def refusal_reason(error: EngineError) -> str:
    """The `reason` label of a request refused at the door."""
    if isinstance(error, QueueFull):
        return "queue_full"
    if isinstance(error, ServerDraining):
        return "draining"
    if isinstance(error, EngineDead):
        return "engine_dead"
    if isinstance(error, BodyTooLarge):
        return "body_too_large"
    return "invalid"


class ServerMetrics:
    """Counters and histograms of one server, and their rendering for a scrape."""

    def __init__(self, engine: AsyncEngine, admission: Admission, model_name: str) -> None:
        self.engine = engine
        self.admission = admission
        self.model_name = model_name
        self.ttft = Histogram(TTFT_BUCKETS_S)
        self.itl = Histogram(ITL_BUCKETS_S)
        self.e2e = Histogram(E2E_BUCKETS_S)
        self.finished: dict[str, int] = dict.fromkeys(FINISH_REASONS, 0)
        self.refused: dict[str, int] = {}
        self.responses: dict[tuple[str, int], int] = {}
        self.num_stream_errors = 0
        self._last_stats: EngineStats | None = None

    # ---- recording ---------------------------------------------------------------------------------
    def count_refusal(self, error: EngineError) -> None:
        reason = refusal_reason(error)
        self.refused[reason] = self.refused.get(reason, 0) + 1

    def count_response(self, route: str, status: int) -> None:
        self.responses[(route, status)] = self.responses.get((route, status), 0) + 1

    def count_finish(self, reason: str) -> None:
        if reason in self.finished:  # a fixed set of label values, whatever a caller passes
            self.finished[reason] += 1

    def observe_finished(self, output: RequestOutput) -> None:
        """A choice's last output: its finish reason and, from the engine's clock, TTFT and e2e."""
        self.count_finish(str(output.finish_reason))
        m = output.metrics
        if m is None or m.finished_s is None:
            return
        if m.first_token_s is not None:
            self.ttft.observe(m.first_token_s - m.arrival_s)
        self.e2e.observe(m.finished_s - m.arrival_s)

    # ---- a scrape ------------------------------------------------------------------------------------
    def engine_stats(self) -> EngineStats | None:
        """The engine's stats, read from the event loop while the engine thread runs: a read that meets
        a queue being changed is tried again, and the last good one stands in if all tries fail."""
        for _ in range(_STATS_TRIES):
            try:
                self._last_stats = self.engine.stats()
                break
            except RuntimeError:  # "deque mutated during iteration"
                continue
        return self._last_stats

    def render(self) -> str:
        lines: list[str] = []
        stats = self.engine_stats()
        if stats is not None:
            lines += self._engine_lines(stats)
        lines += self._request_lines()
        lines += self._server_lines()
        return "\n".join(lines) + "\n"

    def _engine_lines(self, stats: EngineStats) -> list[str]:
        model = {"model_name": self.model_name}
        lines = _family("vllm:num_requests_running", "gauge", "Requests in the running batch.")
        lines.append(_sample("vllm:num_requests_running", model, stats.num_running))
        lines += _family("vllm:num_requests_waiting", "gauge", "Requests waiting to be scheduled.")
        lines.append(_sample("vllm:num_requests_waiting", model, stats.num_waiting))
        lines += _family("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage; 1 means 100 percent.")
        lines.append(_sample("vllm:kv_cache_usage_perc", model, stats.kv_cache_usage))
        lines += _family("vllm:prompt_tokens_total", "counter", "Prompt tokens queued.")
        lines.append(_sample("vllm:prompt_tokens_total", model, stats.num_prompt_tokens_total))
        lines += _family("vllm:generation_tokens_total", "counter", "Tokens generated.")
        lines.append(_sample("vllm:generation_tokens_total", model, stats.num_generation_tokens_total))
        lines += _family("vllm:num_preemptions_total", "counter", "Preemptions (KV blocks ran out).")
        lines.append(_sample("vllm:num_preemptions_total", model, stats.num_preemptions))
        lora = {
            "running_lora_adapters": ",".join(stats.running_adapters),
            "waiting_lora_adapters": ",".join(stats.waiting_adapters),
            "max_lora": str(self.engine.config.max_loras),
        }
        lines += _family("vllm:lora_requests_info", "gauge", "Adapters running and waiting; value: time.")
        lines.append(_sample("vllm:lora_requests_info", lora, time.time()))
        return lines

    def _request_lines(self) -> list[str]:
        model = {"model_name": self.model_name}
        lines = _family("vllm:time_to_first_token_seconds", "histogram", "Time to first token (streams).")
        lines += self.ttft.samples("vllm:time_to_first_token_seconds", model)
        lines += _family("vllm:inter_token_latency_seconds", "histogram", "Time between tokens (streams).")
        lines += self.itl.samples("vllm:inter_token_latency_seconds", model)
        lines += _family("vllm:e2e_request_latency_seconds", "histogram", "Arrival to last token.")
        lines += self.e2e.samples("vllm:e2e_request_latency_seconds", model)
        lines += _family("vllm:request_success_total", "counter", "Finished requests by finish reason.")
        for reason, count in self.finished.items():
            lines.append(_sample("vllm:request_success_total", {**model, "finished_reason": reason}, count))
        return lines

    def _server_lines(self) -> list[str]:
        admission = self.admission
        lines = _family("chatmed:requests_in_flight", "gauge", "Generation requests being served.")
        lines.append(_sample("chatmed:requests_in_flight", {}, admission.in_flight))
        lines += _family("chatmed:ready", "gauge", "1 when the server takes new requests.")
        lines.append(_sample("chatmed:ready", {}, int(admission.ready)))
        lines += _family("chatmed:engine_alive", "gauge", "0 once the engine has died.")
        lines.append(_sample("chatmed:engine_alive", {}, int(not self.engine.is_dead)))
        lines += _family("chatmed:requests_refused_total", "counter", "Requests refused at the door.")
        for reason, count in sorted(self.refused.items()):
            lines.append(_sample("chatmed:requests_refused_total", {"reason": reason}, count))
        lines += _family("chatmed:stream_errors_total", "counter", "Streams ended by an error event.")
        lines.append(_sample("chatmed:stream_errors_total", {}, self.num_stream_errors))
        lines += _family("chatmed:http_responses_total", "counter", "HTTP responses by route and status.")
        for (route, status), count in sorted(self.responses.items()):
            labels = {"route": route, "status": str(status)}
            lines.append(_sample("chatmed:http_responses_total", labels, count))
        return lines


class StreamObserver:
    """The timings of one streamed request: inter-token gaps as outputs arrive (one per token), TTFT and
    e2e from the engine's clock as each choice ends; choices left unfinished count as aborted (client
    gone) or as a stream error. `metrics` is None when no app is there to report to (tests of the
    stream alone)."""

    def __init__(self) -> None:
        self.metrics: ServerMetrics | None = None
        self._last_output_s: dict[int, float] = {}
        self._num_finished = 0

    def output(self, index: int, output: RequestOutput) -> None:
        if self.metrics is None:
            return
        now = time.monotonic()
        previous = self._last_output_s.get(index)
        num_tokens = len(output.token_ids)
        if previous is not None and num_tokens:
            # An increment of several tokens (a reader that fell behind gets them joined) counts as
            # that many gaps, each its share of the wait.
            gap = (now - previous) / num_tokens
            for _ in range(num_tokens):
                self.metrics.itl.observe(gap)
        self._last_output_s[index] = now
        if output.finished:
            self._num_finished += 1
            self.metrics.observe_finished(output)

    def close(self, n: int, failed: bool) -> None:
        if self.metrics is None:
            return
        if failed:
            self.metrics.num_stream_errors += 1
            return
        for _ in range(n - self._num_finished):
            self.metrics.count_finish("abort")


def _family(name: str, kind: str, help_text: str) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    return repr(float(value))


def _sample(name: str, labels: dict[str, str], value: float) -> str:
    if not labels:
        return f"{name} {_number(value)}"
    pairs = ",".join(f'{key}="{_escape(val)}"' for key, val in labels.items())
    return f"{name}{{{pairs}}} {_number(value)}"
