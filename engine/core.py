"""EngineCore: the synchronous engine. One `step()` schedules, runs the model, samples, detokenizes.

Single-threaded by contract: the AsyncEngine calls it from its engine thread only; tests and benchmarks
call it directly (`generate` runs a batch to completion).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.config import PREFILL_STEP_TOKENS, EngineConfig
from engine.errors import InvalidRequest, PromptTooLong, QueueFull, UnknownAdapter
from engine.kv_cache import BlockAllocator, KVCache, KVCacheShape
from engine.lora import LoraAdapter, LoraSlots, read_adapter
from engine.model.decode_graphs import Carried
from engine.model.llama import LlamaArgs, load_llama
from engine.model.lora_cpu import DTYPES as LORA_KERNEL_DTYPES
from engine.model.lora_cpu import load_kernel
from engine.model.ops import cpu_has_bfloat16_matmuls
from engine.model_runner import ModelRunner
from engine.sampler import Logprobs, Sampler, SamplingRow, to_device
from engine.scheduler import ScheduledSeq, Scheduler, SchedulerOutput, Sequence, SequenceStatus
from engine.tokenizer import IncrementalDetokenizer, StopChecker, Tokenizer
from engine.types import (
    EngineStats,
    FinishReason,
    RequestMetrics,
    RequestOutput,
    SamplingParams,
    TokenLogprob,
)

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The weights' dtype: `name`, or for "auto" the fast one of the device: bfloat16 on a GPU that
    computes it in hardware (else float16), bfloat16 on a CPU that multiplies it in hardware (about
    1.4x float32's served tokens/s on this project's machine, bench/README.md), else float32."""
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cuda":  # bfloat16 in hardware from compute capability 8 (Ampere); emulated before
        return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16
    if device.type == "cpu" and cpu_has_bfloat16_matmuls():
        return torch.bfloat16
    return torch.float32


# Holds the place of a sampled token the host has not read yet (the next step takes the real one from
# the device).
_UNREAD = 0


@dataclass(eq=False)
class _Request:
    seq: Sequence
    params: SamplingParams
    detokenizer: IncrementalDetokenizer
    stops: StopChecker
    generator: torch.Generator | None
    metrics: RequestMetrics


@dataclass(eq=False)
class _Unread:
    """A step whose sampled tokens are still on the device: `reqs[i]`'s token, `tokens[i]`, belongs at
    `positions[i]` of its sequence, where _UNREAD stands until the host reads it."""

    reqs: list[_Request]
    positions: list[int]
    tokens: torch.Tensor  # on the device: the next step's inputs
    host: torch.Tensor  # their copy in host memory, complete once `copied` has passed
    copied: torch.cuda.Event | None
    read: bool = False


class EngineCore:
    """Model, KV cache, scheduler, sampler and adapters of one engine."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.device = torch.device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.tokenizer = Tokenizer(config.model_path)
        self.model_args = LlamaArgs.from_folder(config.model_path)
        self.max_model_len = min(
            config.max_model_len or self.model_args.max_position_embeddings,
            self.model_args.max_position_embeddings,
        )
        model = load_llama(config.model_path, self.dtype, self.device, self.max_model_len)
        a = self.model_args
        shape = KVCacheShape(a.num_layers, a.num_kv_heads, a.head_dim, config.block_size)
        num_blocks = config.num_kv_blocks or shape.blocks_for_budget(config.kv_cache_bytes, self.dtype)
        self.allocator = BlockAllocator(num_blocks, config.block_size)
        kernel = load_kernel() if self.device.type == "cpu" and self.dtype in LORA_KERNEL_DTYPES else None
        self.loras = LoraSlots(config.max_loras, config.max_cpu_loras, self.device, self.dtype, kernel)
        self.scheduler = Scheduler(
            self.allocator, config.max_num_seqs, config.max_num_batched_tokens, self.loras.can_join
        )
        # One block more than the allocator hands out: the padding rows of fixed-shape decode steps.
        kv = KVCache(shape, num_blocks + 1, self.dtype, self.device)
        self.runner = ModelRunner(model, kv, config.block_size, self.device)
        self.lora_units = config.max_loras * config.max_lora_rank  # the rank resident adapters may hold
        if self.device.type == "cuda" and model.ops.reads_in_place and not config.enforce_eager:
            self.runner.use_fixed_decode(
                config.max_num_seqs, self.max_model_len, capture=True, lora_units=self.lora_units
            )
        self.sampler = Sampler(a.vocab_size, self.tokenizer.eos_token_id, self.device)
        self.requests: dict[str, _Request] = {}
        self.failed: list[tuple[str, Exception]] = []  # requests that failed in the last steps; caller drains
        # Fixed-shape decode steps leave their tokens on the device; the next step reads them while it runs.
        self.overlap = config.overlap_steps
        self._unread: _Unread | None = None
        self.num_overlapped = 0  # steps run while the host read the tokens of the step before
        self.num_prompt_tokens_total = 0
        self.num_generation_tokens_total = 0
        for name, path in config.adapters:
            self.add_adapter(self.read_adapter(name, path))
        logger.info(
            "engine ready: %d KV blocks of %d tokens, max_model_len %d, device %s, %s, LoRA by %s",
            num_blocks,
            config.block_size,
            self.max_model_len,
            self.device,
            str(self.dtype).removeprefix("torch."),
            "the CPU kernel" if kernel is not None else "torch matmuls",
        )

    # ---- adapters -----------------------------------------------------------------------------------
    def read_adapter(self, name: str, path: Path) -> LoraAdapter:
        """Read and validate an adapter, and pack it for the CPU kernel when that runs; touches no engine
        state, so it may run on another thread."""
        adapter = read_adapter(name, path, self.model_args, self.config.max_lora_rank, self.dtype)
        return adapter.pack() if self.loras.kernel is not None else adapter

    def add_adapter(self, adapter: LoraAdapter) -> None:
        """Serve a read adapter, replacing one of the same name."""
        self.loras.add(adapter, self._adapters_in_use())

    def _adapters_in_use(self) -> set[str]:
        return {r.seq.adapter for r in self.requests.values() if r.seq.adapter}

    def _finish(self, req: _Request) -> None:
        self.requests.pop(req.seq.request_id, None)
        self.scheduler.finish(req.seq)
        if len(self.loras.host) > self.loras.max_cpu_loras:
            self.loras.trim(self._adapters_in_use())

    def remove_adapter(self, name: str) -> None:
        self.loras.remove(name)

    def adapter_in_use(self, name: str) -> bool:
        return any(r.seq.adapter == name for r in self.requests.values())

    # ---- requests -----------------------------------------------------------------------------------
    def check_capacity(self) -> None:
        if len(self.scheduler.waiting) >= self.config.max_queued_requests:
            raise QueueFull("the server is at capacity; retry shortly")

    def add_request(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        adapter: str | None = None,
        arrival_s: float | None = None,
    ) -> None:
        """Validate and queue a request. Raises InvalidRequest, PromptTooLong, UnknownAdapter, QueueFull."""
        self._validate(request_id, prompt_ids, params, adapter)
        self.check_capacity()
        if adapter is not None:
            if adapter not in self.loras.host:  # the async engine reads it beforehand, off this thread
                self.add_adapter(self.read_adapter(adapter, self.loras.paths[adapter]))
            self.loras.touch(adapter)
        seq = Sequence(request_id, list(prompt_ids), len(prompt_ids), adapter)
        generator = None if params.seed is None else Sampler.make_generator(params.seed, self.device)
        self.requests[request_id] = _Request(
            seq,
            params,
            IncrementalDetokenizer(self.tokenizer, prompt_ids),
            StopChecker(params.stop),
            generator,
            RequestMetrics(arrival_s if arrival_s is not None else time.monotonic()),
        )
        self.scheduler.add(seq)
        self.num_prompt_tokens_total += len(prompt_ids)

    def _validate(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, adapter: str | None
    ) -> None:
        if request_id in self.requests:
            raise InvalidRequest(f"duplicate request id {request_id!r}")
        if not prompt_ids:
            raise InvalidRequest("the prompt is empty", param="prompt")
        if min(prompt_ids) < 0 or max(prompt_ids) >= self.model_args.vocab_size:
            raise InvalidRequest("the prompt holds token ids outside the vocabulary", param="prompt")
        if adapter is not None and adapter not in self.loras.paths:
            raise UnknownAdapter(f"the adapter {adapter!r} does not exist", param="model")
        n, limit = len(prompt_ids), self.max_model_len
        if n >= limit:
            raise PromptTooLong(
                f"the prompt has {n} tokens; this model's context length is {limit}", param="prompt"
            )
        if n + params.max_tokens > limit:
            raise PromptTooLong(
                f"max_tokens {params.max_tokens} plus the prompt's {n} tokens exceeds the context "
                f"length {limit}; ask for at most {limit - n} tokens",
                param="max_tokens",
            )
        if self.allocator.blocks_needed(n + params.max_tokens, 0) > self.allocator.num_blocks:
            raise PromptTooLong("the request needs more KV cache than this server has", param="max_tokens")

    def abort(self, request_id: str) -> bool:
        """Drop a request wherever it is and free its blocks. False if it was not (or no longer) known."""
        req = self.requests.get(request_id)
        if req is None:
            return False
        self._finish(req)
        return True

    def has_unfinished(self) -> bool:
        return self._unread is not None or self.scheduler.has_unfinished()

    # ---- the step -----------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one iteration; returns an increment for every request that produced a token.

        With `overlap` on, a fixed-shape decode step leaves its sampled tokens on the device and returns
        nothing for them: the next step takes them as its input there, and reads them back while it runs
        (or first, when it needs them on the host: a prefill, a wider batch, a preemption). A request that
        ends by length with those tokens is not scheduled again (Sequence.ending); one that ends on a stop
        or EOS has its row computed and dropped."""
        plan = self.scheduler.schedule()
        unread, self._unread = self._unread, None
        if not plan.scheduled:
            return self._read(unread) if unread is not None else []
        try:
            return self._step(plan, unread)
        except BaseException:
            if unread is not None and not unread.read:
                self._unread = unread  # not lost with the step: the next step reads them
            raise

    def _step(self, plan: SchedulerOutput, unread: _Unread | None) -> list[RequestOutput]:
        # Adjacent equal adapters give one LoRA segment each (None, the base, sorts first).
        items = sorted(plan.scheduled, key=lambda s: s.seq.adapter or "")
        now = time.monotonic()
        for item in items:
            m = self.requests[item.seq.request_id].metrics
            if m.first_scheduled_s is None:
                m.first_scheduled_s = now
        carried: Carried | None = None
        outputs: list[RequestOutput] = []
        if unread is not None:
            carried = self._carry(unread, items)
            if carried is None:
                outputs = self._read(unread)
                items = [item for item in items if item.seq.status is SequenceStatus.RUNNING]
        self._use_threads(items)
        logits = self.runner.run(items, self.loras, carried) if items else None
        self.scheduler.update(plan)
        sampling = [item for item in items if item.samples]
        if carried is not None and unread is not None and logits is not None:
            outputs = self._read(unread)  # while the device runs this step
            self.num_overlapped += 1
            live = [k for k, item in enumerate(sampling) if item.seq.status is SequenceStatus.RUNNING]
            if len(live) < len(sampling):  # rows of requests that ended with the tokens just read
                logits = logits.index_select(0, to_device(live, torch.long, logits.device))
                sampling = [sampling[k] for k in live]
        if logits is None or not sampling:
            return outputs
        if self.overlap and self.runner.runs_fixed(items):
            self._unread = self._defer(sampling, logits)
            if self._unread is not None:
                return outputs
        return outputs + self._process(sampling, logits)

    def _use_threads(self, items: list[ScheduledSeq]) -> None:
        """prefill_threads for a step of many prompt tokens (chunks of one token count as decodes),
        num_threads for the others (the calling thread's OpenMP count)."""
        config = self.config
        if config.prefill_threads is None or config.num_threads is None:
            return
        prompt_tokens = sum(item.num_new_tokens for item in items if item.num_new_tokens > 1)
        big = prompt_tokens >= PREFILL_STEP_TOKENS  # not a decode step, however many sequences
        threads = config.prefill_threads if big else config.num_threads
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)

    def _carry(self, unread: _Unread, items: list[ScheduledSeq]) -> Carried | None:
        """The unread tokens as this step's inputs, when it is a fixed-shape decode step of sequences
        whose last token is one of them; else None."""
        if not self.runner.runs_fixed(items):
            return None
        row_of = {req.seq: k for k, req in enumerate(unread.reqs)}
        sources = []
        for item in items:
            k = row_of.get(item.seq)
            if k is None or unread.positions[k] != item.start:
                return None
            sources.append(k)
        return Carried(unread.tokens, sources)

    def _defer(self, sampling: list[ScheduledSeq], logits: torch.Tensor) -> _Unread | None:
        """Sample the step without reading the tokens back; None when a row needs its logprobs, when the
        sampling reads back anyway (top-k, top-p: deferring only adds the copy; on an H200 a batch-1 step
        at ChatMed's settings took 5.68 ms deferred against 5.40 not) or when the batched sampling fails
        (the caller then samples as usual)."""
        reqs, rows = self._rows(sampling)
        if any(req.params.logprobs is not None for req in reqs) or self.sampler.reads_back(rows):
            return None
        # Should the batch fail, the usual path samples it again: seeded rows must draw as if only it had.
        seeded = [(g, g.get_state()) for g in (r.generator for r in reqs) if g is not None]
        try:
            tokens = self.sampler.sample_ids(logits, rows)
        except Exception as e:
            logger.error("sampling the step failed (%s): sampling it again as usual", type(e).__name__)
            for generator, state in seeded:
                generator.set_state(state)
            return None
        host, copied = tokens, None
        if tokens.is_cuda:
            # Copied back right behind the sampling, not behind the next step: a plain .tolist() would
            # queue after that step's whole forward on the stream and wait for it.
            host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            host.copy_(tokens, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
        positions = []
        for req in reqs:
            seq = req.seq
            seq.token_ids.append(_UNREAD)
            positions.append(seq.num_tokens - 1)
            # Ends by length with this token: the scheduler gives it no further step.
            num_out = seq.num_tokens - seq.num_prompt_tokens
            seq.ending = num_out >= req.params.max_tokens or seq.num_tokens >= self.max_model_len
        return _Unread(reqs, positions, tokens, host, copied)

    def _read(self, unread: _Unread) -> list[RequestOutput]:
        """Read back a step's tokens (waiting for that step only) and emit them; requests that ended or
        were aborted since are skipped."""
        if unread.copied is not None:
            unread.copied.synchronize()
        token_ids = unread.host.tolist()
        unread.read = True
        reqs: list[_Request] = []
        read: list[int | None] = []
        for req, position, token_id in zip(unread.reqs, unread.positions, token_ids, strict=True):
            if self.requests.get(req.seq.request_id) is req:
                req.seq.token_ids[position] = token_id
                reqs.append(req)
                read.append(token_id)
        return self._emit(reqs, read, [None] * len(reqs))

    def _rows(self, sampling: list[ScheduledSeq]) -> tuple[list[_Request], list[SamplingRow]]:
        """The sampling items' requests and their sampler rows."""
        reqs = [self.requests[item.seq.request_id] for item in sampling]
        rows = [SamplingRow(r.params, r.seq.token_ids, r.seq.num_prompt_tokens, r.generator) for r in reqs]
        return reqs, rows

    def _process(self, sampling: list[ScheduledSeq], logits: torch.Tensor) -> list[RequestOutput]:
        reqs, rows = self._rows(sampling)
        token_ids, logprobs = self._sample(reqs, logits, rows)
        for req, token_id in zip(reqs, token_ids, strict=True):
            if token_id is not None:
                req.seq.token_ids.append(token_id)
        return self._emit(reqs, token_ids, logprobs)

    def _emit(
        self, reqs: list[_Request], token_ids: list[int | None], logprobs: list[Logprobs | None]
    ) -> list[RequestOutput]:
        """Each request's increment for its new token, already the last of its sequence (None: its
        sampling failed, and the request with it); finished requests are let go."""
        now = time.monotonic()
        outputs = []
        for i, req in enumerate(reqs):
            token_id = token_ids[i]
            if token_id is None:  # its sampling failed: the request has been failed already
                continue
            self.num_generation_tokens_total += 1
            try:
                out = self._advance(req, token_id, now)
                raw = logprobs[i]
                if raw is not None:
                    out.logprobs = [self._logprob(token_id, raw)]
            except Exception as e:  # one request's fault must not take the others down
                logger.error("request %s failed (%s)", req.seq.request_id, type(e).__name__, exc_info=True)
                self.failed.append((req.seq.request_id, e))
                self.abort(req.seq.request_id)
                continue
            outputs.append(out)
            if out.finished:
                self._finish(req)
        return outputs

    def _sample(
        self, reqs: list[_Request], logits: torch.Tensor, rows: list[SamplingRow]
    ) -> tuple[list[int | None], list[Logprobs | None]]:
        """Each row's token id and logprobs, the rows sampled together; should that raise, each row alone,
        so that a row that still fails fails its request only (its id is None). A seeded row sampled
        again has drawn twice."""
        try:
            result = self.sampler.sample(logits, rows)
            return list(result.token_ids), result.logprobs
        except Exception as e:
            logger.error("sampling the step failed (%s): sampling its rows one by one", type(e).__name__)
        token_ids: list[int | None] = []
        logprobs: list[Logprobs | None] = []
        for i, (req, row) in enumerate(zip(reqs, rows, strict=True)):
            try:
                alone = self.sampler.sample(logits[i : i + 1], [row])
            except Exception as e:  # one request's fault must not take the others down
                logger.error(
                    "request %s failed in sampling (%s)", req.seq.request_id, type(e).__name__, exc_info=True
                )
                self.failed.append((req.seq.request_id, e))
                self.abort(req.seq.request_id)
                token_ids.append(None)
                logprobs.append(None)
                continue
            token_ids.append(alone.token_ids[0])
            logprobs.append(alone.logprobs[0])
        return token_ids, logprobs

    def _advance(self, req: _Request, token_id: int, now: float) -> RequestOutput:
        """Detokenize the new token, check stop conditions, and build the request's increment."""
        params, seq = req.params, req.seq
        m = req.metrics
        m.first_token_s = m.first_token_s or now
        m.last_token_s = now
        finish: FinishReason | None = None
        stop_reason: str | int | None = None
        text = ""
        num_out = seq.num_tokens - seq.num_prompt_tokens
        if token_id == self.tokenizer.eos_token_id and not params.ignore_eos:
            finish = FinishReason.STOP
        elif token_id in params.stop_token_ids:
            finish, stop_reason = FinishReason.STOP, token_id
        else:
            text, matched = req.stops.push(req.detokenizer.push(token_id))
            if matched is not None:
                finish, stop_reason = FinishReason.STOP, matched
        if finish is None and (num_out >= params.max_tokens or seq.num_tokens >= self.max_model_len):
            finish = FinishReason.LENGTH
        if finish is not None and not isinstance(stop_reason, str):
            tail, matched = req.stops.push(req.detokenizer.flush())
            text += tail if matched is not None else tail + req.stops.flush()
            if matched is not None:
                finish, stop_reason = FinishReason.STOP, matched
        if finish is not None:
            m.finished_s = now
        return RequestOutput(
            seq.request_id,
            text,
            [token_id],
            seq.num_prompt_tokens,
            num_out,
            finish,
            stop_reason,
            None,
            m if finish is not None else None,
        )

    def _logprob(self, token_id: int, raw: tuple[float, list[tuple[int, float]]]) -> TokenLogprob:
        chosen, top = raw
        text = self.tokenizer.token_text
        return TokenLogprob(token_id, text(token_id), chosen, tuple((t, text(t), lp) for t, lp in top))

    # ---- conveniences ---------------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        # Called from other threads too: copy the queues in one C-level call each, then read the copies.
        s = self.scheduler
        running, waiting = tuple(s.running), tuple(s.waiting)
        return EngineStats(
            num_running=len(running),
            num_waiting=len(waiting),
            num_free_blocks=self.allocator.num_free,
            num_total_blocks=self.allocator.num_blocks,
            num_preemptions=s.num_preemptions,
            running_adapters=tuple(sorted({q.adapter for q in running if q.adapter})),
            waiting_adapters=tuple(sorted({q.adapter for q in waiting if q.adapter})),
            num_prompt_tokens_total=self.num_prompt_tokens_total,
            num_generation_tokens_total=self.num_generation_tokens_total,
        )

    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams | list[SamplingParams],
        adapters: list[str | None] | None = None,
    ) -> list[RequestOutput]:
        """Run a batch to completion; one RequestOutput per prompt with the full text and token ids."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        adapter_list = adapters or [None] * len(prompts)
        ids = [f"batch-{id(prompts)}-{i}" for i in range(len(prompts))]
        results = {rid: RequestOutput(rid, "", [], len(p), 0) for rid, p in zip(ids, prompts, strict=True)}
        for rid, prompt, p, adapter in zip(ids, prompts, params_list, adapter_list, strict=True):
            self.add_request(rid, prompt, p, adapter)
        while self.has_unfinished():
            for out in self.step():
                acc = results[out.request_id]
                acc.text += out.text
                acc.token_ids += out.token_ids
                acc.num_output_tokens = out.num_output_tokens
                acc.finish_reason, acc.stop_reason = out.finish_reason, out.stop_reason
                if out.logprobs:
                    acc.logprobs = (acc.logprobs or []) + out.logprobs
        return [results[rid] for rid in ids]
