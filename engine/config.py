"""The engine's frozen configuration. Built once by the caller (the server's settings, a test, a
benchmark) and validated here, so that every component below can trust it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

_DTYPES = ("auto", "float32", "float16", "bfloat16")
# A step with this many prompt tokens or more runs on prefill_threads: on 2 cores with one engine thread,
# prompts of 16 streams at once reached their first token about a third sooner on both (bench/README.md).
PREFILL_STEP_TOKENS = 128


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs to start.

    model_path: a Hugging Face LLaMA folder (config.json, safetensors or .bin, tokenizer files).
    dtype: the weights' and KV cache's; "auto" picks the device's fast one (engine.core.resolve_dtype).
    adapters: (name, folder) pairs of PEFT LoRA adapters loaded at start-up.
    kv_cache_bytes: memory for the paged KV cache; the number of blocks is derived from it
        unless num_kv_blocks is given.
    max_num_batched_tokens: the per-step token budget (chunked prefill splits longer prompts).
    max_loras: adapters resident in device slots at once; max_cpu_loras: more kept in host memory.
    enforce_eager: on CUDA, never replay decode steps as CUDA graphs.
    num_threads: torch CPU threads of the engine's steps (None: torch's default).
    prefill_threads: torch CPU threads for steps with at least PREFILL_STEP_TOKENS prompt tokens: their
        long matmuls share cores with the event loop far better than decode steps' short ones (None:
        num_threads; needs num_threads).
    overlap_steps: run each CUDA-graph decode step while the host reads back the tokens of the step
        before (they reach the caller one step later); off, every step ends with its tokens read. Steps
        whose sampling reads back anyway (top-k, top-p: ChatMed's default top_p 0.9) or returns logprobs
        are never deferred. On an H200 (greedy requests) it took the batch-1 step from 4.33 to 3.86 ms,
        mixed adapters' tokens/s up 13% at 64 requests and 10% at 256 (bench/README.md).
    """

    model_path: Path
    adapters: tuple[tuple[str, Path], ...] = ()
    device: str = "cpu"
    dtype: str = "float32"
    block_size: int = 16
    kv_cache_bytes: int = 512 * 1024**2
    num_kv_blocks: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    max_model_len: int | None = None
    max_queued_requests: int = 1024
    max_loras: int = 4
    max_cpu_loras: int = 16
    max_lora_rank: int = 64
    num_threads: int | None = None
    prefill_threads: int | None = None
    enforce_eager: bool = False
    overlap_steps: bool = True

    def __post_init__(self) -> None:
        positive = {
            "block_size": self.block_size,
            "kv_cache_bytes": self.kv_cache_bytes,
            "max_num_seqs": self.max_num_seqs,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "max_queued_requests": self.max_queued_requests,
            "max_loras": self.max_loras,
            "max_lora_rank": self.max_lora_rank,
        }
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.max_cpu_loras < self.max_loras:
            raise ValueError("max_cpu_loras must be >= max_loras")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError("num_kv_blocks must be positive")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError("num_threads must be positive")
        if self.prefill_threads is not None and (self.prefill_threads < 1 or self.num_threads is None):
            raise ValueError("prefill_threads must be positive and needs num_threads")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError("max_model_len must be at least 2")
        names = [name for name, _ in self.adapters]
        if len(set(names)) != len(names):
            raise ValueError("adapter names must be unique")
