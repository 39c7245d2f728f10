"""GPU benchmark (issue 6): a random-weight LLaMA-7B-shaped model in bf16 with the two ChatMed adapters.

    bash bench/gpu.sh                      # the one command: --preset 7b --device cuda
    python -m bench.gpu --preset tiny      # the same path on the CPU with a tiny model (tested)

Phases, in order, each timed and printed to stderr:
  1. build      config.json + sharded safetensors of random weights (std 0.02, drawn on the device),
                the demo tokenizer, and PEFT adapters r=8 (chatmed-consult) and r=16 (chatmed-tcm) on all
                seven projections; cached under --workdir, so a rerun skips it
  2. bandwidth  device-to-device copy of a large buffer; GB/s counts the bytes read plus those written
  3. reference  transformers LlamaForCausalLM + peft (both adapters): greedy tokens for one ChatMed
                prompt and the log-probabilities along them, for the base and each adapter
  4. engine     our EngineCore loads the same folder; the guard compares its log-probabilities and greedy
                tokens with transformers' (bf16 tolerance) before anything is timed
  5. decode     batch-1 decode step time (median, after warm-up) against the memory floor
  6. throughput output tokens/s with 64 and 256 requests at once, adapters mixed 50/50 and base alone
  6b. profile    a few batch-1 base decode steps without CUDA graphs under torch.profiler: the kernels
                (on a CPU run, the operators) that take the most time, per step
  7. transformers `generate` on the same card: batch 1 (base, + peft adapter), padded batch (base, and
                peft's mixed-adapter batch), greedy, the same prompts and token counts
Then one table on stdout, and --json PATH for the figures. A phase that would carry the run past
--budget-s is skipped (and says so); loops also stop at the deadline and mark their figure partial.
Needs only torch, transformers and peft (and what they pull in), never the web packages.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import logging
import math
import random
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import torch

from bench.report import Cell, format_ratio, format_table, write_json
from bench.timing import call_timer, synchronize
from engine import CHATMED_TEMPLATE, EngineConfig, EngineCore, SamplingParams, Tokenizer
from engine.demo import DEMO_ADAPTERS, DEMO_LORA_ALPHA, LORA_TARGET_MODULES, build_tokenizer, llama_config

T = TypeVar("T")
# Bump when the files written by build_model change, so that stale cache folders are not reused.
FORMAT_VERSION = 1
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SHARD_BYTES = 2 * 1024**3
# Each random LoRA delta is about this fraction of its projection's output, so adapters visibly change
# the logits (the guard checks that they do) without swamping the base.
_LORA_STRENGTH = 0.3
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_GUARD_QUESTION = "孩子咳嗽一周了，夜里加重，怎么办？"
_GUARD_LOGPROBS = SamplingParams.MAX_LOGPROBS
_BASE = "base"
_MIXED = "mixed 50/50"
_CUBLAS_LORA = ", cuBLAS LoRA"
# The engine's default since a run showed them faster; the timed engine here runs without them, so that
# `forward ms` can be timed, and the overlapped rows sit beside those plain ones.
_OVERLAP = ", overlapped steps"
_SAMPLED = ", ChatMed sampling"
# CHATMED.md's defaults, as server.registry.CHATMED_DEFAULTS has them: not imported, since the server
# package needs web packages that the GPU host lacks.
_CHATMED_SAMPLING = {"temperature": 0.2, "top_p": 0.9, "repetition_penalty": 1.3}
# Decode attention's positions per loop step fixed (TritonOps.decode_keys_per_step) instead of chosen by
# the number of programs (256 where they are no more than the multiprocessors, else 64): each gets a batch-1
# base row, and the wide one a base row per concurrency.
_CANDIDATES: dict[str, dict[str, object]] = {
    "attention 64 keys/step": {"decode_keys_per_step": 64},
    "attention 128 keys/step": {"decode_keys_per_step": 128},
}
_WIDE_ATTENTION = "attention 256 keys/step"
_WIDE_SETTINGS: dict[str, object] = {"decode_keys_per_step": 256}
_OURS = "chatmed engine"
_HF = "transformers generate"


# ---- model shape and presets ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    """A LLaMA's sizes; `init_std` is the standard deviation of every random projection and embedding."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    init_std: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def proj_shape(self, proj: str) -> tuple[int, int]:
        """[out, in] of one projection, as Hugging Face stores it."""
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        shapes = {
            "q_proj": (self.num_heads * self.head_dim, h),
            "k_proj": (kv, h),
            "v_proj": (kv, h),
            "o_proj": (h, self.num_heads * self.head_dim),
            "gate_proj": (self.intermediate_size, h),
            "up_proj": (self.intermediate_size, h),
            "down_proj": (h, self.intermediate_size),
        }
        return shapes[proj]

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """Every tensor of the Hugging Face checkpoint (untied lm_head), in file order."""
        out: list[tuple[str, tuple[int, ...]]] = [
            ("model.embed_tokens.weight", (self.vocab_size, self.hidden_size))
        ]
        for i in range(self.num_layers):
            p = f"model.layers.{i}."
            out.append((p + "input_layernorm.weight", (self.hidden_size,)))
            out += [(p + _module(proj) + ".weight", self.proj_shape(proj)) for proj in LORA_TARGET_MODULES]
            out.append((p + "post_attention_layernorm.weight", (self.hidden_size,)))
        out.append(("model.norm.weight", (self.hidden_size,)))
        out.append(("lm_head.weight", (self.vocab_size, self.hidden_size)))
        return out

    def num_parameters(self) -> int:
        return sum(math.prod(dims) for _, dims in self.tensors())

    def kv_bytes_per_token(self, itemsize: int) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize

    def decode_read_bytes(self, itemsize: int, num_seqs: int, mean_context: float) -> int:
        """Bytes one decode step must read at least: every weight except the embedding table (all layers,
        the final norm, the full lm_head), one embedding row per sequence, and each sequence's cached
        keys and values. Adapter weights are added by the caller."""
        embedding = self.vocab_size * self.hidden_size
        weights = (self.num_parameters() - embedding + num_seqs * self.hidden_size) * itemsize
        return int(weights + num_seqs * mean_context * self.kv_bytes_per_token(itemsize))


def _module(proj: str) -> str:
    return ("self_attn." if proj in _ATTENTION else "mlp.") + proj


@dataclass(frozen=True)
class Preset:
    """A model and the workload run on it; every field but the shape can be overridden by a flag."""

    shape: ModelShape
    device: str
    dtype: str
    concurrency: tuple[int, ...]
    max_tokens: int
    prompt_len: int
    hf_batch: int
    decode_steps: int
    copy_mib: int
    max_num_batched_tokens: int
    guard_atol: float


def get_preset(name: str) -> Preset:
    """`7b`: LLaMA-7B's shape with ChatMed's 49954-token vocabulary, bf16 on CUDA, the issue's workload.
    `tiny`: a two-layer model in float32 on the CPU with a small workload, for tests."""
    if name == "7b":
        shape = ModelShape(4096, 32, 32, 32, 11008, 49954)
        # bf16 logits of two implementations differ by a few hundredths; 0.25 nats still catches a
        # missing adapter or a wrong rotary/norm, which move them by whole nats.
        return Preset(shape, "cuda", "bfloat16", (64, 256), 128, 100, 64, 128, 2048, 4096, 0.25)
    if name == "tiny":
        # A vocabulary larger than the demo tokenizer's 4501 tokens, like ChatMed's base.
        shape = ModelShape(64, 2, 4, 4, 176, 4608)
        return Preset(shape, "cpu", "float32", (4, 16), 16, 24, 4, 16, 64, 256, 1e-3)
    raise ValueError(f"unknown preset {name!r}: use 7b or tiny")


@dataclass(frozen=True)
class BenchConfig(Preset):
    """The run's settings: a preset's fields with the command line's overrides, and the run's own."""

    preset: str
    guard_tokens: int
    workdir: Path
    json_path: Path | None
    budget_s: float
    seed: int
    skip_hf: bool
    profile_steps: int = 16  # 0: no profile

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]


# ---- building the checkpoint ---------------------------------------------------------------------------
@dataclass(frozen=True)
class BuiltModel:
    """The base folder and each adapter's (served name, folder)."""

    base_path: Path
    adapters: tuple[tuple[str, Path], ...]


def build_model(
    shape: ModelShape,
    dtype: str,
    device: torch.device,
    workdir: Path,
    seed: int,
    shard_bytes: int = SHARD_BYTES,
) -> BuiltModel:
    """Return the checkpoint of `shape` under `workdir`, writing it first unless a complete one is there.
    Written under a temporary name and renamed at the end, so a folder with the final name is whole.
    (The folder name does not depend on `shard_bytes`: any sharding holds the same weights.)"""
    text = json.dumps(
        {"format": FORMAT_VERSION, "dtype": dtype, "seed": seed, **asdict(shape)}, sort_keys=True
    )
    final = workdir / f"llama-{hashlib.sha256(text.encode()).hexdigest()[:12]}"
    if not final.is_dir():
        workdir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=workdir))
        try:
            _write_base(staging / "base", shape, _DTYPES[dtype], device, seed, shard_bytes)
            for offset, (name, rank) in enumerate(DEMO_ADAPTERS, start=1):
                folder = staging / "adapters" / name
                _write_adapter(folder, shape, rank, _DTYPES[dtype], device, seed + offset, final / "base")
            try:
                staging.rename(final)
            except OSError:
                if not final.is_dir():  # else another run finished the same build first
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    adapters = tuple((name, final / "adapters" / name) for name, _ in DEMO_ADAPTERS)
    return BuiltModel(final / "base", adapters)


def _write_base(
    folder: Path, shape: ModelShape, dtype: torch.dtype, device: torch.device, seed: int, shard_bytes: int
) -> None:
    """Tokenizer, config.json, and shards of at most shard_bytes with an index, as transformers writes."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    build_tokenizer(folder, model_max_length=shape.max_position_embeddings)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    llama_config(
        shape,
        vocab_size=shape.vocab_size,
        special_ids=(tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id),
        tie_word_embeddings=False,
        dtype=str(dtype).removeprefix("torch."),
    ).save_pretrained(folder)
    shards = plan_shards(shape.tensors(), dtype.itemsize, shard_bytes)
    generator = torch.Generator(device=device).manual_seed(seed)
    weight_map: dict[str, str] = {}
    for index, names in enumerate(shards, start=1):
        file = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        # Drawn on the device (fast even for 7B), one tensor at a time, so device memory stays small.
        tensors = {
            name: _random_weight(name, dims, shape, dtype, device, generator).cpu() for name, dims in names
        }
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
    index_json = {
        "metadata": {"total_size": shape.num_parameters() * dtype.itemsize},
        "weight_map": weight_map,
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2) + "\n")


def plan_shards(
    tensors: Sequence[tuple[str, tuple[int, ...]]], itemsize: int, shard_bytes: int
) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Tensors in order, cut into shards of at most shard_bytes (a larger tensor gets a shard alone)."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, dims in tensors:
        nbytes = math.prod(dims) * itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, dims))
        size += nbytes
    return shards


def _random_weight(
    name: str,
    dims: tuple[int, ...],
    shape: ModelShape,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator,
) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(dims, dtype=dtype, device=device)
    return torch.randn(dims, generator=generator, dtype=dtype, device=device).mul_(shape.init_std)


def _write_adapter(
    folder: Path,
    shape: ModelShape,
    rank: int,
    dtype: torch.dtype,
    device: torch.device,
    seed: int,
    base_path: Path,
) -> None:
    """A PEFT LoRA folder (adapter_config.json + adapter_model.safetensors) on all seven projections.

    A ~ N(0, 1/in) keeps |A x| near |x|; B is scaled so that scaling * B A x is about _LORA_STRENGTH
    times the base projection's W x (whose size is init_std * sqrt(in) * |x|)."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    config = LoraConfig(
        r=rank,
        lora_alpha=DEMO_LORA_ALPHA,
        lora_dropout=0.1,
        target_modules=list(LORA_TARGET_MODULES),
        task_type="CAUSAL_LM",
        base_model_name_or_path=str(base_path),
        inference_mode=True,
    )
    scaling = DEMO_LORA_ALPHA / rank
    generator = torch.Generator(device=device).manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(shape.num_layers):
        for proj in LORA_TARGET_MODULES:
            out_features, in_features = shape.proj_shape(proj)
            std_b = _LORA_STRENGTH * shape.init_std * math.sqrt(in_features) / (scaling * math.sqrt(rank))
            key = f"base_model.model.model.layers.{layer}.{_module(proj)}"
            a = torch.randn(rank, in_features, generator=generator, device=device) / math.sqrt(in_features)
            b = torch.randn(out_features, rank, generator=generator, device=device) * std_b
            tensors[key + ".lora_A.weight"] = a.to(dtype).cpu()
            tensors[key + ".lora_B.weight"] = b.to(dtype).cpu()
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})


# ---- copy bandwidth ------------------------------------------------------------------------------------
def measure_copy_bandwidth(device: torch.device, num_bytes: int, repeats: int = 20) -> float:
    """GB/s (1e9 bytes) of `dst.copy_(src)` on the device, counting the bytes read plus those written
    (2 x num_bytes per copy), as decode reads its weights: the fastest of `repeats` timed copies."""
    src = torch.ones(num_bytes, dtype=torch.uint8, device=device)  # written once: no first-touch faults
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    synchronize(device)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    del src, dst
    return 2 * num_bytes / best / 1e9


# ---- workload ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Work:
    """One request: prompt ids and adapter (None: the base)."""

    prompt_ids: list[int]
    adapter: str | None


def make_prompts(count: int, prompt_len: int, tokenizer_vocab: int, seed: int) -> list[list[int]]:
    """`count` prompts of BOS + random ordinary token ids, lengths within 10% of prompt_len (so padded
    batches really pad); ids < 3 (unk, bos, eos) and the last id (pad) are left out."""
    rng = random.Random(seed)
    spread = max(1, prompt_len // 10)
    lengths = [max(2, prompt_len + rng.randint(-spread, spread)) for _ in range(count)]
    return [[1] + [rng.randrange(3, tokenizer_vocab - 1) for _ in range(n - 1)] for n in lengths]


def mixed(prompts: Sequence[list[int]], adapter_names: Sequence[str]) -> list[Work]:
    """Adapters assigned in turn: 50/50 for two adapters."""
    return [Work(p, adapter_names[i % len(adapter_names)]) for i, p in enumerate(prompts)]


def base_only(prompts: Sequence[list[int]]) -> list[Work]:
    return [Work(p, None) for p in prompts]


# ---- budget and phases ---------------------------------------------------------------------------------
@dataclass
class PhaseRecord:
    name: str
    seconds: float
    skipped: str | None = None  # why, when skipped


class Budget:
    """Wall-clock budget of the whole run, and the log of its phases (printed to stderr as they end)."""

    def __init__(self, budget_s: float) -> None:
        self.start = time.perf_counter()
        self.budget_s = budget_s
        self.phases: list[PhaseRecord] = []

    @property
    def elapsed_s(self) -> float:
        return time.perf_counter() - self.start

    @property
    def deadline(self) -> float:
        """perf_counter() value at which the budget is spent."""
        return self.start + self.budget_s

    def fits(self, estimate_s: float, reserve_s: float = 0.0) -> bool:
        return self.elapsed_s + estimate_s + reserve_s <= self.budget_s

    def run(
        self, name: str, fn: Callable[[], T], estimate_s: float = 0.0, reserve_s: float = 0.0
    ) -> T | None:
        """Run `fn` as a phase unless `estimate_s` plus `reserve_s` (kept for later phases) would pass the
        budget; None when skipped."""
        if not self.fits(estimate_s, reserve_s):
            reason = f"needs ~{estimate_s:.0f} s + {reserve_s:.0f} s kept for later, {self.left_s:.0f} s left"
            self.phases.append(PhaseRecord(name, 0.0, reason))
            _progress(f"phase {name}: SKIPPED ({reason})")
            return None
        return self.run_always(name, fn)

    def run_always(self, name: str, fn: Callable[[], T]) -> T:
        """Run `fn` as a phase that nothing can do without."""
        began = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - began
        self.phases.append(PhaseRecord(name, seconds))
        _progress(f"phase {name}: {seconds:.1f} s (total {self.elapsed_s:.1f} s of {self.budget_s:.0f} s)")
        return result

    @property
    def left_s(self) -> float:
        return max(0.0, self.budget_s - self.elapsed_s)


def _progress(message: str) -> None:
    print(f"[bench.gpu] {message}", file=sys.stderr, flush=True)


# ---- transformers (+ peft) ------------------------------------------------------------------------------
class HFModel:
    """LlamaForCausalLM with both adapters through peft, on the same device and dtype as the engine."""

    def __init__(self, built: BuiltModel, device: torch.device, dtype: torch.dtype) -> None:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        self.device = device
        device_map = str(device) if device.type == "cuda" else None
        base: Any = AutoModelForCausalLM.from_pretrained(
            str(built.base_path), dtype=dtype, device_map=device_map
        )
        if device_map is None:
            base = base.to(device)
        loaded = next(base.parameters()).dtype
        if loaded != dtype:  # transformers before 4.56 ignores `dtype=` and loads float32
            raise RuntimeError(f"transformers loaded {loaded}, not {dtype}: upgrade transformers")
        (first, first_path), *rest = built.adapters
        with warnings.catch_warnings():
            # peft reads an attribute that transformers 5 deprecates: their warning, nothing to fix here.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            model: Any = PeftModel.from_pretrained(base, str(first_path), adapter_name=first)
            for name, path in rest:
                model.load_adapter(str(path), adapter_name=name)
        self.model = model.eval()
        self.pad_token_id = int(base.config.pad_token_id)
        self.eos_token_id = int(base.config.eos_token_id)

    @contextmanager
    def adapter(self, name: str | None) -> Iterator[None]:
        """Every row on `name`, or on the bare base for None."""
        if name is None:
            with self.model.disable_adapter():
                yield
        else:
            self.model.set_adapter(name)
            yield

    def generate(
        self, works: Sequence[Work], max_new_tokens: int, deadline: float = math.inf
    ) -> tuple[list[list[int]], bool]:
        """Greedy, exactly max_new_tokens per row (EOS suppressed), left-padded; one adapter for all rows,
        or peft's mixed-adapter batch when they differ. Returns (new ids per row, cut short by deadline)."""
        from transformers import StoppingCriteria, StoppingCriteriaList

        class PastDeadline(StoppingCriteria):
            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
                stop = time.perf_counter() > deadline
                return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)

        width = max(len(w.prompt_ids) for w in works)
        ids = [[self.pad_token_id] * (width - len(w.prompt_ids)) + w.prompt_ids for w in works]
        mask = [[0] * (width - len(w.prompt_ids)) + [1] * len(w.prompt_ids) for w in works]
        kwargs: dict[str, Any] = {
            "input_ids": torch.tensor(ids, device=self.device),
            "attention_mask": torch.tensor(mask, device=self.device),
            "max_new_tokens": max_new_tokens,
            "min_new_tokens": max_new_tokens,
            "do_sample": False,
            "pad_token_id": self.pad_token_id,
            "eos_token_id": self.eos_token_id,
            "stopping_criteria": StoppingCriteriaList([PastDeadline()]),
        }
        adapters = [w.adapter for w in works]
        context: AbstractContextManager[None]
        if len(set(adapters)) == 1:
            context = self.adapter(adapters[0])
        else:  # peft routes each row through its own adapter ("__base__": none)
            kwargs["adapter_names"] = [a or "__base__" for a in adapters]
            context = nullcontext()
        with torch.inference_mode(), context:
            out = self.model.generate(**kwargs)
        new = out[:, width:].tolist()
        return new, len(new[0]) < max_new_tokens

    def logprobs(self, ids: list[int], adapter: str | None, num_last: int) -> torch.Tensor:
        """Teacher forcing along `ids`: the log-probabilities [num_last, vocab] (float32, on the CPU) of
        the next token at each position that predicts one of the last `num_last` ids."""
        with torch.inference_mode(), self.adapter(adapter):
            logits = self.model(input_ids=torch.tensor([ids], device=self.device)).logits
        return logits[0, -num_last - 1 : -1].float().log_softmax(-1).cpu()

    def close(self) -> None:
        del self.model
        _release_memory(self.device)


def _release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---- the correctness guard -----------------------------------------------------------------------------
@dataclass
class GuardReference:
    """transformers' side of the guard, per variant label ("base" or an adapter name)."""

    prompt_ids: list[int]
    tokens: dict[str, list[int]]  # greedy tokens (EOS suppressed)
    logprobs: dict[str, torch.Tensor]  # [k, vocab]: teacher-forced along `tokens`
    seconds_per_token: float  # of batch-1 greedy generate, for budget estimates
    # The same in float32 (the weights upcast), when the run is in a lower precision: both
    # implementations' rounding is measured against it.
    exact: dict[str, torch.Tensor] | None = None


@dataclass
class GuardResult:
    """Our engine against transformers (+ peft) on one prompt, base and each adapter.

    `max_logprob_diff`: the largest |ours - theirs| log-probability over our top tokens at every
    teacher-forced position; `max_flip_gap`: where the greedy choices differ, how much less likely
    transformers finds our token than its own (0 when they agree); `adapter_effect`: the smallest, over
    adapters, largest log-probability change an adapter makes at the first position (the guard only
    proves adapters are applied when this is well above atol); `greedy_match`: how many leading tokens
    of free-running greedy decoding agree (bf16 may diverge after a near tie, which is fine).
    In bf16/fp16 runs, `ours_vs_exact` and `theirs_vs_exact` are each side's largest distance from
    transformers in float32 over the same tokens, and the guard passes when ours is within atol or
    within twice the rounding transformers itself shows (a 32-layer bf16 model on random weights drifts
    by tenths of a nat; a missing adapter or a wrong rotary moves whole nats)."""

    passed: bool
    atol: float
    max_logprob_diff: float
    max_flip_gap: float
    adapter_effect: float
    greedy_match: dict[str, str]
    ours_vs_exact: float = math.nan
    theirs_vs_exact: float = math.nan


def guard_variants(built: BuiltModel) -> list[tuple[str, str | None]]:
    return [(_BASE, None), *((name, name) for name, _ in built.adapters)]


def guard_reference(
    hf: HFModel, prompt_ids: list[int], variants: Sequence[tuple[str, str | None]], num_tokens: int
) -> GuardReference:
    tokens: dict[str, list[int]] = {}
    logprobs: dict[str, torch.Tensor] = {}
    seconds = 0.0
    for label, adapter in variants:
        began = time.perf_counter()
        new, _ = hf.generate([Work(prompt_ids, adapter)], num_tokens)
        seconds += time.perf_counter() - began
        tokens[label] = new[0]
        logprobs[label] = hf.logprobs(prompt_ids + new[0], adapter, num_tokens)
    ref = GuardReference(prompt_ids, tokens, logprobs, seconds / (num_tokens * len(variants)))
    dtype = next(hf.model.parameters()).dtype
    if dtype != torch.float32:
        hf.model.float()  # bf16 -> float32 -> bf16 is exact, so the timed runs see the same weights
        try:
            ref.exact = {
                label: hf.logprobs(prompt_ids + tokens[label], adapter, num_tokens)
                for label, adapter in variants
            }
        finally:
            hf.model.to(dtype)
            _release_memory(hf.device)
    return ref


def check_guard(
    core: EngineCore, ref: GuardReference, variants: Sequence[tuple[str, str | None]], atol: float
) -> GuardResult:
    """One engine batch (all variants mixed): a 1-token request with logprobs at every prefix of
    transformers' tokens, and a free-running greedy request per variant. EOS is suppressed (min_tokens)
    on both sides, as transformers' min_new_tokens does."""
    prompts: list[list[int]] = []
    params: list[SamplingParams] = []
    adapters: list[str | None] = []
    one = SamplingParams(max_tokens=1, min_tokens=1, temperature=0.0, logprobs=_GUARD_LOGPROBS)
    for label, adapter in variants:
        theirs = ref.tokens[label]
        prompts += [ref.prompt_ids + theirs[:i] for i in range(len(theirs))]
        params += [one] * len(theirs)
        n = len(theirs)
        prompts.append(ref.prompt_ids)
        params.append(SamplingParams(max_tokens=n, min_tokens=n, temperature=0.0, ignore_eos=True))
        adapters += [adapter] * (n + 1)
    outputs = iter(core.generate(prompts, params, adapters))
    max_diff = max_gap = ours_exact = theirs_exact = 0.0
    match: dict[str, str] = {}
    for label, _ in variants:
        theirs, lp = ref.tokens[label], ref.logprobs[label]
        for i in range(len(theirs)):
            out = next(outputs)
            assert out.logprobs is not None
            ours = out.logprobs[0]
            max_diff = max(max_diff, *(abs(value - lp[i, tid].item()) for tid, _, value in ours.top))
            max_gap = max(max_gap, lp[i, theirs[i]].item() - lp[i, ours.token_id].item())
            if ref.exact is not None:
                exact = ref.exact[label]
                ours_exact = max(ours_exact, *(abs(v - exact[i, tid].item()) for tid, _, v in ours.top))
                theirs_exact = max(
                    theirs_exact, *(abs(lp[i, t] - exact[i, t]).item() for t, _, _ in ours.top)
                )
        free = next(outputs).token_ids
        agree = next((i for i, (a, b) in enumerate(zip(free, theirs, strict=True)) if a != b), len(theirs))
        match[label] = f"{agree}/{len(theirs)}"
    base = ref.logprobs[_BASE][0]
    effects = [(ref.logprobs[label][0] - base).abs().max().item() for label, _ in variants if label != _BASE]
    effect = min(effects, default=math.nan)
    applied = math.isnan(effect) or effect > atol
    if ref.exact is None:
        passed = max_diff <= atol and max_gap <= atol and applied
        return GuardResult(passed, atol, max_diff, max_gap, effect, match)
    passed = ours_exact <= max(atol, 2 * theirs_exact) and applied
    return GuardResult(passed, atol, max_diff, max_gap, effect, match, ours_exact, theirs_exact)


# ---- our engine ----------------------------------------------------------------------------------------
@dataclass
class Row:
    """One line of the table: a decode-step measurement (batch 1) or a run of a whole batch."""

    system: str
    setup: str  # "base", an adapter name, or "mixed 50/50"
    batch: int
    output_tokens: int
    seconds: float
    step_ms: float  # ours: median decode step; transformers: mean generate step
    floor_ms: float  # the memory floor of that step (decode_read_bytes / copy bandwidth)
    partial: bool = False  # cut short at the deadline
    # Ours at batch 1: the median of the same steps' model part (input copy, forward, logits) waited for
    # on the device; step ms minus this is host work the device sits idle through.
    forward_ms: float = math.nan
    vs_transformers: float = math.nan

    @property
    def out_tok_s(self) -> float:
        return self.output_tokens / self.seconds if self.seconds > 0 else math.nan

    @property
    def x_floor(self) -> float:
        return self.step_ms / self.floor_ms if self.floor_ms > 0 else math.nan


@dataclass
class StepLog:
    """Per-step wall times of one engine run; decode-only steps are kept apart."""

    step_s: list[float] = field(default_factory=list)
    decode_s: list[float] = field(default_factory=list)
    forward_s: list[float] = field(default_factory=list)  # with time_forward: the model part of decode_s
    contexts: list[float] = field(default_factory=list)  # mean context length at each decode step


def run_engine(
    core: EngineCore,
    works: Sequence[Work],
    max_tokens: int,
    deadline: float,
    tag: str,
    time_forward: bool = False,
    chatmed_sampling: bool = False,
) -> tuple[int, float, StepLog, bool]:
    """All requests added at once and stepped to completion, or aborted at `deadline`; greedy, or with
    `chatmed_sampling` ChatMed's sampling defaults (seeded per request).
    Returns (output tokens, seconds from the first add to the last token, step log, partial).

    A step is decode-only when every request still running had its first token before it (all were
    added at once) and no preemption happened during it. With `time_forward` the log also holds each
    decode-only step's model part: `ModelRunner.run` timed to a device synchronize."""
    sync = partial(synchronize, core.device)
    with call_timer(core.runner, "run", sync) if time_forward else nullcontext([]) as forward_s:
        return _run_engine(core, works, max_tokens, deadline, tag, forward_s, chatmed_sampling)


def _run_engine(
    core: EngineCore,
    works: Sequence[Work],
    max_tokens: int,
    deadline: float,
    tag: str,
    forward_s: list[float],
    chatmed_sampling: bool = False,
) -> tuple[int, float, StepLog, bool]:
    request_ids = [f"{tag}-{i}" for i in range(len(works))]
    produced: dict[str, int] = {}
    log = StepLog()
    prompt_len = statistics.fmean(len(w.prompt_ids) for w in works)
    start = time.perf_counter()
    for i, (request_id, work) in enumerate(zip(request_ids, works, strict=True)):
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        if chatmed_sampling:
            params = replace(params, **_CHATMED_SAMPLING, seed=i)
        core.add_request(request_id, work.prompt_ids, params, work.adapter)
    partial = False
    # Every step yields at least one token, so this bounds the loop (with room for preemptions).
    for _ in range(4 * len(works) * (max_tokens + int(prompt_len)) + 100):
        if not core.has_unfinished():
            break
        if time.perf_counter() > deadline:
            for request_id in request_ids:
                core.abort(request_id)
            partial = True
            break
        decode_only = len(produced) == len(works)
        preemptions = core.stats().num_preemptions
        began = time.perf_counter()
        forwards, runs = len(forward_s), core.runner.num_steps
        outputs = core.step()
        log.step_s.append(time.perf_counter() - began)
        # (With overlapped steps, the last call may only read the tokens of the step before.)
        ran = core.runner.num_steps > runs
        if decode_only and ran and core.stats().num_preemptions == preemptions:
            log.decode_s.append(log.step_s[-1])
            if len(forward_s) == forwards + 1:
                log.forward_s.append(forward_s[-1])
            log.contexts.append(prompt_len + statistics.fmean(n for n in produced.values() if n < max_tokens))
        for out in outputs:
            produced[out.request_id] = out.num_output_tokens
        if core.failed:
            raise RuntimeError(f"request {core.failed[0][0]} failed in the engine") from core.failed[0][1]
    return sum(produced.values()), time.perf_counter() - start, log, partial


@dataclass(frozen=True)
class Floor:
    """The memory floor of a decode step: bytes it must read over the measured copy bandwidth."""

    shape: ModelShape
    itemsize: int
    bandwidth_gbs: float
    ranks: dict[str, int]  # adapter name -> LoRA rank

    def read_bytes(self, num_seqs: int, mean_context: float, adapters: set[str]) -> int:
        lora = sum(lora_bytes(self.shape, self.ranks[name], self.itemsize) for name in adapters)
        return self.shape.decode_read_bytes(self.itemsize, num_seqs, mean_context) + lora

    def ms(self, num_seqs: int, mean_context: float, adapters: set[str]) -> float:
        if not self.bandwidth_gbs > 0 or math.isnan(mean_context):
            return math.nan
        return self.read_bytes(num_seqs, mean_context, adapters) / (self.bandwidth_gbs * 1e9) * 1e3


def lora_bytes(shape: ModelShape, rank: int, itemsize: int) -> int:
    """A and B of every projection of every layer, as PEFT stores them."""
    per_layer = sum(rank * sum(shape.proj_shape(proj)) for proj in LORA_TARGET_MODULES)
    return shape.num_layers * per_layer * itemsize


def _median_ms(values: Sequence[float]) -> float:
    return statistics.median(values) * 1e3 if values else math.nan


def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else math.nan


def decode_row(
    core: EngineCore,
    work: Work,
    steps: int,
    floor: Floor,
    deadline: float,
    setup: str | None = None,
    time_forward: bool = True,
    chatmed_sampling: bool = False,
) -> Row:
    """One request alone: the median of `steps` decode steps after a quarter as many warm-up steps.
    `time_forward`: also time the model part (to a device synchronize)."""
    warmup = max(2, steps // 4)
    tag = f"decode-{work.adapter}"
    _, _, log, partial = run_engine(
        core, [work], warmup + steps + 1, deadline, tag, time_forward, chatmed_sampling
    )
    timed, contexts = log.decode_s[warmup:], log.contexts[warmup:]
    adapters = {work.adapter} if work.adapter else set()
    floor_ms = floor.ms(1, _mean(contexts), adapters)
    label = setup or work.adapter or _BASE
    forward_ms = _median_ms(log.forward_s[warmup:]) if len(log.forward_s) == len(log.decode_s) else math.nan
    return Row(
        _OURS, label, 1, len(timed), sum(timed), _median_ms(timed), floor_ms, partial, forward_ms=forward_ms
    )


def eager_decode_row(core: EngineCore, work: Work, steps: int, floor: Floor, deadline: float) -> Row:
    """The same batch-1 decode with CUDA graphs turned off: what replaying them saves."""
    graphs = core.runner.graphs
    core.runner.graphs = None
    try:
        return decode_row(core, work, steps, floor, deadline, f"{work.adapter or _BASE}, no CUDA graphs")
    finally:
        core.runner.graphs = graphs


@contextmanager
def ops_variant(core: EngineCore, **settings: object) -> Iterator[None]:
    """The engine with some of its ops' settings changed (TritonOps.skinny, .lora_rows, ...), on freshly
    captured decode graphs; the settings and the engine's own graphs come back afterwards."""
    ops, graphs = core.runner.model.ops, core.runner.graphs
    saved = {name: getattr(ops, name) for name in settings}
    for name, value in settings.items():
        setattr(ops, name, value)
    try:
        if graphs is not None:
            core.runner.use_fixed_decode(
                graphs.buckets[-1], core.max_model_len, graphs.capture, lora_units=graphs.lora_units
            )
        yield
    finally:
        for name, value in saved.items():
            setattr(ops, name, value)
        core.runner.graphs = graphs


def cublas_decode_row(core: EngineCore, work: Work, steps: int, floor: Floor, deadline: float) -> Row:
    """The same batch-1 decode with every matmul on cuBLAS instead of the Triton skinny kernel: what that
    kernel saves."""
    label = f"{work.adapter or _BASE}, cuBLAS matmuls"
    return variant_row(core, [work], label, steps, floor, deadline, skinny=False)


def cublas_lora_row(
    core: EngineCore, works: Sequence[Work], setup: str, max_tokens: int, floor: Floor, deadline: float
) -> Row:
    """A batch with the adapters stacked for torch matmuls (a shrink, a mask and an addmm per projection)
    instead of the Triton ops' LoRA rows (TritonOps.lora_rows off): batch 1 as decode_row, larger batches
    warmed up for 8 tokens, then timed as throughput_row."""
    return variant_row(core, works, f"{setup}{_CUBLAS_LORA}", max_tokens, floor, deadline, lora_rows=False)


def variant_row(
    core: EngineCore,
    works: Sequence[Work],
    label: str,
    max_tokens: int,
    floor: Floor,
    deadline: float,
    **settings: object,
) -> Row:
    """A batch on the ops with `settings` (ops_variant): batch 1 as decode_row, larger batches warmed up
    for 8 tokens, then timed as throughput_row."""
    with ops_variant(core, **settings):
        if len(works) == 1:
            return decode_row(core, works[0], max_tokens, floor, deadline, label)
        run_engine(core, works, 8, deadline, f"warm-{len(works)}-variant")
        return throughput_row(core, works, label, max_tokens, floor, deadline)


def overlap_row(
    core: EngineCore,
    works: Sequence[Work],
    setup: str,
    max_tokens: int,
    floor: Floor,
    deadline: float,
    overlap: bool = True,
    chatmed_sampling: bool = False,
) -> Row:
    """A batch with overlapped steps (each decode step runs while the host reads the one before), or
    without (`overlap` False: its twin): batch 1 as decode_row without timing the model part, whose
    synchronize would undo the overlap, greedy or with ChatMed's sampling; larger batches (greedy) warmed
    up for 8 tokens, then timed as throughput_row."""
    saved, core.overlap = core.overlap, overlap
    try:
        if len(works) == 1:
            return decode_row(core, works[0], max_tokens, floor, deadline, setup, False, chatmed_sampling)
        run_engine(core, works, 8, deadline, f"warm-{len(works)}-overlap")
        return throughput_row(core, works, setup, max_tokens, floor, deadline)
    finally:
        core.overlap = saved


def engine_path(core: EngineCore) -> str:
    """How the engine ran: its ops and what its CUDA graphs did."""
    graphs = core.runner.graphs
    text = f"{core.runner.model.ops.name} ops"
    if graphs is None:
        return text + ", no CUDA graphs"
    if not graphs.capture:
        return text + ", fixed-shape decode without capture"
    return text + f", CUDA graphs: {graphs.num_captured} captured, {graphs.num_replays} replays"


def throughput_row(
    core: EngineCore, works: Sequence[Work], setup: str, max_tokens: int, floor: Floor, deadline: float
) -> Row:
    tag = f"run-{len(works)}-{setup.split()[0]}"
    tokens, seconds, log, partial = run_engine(core, works, max_tokens, deadline, tag)
    adapters = {w.adapter for w in works if w.adapter}
    floor_ms = floor.ms(len(works), _mean(log.contexts), adapters)
    return Row(_OURS, setup, len(works), tokens, seconds, _median_ms(log.decode_s), floor_ms, partial)


def kv_cache_bytes(cfg: BenchConfig, device: torch.device, block_size: int = 16) -> int:
    """Enough KV blocks for the largest batch with no preemption (plus the guard's requests), capped on
    CUDA by the free memory left after the engine's weights and a margin for activations."""
    longest_prompt = int(cfg.prompt_len * 1.1) + 1

    def blocks(num_tokens: int) -> int:
        return -(-num_tokens // block_size)

    # The batch-1 decode runs and the guard hold a few more blocks at other times; 64 spare cover them.
    blocks_needed = max(cfg.concurrency) * blocks(longest_prompt + cfg.max_tokens)
    blocks_needed = max(blocks_needed, blocks(longest_prompt + 2 * cfg.decode_steps)) + 64
    needed = blocks_needed * block_size * cfg.shape.kv_bytes_per_token(cfg.torch_dtype.itemsize)
    if device.type != "cuda":
        return needed
    _release_memory(device)
    free, total = torch.cuda.mem_get_info(device)
    room = free - cfg.shape.num_parameters() * cfg.torch_dtype.itemsize - max(6 * 1024**3, total // 10)
    if room < needed:
        _progress(f"KV cache cut to {room / 1e9:.1f} GB (wanted {needed / 1e9:.1f} GB): expect preemptions")
    return max(min(room, needed), 1)


def engine_config(cfg: BenchConfig, built: BuiltModel, kv_bytes: int) -> EngineConfig:
    return EngineConfig(
        model_path=built.base_path,
        adapters=built.adapters,
        device=cfg.device,
        dtype=cfg.dtype,
        kv_cache_bytes=kv_bytes,
        max_num_seqs=max(cfg.concurrency),
        max_num_batched_tokens=cfg.max_num_batched_tokens,
        overlap_steps=False,  # the plain rows; overlap_row times the engine's default beside them
    )


def engine_rows(
    core: EngineCore,
    cfg: BenchConfig,
    prompts: Sequence[list[int]],
    floor: Floor,
    budget: Budget,
    reserve_s: float,
) -> list[Row]:
    """Decode steps at batch 1 (base, then the rank-16 adapter), then each concurrency mixed and base.
    `reserve_s` of the budget is kept for the phases after these."""
    names = list(floor.ranks)
    deadline = budget.deadline - reserve_s
    warm = [Work(p, a) for p, a in zip(prompts, [None, *names], strict=False)]
    budget.run("engine warm-up", partial(run_engine, core, warm, 4, deadline, "warm-up"), 0.0, reserve_s)
    rows: list[Row] = []
    for adapter in (None, names[-1]):
        work = Work(prompts[0], adapter)
        row = budget.run(
            f"decode step, batch 1, {adapter or _BASE}",
            partial(decode_row, core, work, cfg.decode_steps, floor, deadline),
            reserve_s=reserve_s,
        )
        rows += [row] if row is not None else []
    if core.runner.graphs is not None:
        # Greedy overlapped; then ChatMed's sampling without and with overlap on: top-p reads back its
        # candidates, so the engine does not defer those steps, and the two rows check that it does not.
        for label, overlap, sampled in (
            (f"{_BASE}{_OVERLAP}", True, False),
            (f"{_BASE}{_SAMPLED}", False, True),
            (f"{_BASE}{_SAMPLED}{_OVERLAP}", True, True),
        ):
            work = Work(prompts[0], None)
            row = budget.run(
                f"decode step, batch 1, {label}",
                partial(
                    overlap_row, core, [work], label, cfg.decode_steps, floor, deadline, overlap, sampled
                ),
                reserve_s=reserve_s,
            )
            rows += [row] if row is not None else []
    if core.runner.graphs is not None and core.runner.graphs.capture:
        row = budget.run(
            "decode step, batch 1, base, no CUDA graphs",
            partial(eager_decode_row, core, Work(prompts[0], None), cfg.decode_steps, floor, deadline),
            reserve_s=reserve_s,
        )
        rows += [row] if row is not None else []
    kernels = hasattr(core.runner.model.ops, "lora_rows")  # the Triton ops: their variants get rows
    if kernels:
        row = budget.run(
            "decode step, batch 1, base, cuBLAS matmuls",
            partial(cublas_decode_row, core, Work(prompts[0], None), cfg.decode_steps, floor, deadline),
            reserve_s=reserve_s,
        )
        rows += [row] if row is not None else []
        work = Work(prompts[0], names[-1])
        row = budget.run(
            f"decode step, batch 1, {names[-1]}{_CUBLAS_LORA}",
            partial(cublas_lora_row, core, [work], names[-1], cfg.decode_steps, floor, deadline),
            reserve_s=reserve_s,
        )
        rows += [row] if row is not None else []
        for name, settings in _CANDIDATES.items():
            work, label = Work(prompts[0], None), f"{_BASE}, {name}"
            row = budget.run(
                f"decode step, batch 1, {label}",
                partial(variant_row, core, [work], label, cfg.decode_steps, floor, deadline, **settings),
                reserve_s=reserve_s,
            )
            rows += [row] if row is not None else []
    step_s = rows[0].step_ms / 1e3 if rows and not math.isnan(rows[0].step_ms) else 0.0
    for c in cfg.concurrency:
        prefill_steps = -(-c * cfg.prompt_len // cfg.max_num_batched_tokens)
        lower_bound_s = (cfg.max_tokens + prefill_steps) * step_s  # no batch steps faster than batch 1
        setups = ((_MIXED, mixed(prompts[:c], names)), (_BASE, base_only(prompts[:c])))
        # Untimed: the same batches for a few tokens first, so that the timed runs measure serving, not
        # the first sight of each batch shape (CUDA graph capture, allocator growth).
        for setup, works in setups:
            budget.run(
                f"warm-up, {c} concurrent, {setup}",
                partial(run_engine, core, works, 8, deadline, f"warm-{c}-{setup.split()[0]}"),
                estimate_s=(8 + prefill_steps) * step_s,
                reserve_s=reserve_s,
            )
        for setup, works in setups:
            row = budget.run(
                f"throughput, {c} concurrent, {setup}",
                partial(throughput_row, core, works, setup, cfg.max_tokens, floor, deadline),
                estimate_s=lower_bound_s,
                reserve_s=reserve_s,
            )
            rows += [row] if row is not None else []
        # Variants of the same batches: (label, measure).
        mixed_works, base_works = setups[0][1], setups[1][1]
        variants: list[tuple[str, Callable[[], Row]]] = []
        if core.runner.graphs is not None:
            for setup, works in ((_MIXED, mixed_works), (_BASE, base_works)):
                label = f"{setup}{_OVERLAP}"
                variants.append(
                    (label, partial(overlap_row, core, works, label, cfg.max_tokens, floor, deadline))
                )
        if kernels:
            variants.append(
                (
                    f"{_MIXED}{_CUBLAS_LORA}",
                    partial(cublas_lora_row, core, mixed_works, _MIXED, cfg.max_tokens, floor, deadline),
                )
            )
            label, settings = f"{_BASE}, {_WIDE_ATTENTION}", _WIDE_SETTINGS
            variants.append(
                (
                    label,
                    partial(
                        variant_row, core, base_works, label, cfg.max_tokens, floor, deadline, **settings
                    ),
                )
            )
        for label, measure in variants:
            row = budget.run(
                f"throughput, {c} concurrent, {label}", measure, estimate_s=lower_bound_s, reserve_s=reserve_s
            )
            rows += [row] if row is not None else []
    return rows


# ---- where a decode step's time goes -------------------------------------------------------------------
@dataclass(frozen=True)
class OpTime:
    """One kernel (or, on a CPU run, one operator) of the profiled decode steps."""

    name: str
    calls_per_step: float
    ms_per_step: float  # self time on the device (on a CPU run, on the CPU)


def profile_decode(core: EngineCore, prompt: list[int], steps: int, top: int = 15) -> list[OpTime]:
    """`steps` batch-1 decode steps on the base under torch.profiler, CUDA graphs off so that each kernel
    shows (a graph replays the same kernels without the launch gaps). The `top` largest by self time."""
    from torch.profiler import ProfilerActivity, profile

    cuda = core.device.type == "cuda"
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    params = SamplingParams(max_tokens=steps + 1, temperature=0.0, ignore_eos=True)
    graphs, core.runner.graphs = core.runner.graphs, None
    try:
        core.add_request("profile", prompt, params)
        for _ in range(len(prompt) + 1):  # the prefill (chunks included), not profiled
            if any(out.num_output_tokens for out in core.step()):
                break
        with profile(activities=activities) as prof:
            for _ in range(steps):
                core.step()
            synchronize(core.device)
    finally:
        core.abort("profile")
        core.runner.graphs = graphs
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:top]
    return [
        OpTime(e.key, e.count / steps, getattr(e, key) / 1e3 / steps) for e in events if getattr(e, key) > 0
    ]


def _profile_or_none(core: EngineCore, prompt: list[int], steps: int) -> list[OpTime]:
    """profile_decode, or nothing when the profiler fails (no CUPTI, say): a diagnostic must not cost the
    run the figures that come after it."""
    try:
        return profile_decode(core, prompt, steps)
    except Exception as e:
        _progress(f"decode profile failed ({type(e).__name__}: {e}); the run goes on without it")
        return []


# ---- transformers timed runs ----------------------------------------------------------------------------
def hf_row(
    hf: HFModel, works: Sequence[Work], setup: str, max_tokens: int, floor: Floor, deadline: float
) -> Row:
    synchronize(hf.device)
    began = time.perf_counter()
    new, cut = hf.generate(works, max_tokens, deadline)
    synchronize(hf.device)
    seconds = time.perf_counter() - began
    steps = len(new[0])
    context = statistics.fmean(len(w.prompt_ids) for w in works) + steps / 2
    floor_ms = floor.ms(len(works), context, {w.adapter for w in works if w.adapter})
    step_ms = seconds / steps * 1e3 if steps else math.nan
    return Row(_HF, setup, len(works), steps * len(works), seconds, step_ms, floor_ms, cut)


def transformers_rows(
    hf: HFModel, cfg: BenchConfig, prompts: Sequence[list[int]], floor: Floor, budget: Budget, spt: float
) -> list[Row]:
    """Batch 1 on the base and with the rank-16 adapter, then a padded batch on the base and mixed."""
    names = list(floor.ranks)
    batch = prompts[: cfg.hf_batch]
    warm = budget.run("transformers warm-up", partial(_timed_generate, hf, base_only(batch), 2))
    batch_spt = warm / 2 if warm is not None else math.inf
    specs = [
        (_BASE, [Work(prompts[0], None)], spt),
        (names[-1], [Work(prompts[0], names[-1])], spt),
        (_BASE, base_only(batch), batch_spt),
        (_MIXED, mixed(batch, names), batch_spt),
    ]
    rows: list[Row] = []
    for setup, works, seconds_per_token in specs:
        row = budget.run(
            f"transformers generate, batch {len(works)}, {setup}",
            partial(hf_row, hf, works, setup, cfg.max_tokens, floor, budget.deadline),
            estimate_s=cfg.max_tokens * seconds_per_token,
        )
        rows += [row] if row is not None else []
    return rows


def _timed_generate(hf: HFModel, works: Sequence[Work], max_new_tokens: int) -> float:
    began = time.perf_counter()
    hf.generate(works, max_new_tokens)
    synchronize(hf.device)
    return time.perf_counter() - began


# ---- the whole run -------------------------------------------------------------------------------------
@dataclass
class BenchResult:
    config: BenchConfig
    device_name: str
    bandwidth_gbs: float = math.nan
    kv_cache_bytes: int = 0
    num_preemptions: int = 0
    engine_path: str = "not run"
    guard: GuardResult | None = None
    rows: list[Row] = field(default_factory=list)
    decode_profile: list[OpTime] = field(default_factory=list)
    phases: list[PhaseRecord] = field(default_factory=list)
    total_s: float = 0.0


def run_benchmark(cfg: BenchConfig) -> BenchResult:
    """Every phase in order (see the module docstring); transformers stays loaded while the engine runs
    so that each loads once, and its timed runs come last."""
    device = torch.device(cfg.device)
    budget = Budget(cfg.budget_s)
    result = BenchResult(cfg, _device_name(device), phases=budget.phases)
    built = budget.run_always(
        "build", partial(build_model, cfg.shape, cfg.dtype, device, cfg.workdir, cfg.seed)
    )
    bandwidth = budget.run("copy bandwidth", partial(measure_copy_bandwidth, device, cfg.copy_mib * 2**20))
    result.bandwidth_gbs = bandwidth if bandwidth is not None else math.nan
    ranks = dict(DEMO_ADAPTERS)
    floor = Floor(cfg.shape, cfg.torch_dtype.itemsize, result.bandwidth_gbs, ranks)
    tokenizer = Tokenizer(built.base_path)
    guard_prompt = tokenizer.encode_chat([{"role": "user", "content": _GUARD_QUESTION}], CHATMED_TEMPLATE)
    prompts = make_prompts(
        max(*cfg.concurrency, cfg.hf_batch), cfg.prompt_len, tokenizer.vocab_size, cfg.seed
    )
    variants = guard_variants(built)
    hf = ref = None
    if not cfg.skip_hf:
        hf = budget.run("transformers load", partial(HFModel, built, device, cfg.torch_dtype))
    if hf is not None:
        ref = budget.run(
            "guard reference", partial(guard_reference, hf, guard_prompt, variants, cfg.guard_tokens)
        )
    # Keep time for transformers' batch-1 runs, the comparison the table cannot do without.
    reserve_s = 2 * cfg.max_tokens * ref.seconds_per_token if ref is not None else 0.0
    result.kv_cache_bytes = kv_cache_bytes(cfg, device)
    core = budget.run("engine load", partial(EngineCore, engine_config(cfg, built, result.kv_cache_bytes)))
    if core is not None:
        if ref is not None:
            result.guard = budget.run(
                "guard check", partial(check_guard, core, ref, variants, cfg.guard_atol)
            )
            _progress(f"guard: {_guard_line(result.guard)}")
        result.rows += engine_rows(core, cfg, prompts, floor, budget, reserve_s)
        if cfg.profile_steps > 0:
            ops = budget.run("decode profile", partial(_profile_or_none, core, prompts[0], cfg.profile_steps))
            result.decode_profile = ops or []
        result.num_preemptions = core.stats().num_preemptions
        result.engine_path = engine_path(core)
        del core
        _release_memory(device)
    if hf is not None:
        spt = ref.seconds_per_token if ref is not None else math.inf
        result.rows += transformers_rows(hf, cfg, prompts, floor, budget, spt)
        hf.close()
    _compare_with_transformers(result.rows)
    result.total_s = budget.elapsed_s
    return result


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads"


def _compare_with_transformers(rows: list[Row]) -> None:
    """Each of our rows over transformers' row of the same setup at the largest batch not above ours."""
    theirs = [r for r in rows if r.system == _HF and not r.partial]
    for row in rows:
        if row.system != _OURS:
            continue
        candidates = [r for r in theirs if r.setup == row.setup and r.batch <= row.batch]
        if candidates:
            best = max(candidates, key=lambda r: r.batch)
            row.vs_transformers = row.out_tok_s / best.out_tok_s if best.out_tok_s > 0 else math.nan


# ---- output --------------------------------------------------------------------------------------------
def _guard_line(guard: GuardResult | None) -> str:
    if guard is None:
        return "not run (transformers skipped)"
    verdict = "PASSED" if guard.passed else "FAILED"
    agree = ", ".join(f"{k} {v}" for k, v in guard.greedy_match.items())
    exact = ""
    if not math.isnan(guard.ours_vs_exact):
        exact = (
            f"; against transformers in float32: ours {guard.ours_vs_exact:.4f}, transformers "
            f"{guard.theirs_vs_exact:.4f} (pass: ours <= max(atol, 2 x transformers))"
        )
    return (
        f"{verdict}: max |logprob ours - transformers| {guard.max_logprob_diff:.4f}, greedy flip gap "
        f"{guard.max_flip_gap:.4f} (atol {guard.atol:g}){exact}; adapter effect "
        f"{guard.adapter_effect:.3f}; greedy tokens in agreement: {agree}"
    )


def render(result: BenchResult) -> str:
    """The report: context lines, the table, and how to read it."""
    cfg, shape = result.config, result.config.shape
    itemsize = cfg.torch_dtype.itemsize
    params = shape.num_parameters()
    lines = [
        f"device: {result.device_name} ({cfg.device}), {cfg.dtype}; torch {torch.__version__}, "
        f"transformers {_version('transformers')}, peft {_version('peft')}",
        f"model: random LLaMA (hidden {shape.hidden_size}, {shape.num_layers} layers, {shape.num_heads}/"
        f"{shape.num_kv_heads} heads, ffn {shape.intermediate_size}, vocab {shape.vocab_size}), "
        f"{params / 1e9:.3f} B parameters, {params * itemsize / 1e9:.2f} GB; "
        + ", ".join(f"{name} r={rank}" for name, rank in DEMO_ADAPTERS)
        + " on all 7 projections",
        f"copy bandwidth: {result.bandwidth_gbs:.1f} GB/s (device-to-device copy, bytes read + written)",
        f"guard: {_guard_line(result.guard)}",
        f"engine: {result.engine_path}",
        f"workload: prompts ~{cfg.prompt_len} random token ids, {cfg.max_tokens} new tokens each, greedy, "
        f"EOS ignored; KV cache {result.kv_cache_bytes / 1e9:.2f} GB, preemptions {result.num_preemptions}",
        "",
        format_table(TABLE_HEADERS, [_cells(row) for row in result.rows], digits=2),
        "",
        *NOTES,
    ]
    lines += [f"mixed / base at {c}: {format_ratio(r)}" for c, r in mixed_over_base(result.rows).items()]
    on_cublas = mixed_over_base(result.rows, _MIXED + _CUBLAS_LORA)
    lines += [f"mixed{_CUBLAS_LORA} / base at {c}: {format_ratio(r)}" for c, r in on_cublas.items()]
    overlapped = mixed_over_base(result.rows, _MIXED + _OVERLAP, _BASE + _OVERLAP)
    lines += [f"mixed / base, both{_OVERLAP} at {c}: {format_ratio(r)}" for c, r in overlapped.items()]
    if result.decode_profile:
        where = "device" if cfg.device.startswith("cuda") else "CPU"
        lines += ["", f"batch-1 base decode step without CUDA graphs, by self {where} time (torch.profiler):"]
        rows = [[op.name[:70], op.calls_per_step, op.ms_per_step] for op in result.decode_profile]
        lines.append(format_table(("kernel or operator", "calls/step", "ms/step"), rows, digits=3))
    lines += [f"skipped: {p.name} ({p.skipped})" for p in result.phases if p.skipped]
    lines.append(f"total {result.total_s:.1f} s (budget {cfg.budget_s:.0f} s)")
    return "\n".join(lines)


NOTES = (
    "step ms: ours = median decode-only engine step (schedule, forward, sample, detokenize);",
    "  transformers = generate's wall time / new tokens. Our batch-1 rows count only the timed decode",
    "  steps (after warm-up); the other rows whole runs, prefill included.",
    "forward ms = those batch-1 steps' model part alone (input copy, forward, logits, waited for on",
    "  the device): step ms minus forward ms is host work during which the device idles.",
    "floor ms = bytes a decode step must read / copy bandwidth: every layer weight, the final norm and",
    "  the full lm_head, one embedding row and the cached K/V per sequence, plus the adapters' A and B.",
    "vs transformers = out tok/s over transformers' row of the same setup at the largest batch not",
    "  above ours. * = cut short at the time budget.",
)
TABLE_HEADERS = (
    "system",
    "setup",
    "batch",
    "out tokens",
    "seconds",
    "out tok/s",
    "step ms",
    "forward ms",
    "floor ms",
    "x floor",
    "vs transformers",
)


def _cells(row: Row) -> list[Cell]:
    setup = row.setup + (" *" if row.partial else "")
    return [
        row.system,
        setup,
        row.batch,
        row.output_tokens,
        row.seconds,
        row.out_tok_s,
        row.step_ms,
        row.forward_ms,
        row.floor_ms,
        format_ratio(row.x_floor),
        format_ratio(row.vs_transformers),
    ]


def mixed_over_base(
    rows: Sequence[Row], mixed_setup: str = _MIXED, base_setup: str = _BASE
) -> dict[int, float]:
    """Our mixed-adapter throughput (`mixed_setup`) over base-only (`base_setup`) at each batch size
    measured both ways."""
    ours = {(r.setup, r.batch): r.out_tok_s for r in rows if r.system == _OURS and r.batch > 1}
    return {
        b: ours[(mixed_setup, b)] / ours[(base_setup, b)]
        for (s, b) in ours
        if s == mixed_setup and (base_setup, b) in ours
    }


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "n/a"


def payload(result: BenchResult) -> dict[str, Any]:
    """Everything the table shows, for --json (NaN becomes null: not measured)."""
    cfg = result.config
    config = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}
    rows = [{**asdict(r), "out_tok_s": r.out_tok_s, "x_floor": r.x_floor} for r in result.rows]
    return {
        "config": config,
        "environment": {
            "device": result.device_name,
            "torch": torch.__version__,
            "transformers": _version("transformers"),
            "peft": _version("peft"),
        },
        "model": {
            "parameters": cfg.shape.num_parameters(),
            "weight_bytes": cfg.shape.num_parameters() * cfg.torch_dtype.itemsize,
            "adapters": dict(DEMO_ADAPTERS),
        },
        "copy_bandwidth_gbs": result.bandwidth_gbs,
        "kv_cache_bytes": result.kv_cache_bytes,
        "num_preemptions": result.num_preemptions,
        "engine_path": result.engine_path,
        "guard": asdict(result.guard) if result.guard is not None else None,
        "rows": rows,
        "mixed_over_base": {str(b): r for b, r in mixed_over_base(result.rows).items()},
        "mixed_cublas_lora_over_base": {
            str(b): r for b, r in mixed_over_base(result.rows, _MIXED + _CUBLAS_LORA).items()
        },
        "mixed_overlapped_over_base": {
            str(b): r for b, r in mixed_over_base(result.rows, _MIXED + _OVERLAP, _BASE + _OVERLAP).items()
        },
        "decode_profile": [asdict(op) for op in result.decode_profile],
        "phases": [asdict(p) for p in result.phases],
        "total_s": result.total_s,
    }


# ---- command line --------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> BenchConfig:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=("7b", "tiny"), default="7b", help="model and workload defaults")
    parser.add_argument("--device", help="torch device (preset: cuda for 7b, cpu for tiny)")
    parser.add_argument("--dtype", choices=tuple(_DTYPES), help="preset: bfloat16 for 7b, float32 for tiny")
    parser.add_argument("--concurrency", help="comma-separated batch sizes of the throughput runs (64,256)")
    parser.add_argument("--max-tokens", type=int, help="new tokens per request (128)")
    parser.add_argument("--prompt-len", type=int, help="prompt tokens, +-10%% (100)")
    parser.add_argument("--hf-batch", type=int, help="transformers' padded batch (64)")
    parser.add_argument("--decode-steps", type=int, help="timed batch-1 decode steps (128)")
    parser.add_argument("--copy-mib", type=int, help="size of the bandwidth test's buffer (2048)")
    parser.add_argument("--max-num-batched-tokens", type=int, help="the engine's per-step token budget")
    parser.add_argument("--guard-tokens", type=int, default=8, help="greedy tokens the guard compares")
    parser.add_argument("--guard-atol", type=float, help="log-probability tolerance (bf16: 0.25)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/chatmed-gpu"), help="checkpoint cache")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--budget-s", type=float, default=330.0, help="skip phases that would pass this")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-transformers", action="store_true", help="no guard, no transformers rows")
    parser.add_argument("--profile-steps", type=int, default=16, help="decode steps profiled (0: none)")
    parser.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"))
    args = parser.parse_args(argv)
    preset = get_preset(args.preset)
    overrides = {
        "device": args.device,
        "dtype": args.dtype,
        "concurrency": _levels(args.concurrency) if args.concurrency else None,
        "max_tokens": args.max_tokens,
        "prompt_len": args.prompt_len,
        "hf_batch": args.hf_batch,
        "decode_steps": args.decode_steps,
        "copy_mib": args.copy_mib,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "guard_atol": args.guard_atol,
    }
    chosen = replace(preset, **{k: v for k, v in overrides.items() if v is not None})
    for name in (
        "max_tokens",
        "prompt_len",
        "hf_batch",
        "decode_steps",
        "copy_mib",
        "max_num_batched_tokens",
    ):
        if getattr(chosen, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    return BenchConfig(
        preset=args.preset,
        **{f.name: getattr(chosen, f.name) for f in fields(Preset)},
        guard_tokens=args.guard_tokens,
        workdir=args.workdir,
        json_path=args.json,
        budget_s=args.budget_s,
        seed=args.seed,
        skip_hf=args.skip_transformers,
        profile_steps=max(0, args.profile_steps),
    )


def _levels(text: str) -> tuple[int, ...]:
    levels = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    if not levels or levels[0] < 1:
        raise SystemExit("--concurrency needs positive integers, e.g. 64,256")
    return levels


def main(argv: Sequence[str] | None = None) -> int:
    """Run, print the table, write --json. Exit status 1 when the guard failed (the figures may be of a
    wrong model), 2 when the device is missing."""
    cfg = parse_args(argv)
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        _progress("CUDA is not available here; `--preset tiny` runs the same path on the CPU")
        return 2
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    result = run_benchmark(cfg)
    print(render(result), flush=True)
    if cfg.json_path is not None:
        write_json(cfg.json_path, payload(result))
    return 1 if result.guard is not None and not result.guard.passed else 0


if __name__ == "__main__":
    raise SystemExit(main())
