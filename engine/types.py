"""Plain data that crosses the engine boundary: what a request asks for and what it gets back."""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from engine.errors import InvalidRequest


class FinishReason(enum.StrEnum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the context length
    ABORT = "abort"  # the client left or the request was cancelled


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token of one request. API-neutral: the server maps OpenAI fields here.

    top_k <= 0 and top_p == 1 mean "off"; temperature == 0 means greedy. `logprobs` is the number of
    top alternatives to return per token (0 returns only the chosen token's logprob), None for none.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None

    MAX_STOP_STRINGS = 16
    MAX_STOP_CHARS = 256
    MAX_LOGPROBS = 20

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise InvalidRequest (with the offending parameter) for values no engine can honour."""
        checks: list[tuple[bool, str, str]] = [
            (self.max_tokens >= 1, "max_tokens", "must be at least 1"),
            (_finite(self.temperature) and self.temperature >= 0, "temperature", "must be >= 0"),
            (_finite(self.top_p) and 0 < self.top_p <= 1, "top_p", "must be in (0, 1]"),
            (self.top_k >= -1, "top_k", "must be -1, 0 (off) or positive"),
            (
                _finite(self.repetition_penalty) and self.repetition_penalty > 0,
                "repetition_penalty",
                "must be > 0",
            ),
            (
                _finite(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
                "presence_penalty",
                "must be in [-2, 2]",
            ),
            (
                _finite(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
                "frequency_penalty",
                "must be in [-2, 2]",
            ),
            (0 <= self.min_tokens <= self.max_tokens, "min_tokens", "must be in [0, max_tokens]"),
            (len(self.stop) <= self.MAX_STOP_STRINGS, "stop", f"at most {self.MAX_STOP_STRINGS} strings"),
            (all(0 < len(s) <= self.MAX_STOP_CHARS for s in self.stop), "stop", "empty or too long"),
            (
                self.logprobs is None or 0 <= self.logprobs <= self.MAX_LOGPROBS,
                "logprobs",
                f"must be in [0, {self.MAX_LOGPROBS}]",
            ),
            (all(t >= 0 for t in self.stop_token_ids), "stop_token_ids", "must be >= 0"),
        ]
        for ok, param, message in checks:
            if not ok:
                raise InvalidRequest(f"{param} {message}", param=param)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _finite(x: float) -> bool:
    return math.isfinite(x)


@dataclass(frozen=True)
class TokenLogprob:
    """The chosen token's logprob and, when asked, the top alternatives (id, text, logprob)."""

    token_id: int
    token: str
    logprob: float
    top: tuple[tuple[int, str, float], ...] = ()


@dataclass
class RequestOutput:
    """One increment of a request: the text and tokens produced since the previous increment.

    `text` deltas joined equal the full completion, byte for byte (UTF-8 safe, stop strings removed).
    The last increment of a request has `finish_reason` set.
    """

    request_id: str
    text: str
    token_ids: list[int]
    num_prompt_tokens: int
    num_output_tokens: int
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None  # the stop string or token id that ended the request
    logprobs: list[TokenLogprob] | None = None
    metrics: RequestMetrics | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @staticmethod
    def joined(parts: Sequence[RequestOutput]) -> RequestOutput:
        """Consecutive increments of one request as one: texts, tokens and logprobs joined in order, the
        rest the last's."""
        last = parts[-1]
        if len(parts) == 1:
            return last
        logprobs = None
        if any(part.logprobs is not None for part in parts):
            logprobs = [lp for part in parts for lp in part.logprobs or ()]
        return RequestOutput(
            request_id=last.request_id,
            text="".join(part.text for part in parts),
            token_ids=[t for part in parts for t in part.token_ids],
            num_prompt_tokens=last.num_prompt_tokens,
            num_output_tokens=last.num_output_tokens,
            finish_reason=last.finish_reason,
            stop_reason=last.stop_reason,
            logprobs=logprobs,
            metrics=last.metrics,
        )


@dataclass
class RequestMetrics:
    """Timestamps (time.monotonic seconds) of one request, filled by the engine."""

    arrival_s: float
    first_scheduled_s: float | None = None
    first_token_s: float | None = None
    last_token_s: float | None = None
    finished_s: float | None = None
    token_times_s: list[float] = field(default_factory=list)


@dataclass
class EngineStats:
    """A snapshot for health checks and metrics."""

    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_total_blocks: int
    num_preemptions: int
    running_adapters: tuple[str, ...]
    waiting_adapters: tuple[str, ...]
    num_prompt_tokens_total: int
    num_generation_tokens_total: int

    @property
    def kv_cache_usage(self) -> float:
        return 1.0 - self.num_free_blocks / max(self.num_total_blocks, 1)
