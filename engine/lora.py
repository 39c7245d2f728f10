"""LoRA adapters: reading PEFT checkpoints, validating them against the base, and keeping them resident.

An adapter is stored per layer and per fused projection as (A [r, in], B^T [r, out]) with the PEFT scaling
folded into B, so a projection's delta for a token is (x A^T) B^T. For the fused q/k/v and gate/up
projections the A's are stacked and B is block-diagonal, so one pair of matmuls covers all parts; the
blocks are recorded too, for the CPU kernel (engine/model/lora_cpu.py), which skips the zeros.
Reading and preparing an adapter (read_adapter) is pure and may run on any thread; LoraSlots is owned by
the engine thread.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.errors import AdapterError
from engine.model.llama import FUSED, LORA_TARGETS, LlamaArgs, LoraSegment, SegmentLora
from engine.model.lora_cpu import Block, LoraKernel, PackedAdapter

logger = logging.getLogger(__name__)

_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+_proj)\.lora_([AB])(?:\.[\w-]+)?\.weight$")
LayerWeights = list[dict[str, tuple[torch.Tensor, torch.Tensor]]]
LayerBlocks = list[dict[str, tuple[Block, ...]]]
# An adapter that trains these carries its own vocabulary rows (a resized vocab, modules_to_save,
# trainable tokens): its base is no longer ours.
_VOCAB_MODULES = ("embed_tokens", "lm_head")
_VOCAB_MESSAGE = (
    "adapter trains embed_tokens or lm_head (a resized vocabulary or modules_to_save): it cannot share "
    "the base with other adapters"
)


@dataclass
class LoraAdapter:
    """One adapter, ready to add to the base's projections."""

    name: str
    path: Path
    rank: int
    target_modules: tuple[str, ...]
    weights: LayerWeights
    blocks: LayerBlocks  # per layer and fused projection: B^T's non-zero blocks (r0, r1, c0, c1)
    # The CPU kernel's copy of the weights, where the kernel runs (made as the adapter is read).
    packed: PackedAdapter | None = None

    def to(self, device: torch.device, dtype: torch.dtype) -> LoraAdapter:
        """This adapter on `device` in `dtype`: itself (its packed copy too) when already there."""
        tensors = [t for layer in self.weights for pair in layer.values() for t in pair]
        if all(t.device == device and t.dtype == dtype for t in tensors):
            return self
        moved = [
            {k: (a.to(device, dtype), b.to(device, dtype)) for k, (a, b) in layer.items()}
            for layer in self.weights
        ]
        return LoraAdapter(self.name, self.path, self.rank, self.target_modules, moved, self.blocks)

    def pack(self) -> LoraAdapter:
        """This adapter with the CPU kernel's copy of its weights, sites numbered as SegmentLora does."""
        sites = [
            (*layer[fused], blocks[fused]) if fused in layer else None
            for layer, blocks in zip(self.weights, self.blocks, strict=True)
            for fused in FUSED
        ]
        packed = PackedAdapter(sites)
        return LoraAdapter(
            self.name, self.path, self.rank, self.target_modules, self.weights, self.blocks, packed
        )

    @property
    def num_bytes(self) -> int:
        pairs = sum(a.nbytes + b.nbytes for layer in self.weights for a, b in layer.values())
        return pairs + (self.packed.num_bytes if self.packed is not None else 0)


def read_adapter(name: str, path: Path, args: LlamaArgs, max_rank: int, dtype: torch.dtype) -> LoraAdapter:
    """Read and validate a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors or .bin).

    Raises AdapterError with a message fit for an API client (no absolute paths) when the adapter cannot be
    served on this base: wrong type, DoRA, modules_to_save, embeddings, ranks above max_rank, shapes that
    do not match the base.
    """
    config = _read_config(path)
    try:
        r, alpha = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
    except (TypeError, ValueError) as e:
        raise AdapterError("adapter_config.json has a non-numeric r or lora_alpha") from e
    if not 1 <= r <= max_rank:
        raise AdapterError(f"adapter rank {r} is outside 1..{max_rank} (max_lora_rank)")
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    pairs = _read_pairs(path, args)
    weights: LayerWeights = []
    blocks: LayerBlocks = []
    for layer in range(args.num_layers):
        weights.append({})
        blocks.append({})
        for fused, parts in FUSED.items():
            fused_weights = _fuse(args, pairs, layer, parts, scaling, dtype)
            if fused_weights is not None:
                a, b_t, blocks[-1][fused] = fused_weights
                weights[-1][fused] = (a, b_t)
    targets = tuple(sorted({proj for (_, proj) in pairs}, key=LORA_TARGETS.index))
    ranks = {a.shape[0] for a, _ in pairs.values()}
    if max(ranks) > max_rank:
        raise AdapterError(f"adapter rank {max(ranks)} exceeds max_lora_rank {max_rank}")
    return LoraAdapter(name, path, max(ranks), targets, weights, blocks)


def _read_config(path: Path) -> dict[str, Any]:
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise AdapterError("adapter folder has no adapter_config.json")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise AdapterError("adapter_config.json is not valid JSON") from e
    if not isinstance(config, dict):
        raise AdapterError("adapter_config.json must hold an object")
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise AdapterError(f"only LoRA adapters are supported, got peft_type {config.get('peft_type')}")
    if config.get("use_dora"):
        raise AdapterError("DoRA adapters are not supported")
    if config.get("modules_to_save"):
        raise AdapterError("adapters with modules_to_save (e.g. a resized vocabulary) cannot share the base")
    if config.get("bias", "none") != "none":
        raise AdapterError("LoRA adapters with trained biases are not supported")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise AdapterError("per-module rank_pattern/alpha_pattern adapters are not supported")
    if config.get("fan_in_fan_out"):
        raise AdapterError("fan_in_fan_out adapters are not supported for LLaMA")
    targets = config.get("target_modules")
    if isinstance(targets, list) and any(t in _VOCAB_MODULES for t in targets):
        raise AdapterError(_VOCAB_MESSAGE)
    return config


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    st, binary = path / "adapter_model.safetensors", path / "adapter_model.bin"
    try:
        if st.is_file():
            from safetensors.torch import load_file

            return load_file(str(st))
        if binary.is_file():
            # The published ChatMed adapters are pickles: never run their code, read tensors only.
            state = torch.load(binary, map_location="cpu", weights_only=True)
            if not isinstance(state, dict):
                raise AdapterError("adapter_model.bin does not hold a state dict")
            return state
    except AdapterError:
        raise
    except Exception as e:  # corrupt files surface as many exception types
        raise AdapterError(f"adapter weights could not be read ({type(e).__name__})") from e
    raise AdapterError("adapter folder has no adapter_model.safetensors or adapter_model.bin")


def _read_pairs(path: Path, args: LlamaArgs) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """(layer, projection) -> (A [r, in], B [out, r]) as stored, shapes checked against the base."""
    halves: dict[tuple[int, str, str], torch.Tensor] = {}
    for key, tensor in _read_state(path).items():
        if any(f".{module}." in f".{key}" for module in _VOCAB_MODULES):
            raise AdapterError(_VOCAB_MESSAGE)
        m = _KEY.search(key)
        if m is None:
            raise AdapterError(f"unsupported tensor in adapter: {key.split('.')[-3:]}")
        layer, proj, half = int(m.group(1)), m.group(2), m.group(3)
        if proj not in LORA_TARGETS or layer >= args.num_layers:
            raise AdapterError(f"adapter targets {proj} of layer {layer}, which the base does not have")
        halves[(layer, proj, half)] = tensor
    pairs = {}
    for (layer, proj, half), a in halves.items():
        if half != "A":
            continue
        b = halves.get((layer, proj, "B"))
        if b is None or a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise AdapterError(f"adapter has mismatched lora_A/lora_B for {proj} of layer {layer}")
        if a.shape[1] != args.in_features(proj) or b.shape[0] != args.out_features(proj):
            raise AdapterError(f"adapter shapes for {proj} do not match the base model")
        if not (a.is_floating_point() and b.is_floating_point()):
            raise AdapterError(f"adapter weights for {proj} are not floating-point tensors")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise AdapterError(f"adapter weights for {proj} of layer {layer} hold NaN or infinite values")
        pairs[(layer, proj)] = (a, b)
    if not pairs or len(pairs) * 2 != len(halves):
        raise AdapterError("adapter has no complete LoRA weight pairs")
    return pairs


def _fuse(
    args: LlamaArgs,
    pairs: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]],
    layer: int,
    parts: tuple[str, ...],
    scaling: float,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, tuple[Block, ...]] | None:
    """Stack the parts' A's and build a block-diagonal B (rows of parts without LoRA stay zero).
    Returns (A, B^T, the blocks of B^T that are not zero)."""
    present = [(p, pairs[(layer, p)]) for p in parts if (layer, p) in pairs]
    if not present:
        return None
    rank = sum(a.shape[0] for _, (a, _) in present)
    out = sum(args.out_features(p) for p in parts)
    a_cat = torch.cat([a.float() for _, (a, _) in present]).to(dtype)
    b_diag = torch.zeros(out, rank)
    row = {p: sum(args.out_features(q) for q in parts[: parts.index(p)]) for p in parts}
    col = 0
    blocks = []
    for p, (a, b) in present:
        b_diag[row[p] : row[p] + b.shape[0], col : col + a.shape[0]] = b.float() * scaling
        blocks.append((col, col + a.shape[0], row[p], row[p] + b.shape[0]))
        col += a.shape[0]
    # B stored transposed: [r, out], rows contiguous
    return a_cat, b_diag.t().contiguous().to(dtype), tuple(blocks)


class LoraSlots:
    """Where adapters live. Three tiers, each a superset of the next:
    - `paths`: every adapter served (name -> folder), however many;
    - `host`: adapters read into host memory, at most max_cpu_loras, least recently used evicted first
      (an evicted adapter stays served and is read again when a request needs it);
    - `resident`: adapters on the device, at most max_loras, never evicting one the running batch uses.
    Engine thread only."""

    def __init__(
        self,
        max_loras: int,
        max_cpu_loras: int,
        device: torch.device,
        dtype: torch.dtype,
        kernel: LoraKernel | None = None,
    ) -> None:
        self.max_loras = max_loras
        self.max_cpu_loras = max_cpu_loras
        self.device = device
        self.dtype = dtype
        self.kernel = kernel  # the CPU kernel: adapters carry its copy of their weights (LoraAdapter.pack)
        self.paths: dict[str, Path] = {}
        self.host: OrderedDict[str, LoraAdapter] = OrderedDict()
        self.resident: OrderedDict[str, LoraAdapter] = OrderedDict()
        self.version = 0  # bumped whenever `resident` changes (decode graphs hold resident tensors)

    def add(self, adapter: LoraAdapter, in_use: set[str]) -> None:
        """Serve `adapter` (replacing one of the same name), evicting idle host copies beyond the limit."""
        self.remove(adapter.name)
        self.paths[adapter.name] = adapter.path
        self.host[adapter.name] = adapter
        self.trim(in_use | {adapter.name})

    def trim(self, in_use: set[str]) -> None:
        """Evict least recently used host copies beyond max_cpu_loras, sparing those in `in_use`.
        While every copy is in use the limit is exceeded; the next trim brings it back."""
        idle = [n for n in self.host if n not in in_use]
        while len(self.host) > self.max_cpu_loras and idle:
            victim = idle.pop(0)
            del self.host[victim]
            self._drop_resident(victim)
            logger.info("adapter %s evicted from host memory (max_cpu_loras %d)", victim, self.max_cpu_loras)

    def remove(self, name: str) -> None:
        self.paths.pop(name, None)
        self.host.pop(name, None)
        self._drop_resident(name)

    def _drop_resident(self, name: str) -> None:
        if self.resident.pop(name, None) is not None:
            self.version += 1

    def touch(self, name: str) -> None:
        if name in self.host:
            self.host.move_to_end(name)

    def can_join(self, adapter: str | None, active: set[str]) -> bool:
        """A sequence may join the running set if its adapter fits within max_loras distinct adapters."""
        return adapter is None or adapter in active or len(active) < self.max_loras

    def segments(self, spans: list[tuple[str | None, int, int]]) -> SegmentLora:
        """Per-step LoRA segments for token spans [(adapter, start, end)], making each adapter resident."""
        active = {name for name, _, _ in spans if name is not None}
        out, packed = [], []
        for name, start, end in spans:
            if name is not None:
                adapter = self.resident_adapter(name, active)
                out.append(LoraSegment(start, end, adapter.weights))
                if adapter.packed is not None:
                    packed.append((start, end, adapter.packed))
        plan = None
        # A step of base rows alone gets no plan: SegmentLora then has nothing to add, and no kernel call.
        # Every other step takes the kernel whatever its size, so that a row's result never depends on
        # the step it is in (torch's matmuls round otherwise; in bfloat16 they are faster from about 512
        # rows of prompts).
        if self.kernel is not None and packed and len(packed) == len(out):
            plan = self.kernel.plan(packed)
        return SegmentLora(out, plan)

    def resident_adapter(self, name: str, active: set[str]) -> LoraAdapter:
        """`name` on the device; with the slots full, the least recently used one not in `active` goes."""
        adapter = self.resident.get(name)
        if adapter is not None:
            self.resident.move_to_end(name)
            return adapter
        while len(self.resident) >= self.max_loras:
            victim = next(n for n in self.resident if n not in active)
            self._drop_resident(victim)
            logger.debug("adapter %s evicted from the device", victim)
        adapter = self.host[name].to(self.device, self.dtype)  # no copy when already there
        if self.kernel is not None and adapter.packed is None:  # EngineCore.read_adapter packs them first
            adapter = adapter.pack()
        self.resident[name] = adapter
        self.version += 1
        return adapter
