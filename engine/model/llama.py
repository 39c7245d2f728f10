"""A compact LLaMA for serving: flat token batches, paged KV cache, batched multi-LoRA.

Loads any Hugging Face LLaMA folder (config.json + safetensors or .bin). q/k/v and gate/up are fused
into one matmul each. Every step works on T flattened tokens of many sequences:
    input_ids [T] -> embeddings [T, hidden] -> layers -> hidden [T, hidden]
and logits are computed only for the rows that sample.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.kv_cache import KVCache
from engine.model.attention import AttentionBatch, paged_attention
from engine.model.lora_cpu import StepPlan
from engine.model.ops import TorchOps, ops_for

logger = logging.getLogger(__name__)

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Fused projection -> the HF projections it stacks, in row order.
FUSED = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}
_FUSED_INDEX = {fused: i for i, fused in enumerate(FUSED)}


@dataclass(frozen=True)
class LlamaArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    max_position_embeddings: int

    @classmethod
    def from_folder(cls, path: Path) -> LlamaArgs:
        """Read config.json through transformers' config class, which normalises old and new layouts."""
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(path)
        if cfg.model_type != "llama":
            raise ValueError(f"only LLaMA checkpoints are supported, got model_type={cfg.model_type!r}")
        if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
            raise ValueError("LLaMA variants with attention or MLP biases are not supported")
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported activation {cfg.hidden_act!r}")
        rope = dict(getattr(cfg, "rope_parameters", None) or {})
        if "rope_theta" not in rope:
            rope["rope_theta"] = getattr(cfg, "rope_theta", 10000.0)
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"rope scaling {rope.get('rope_type')!r} is not supported")
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cls(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_layers=cfg.num_hidden_layers,
            num_heads=cfg.num_attention_heads,
            num_kv_heads=cfg.num_key_value_heads or cfg.num_attention_heads,
            head_dim=head_dim,
            rope_theta=float(rope["rope_theta"]),
            rms_norm_eps=cfg.rms_norm_eps,
            tie_word_embeddings=bool(cfg.tie_word_embeddings),
            max_position_embeddings=cfg.max_position_embeddings,
        )

    def out_features(self, proj: str) -> int:
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        sizes = {
            "q_proj": q,
            "k_proj": kv,
            "v_proj": kv,
            "o_proj": self.hidden_size,
            "gate_proj": self.intermediate_size,
            "up_proj": self.intermediate_size,
            "down_proj": self.hidden_size,
        }
        return sizes[proj]

    def in_features(self, proj: str) -> int:
        if proj == "o_proj":
            return self.num_heads * self.head_dim
        if proj == "down_proj":
            return self.intermediate_size
        return self.hidden_size


LayerLora = list[dict[str, tuple[torch.Tensor, torch.Tensor]]]


@dataclass
class LoraSegment:
    """Tokens [start, end) of the flat batch use one adapter.

    `weights[layer][fused]` = (A [r, in], B^T [r, out]) with the scaling folded into B; a missing key means
    the adapter does not touch that projection."""

    start: int
    end: int
    weights: LayerLora


class LoraBatch:
    """How one step's tokens use adapters: adds each token's low-rank delta to a projection's output."""

    def add_delta(self, y: torch.Tensor, x: torch.Tensor, layer: int, fused: str) -> None:
        raise NotImplementedError

    def linear(
        self, x: torch.Tensor, weight: torch.Tensor, layer: int, fused: str, ops: TorchOps
    ) -> torch.Tensor:
        """y = x W^T plus the adapters' low-rank deltas."""
        y = ops.linear(x, weight)
        self.add_delta(y, x, layer, fused)
        return y


class SegmentLora(LoraBatch):
    """Tokens grouped by adapter into contiguous segments. With `plan` (the CPU kernel, every segment's
    adapter packed), one kernel call per projection covers all segments; else one pair of matmuls per
    segment."""

    def __init__(self, segments: list[LoraSegment], plan: StepPlan | None = None) -> None:
        self.segments = segments
        self.plan = plan

    def add_delta(self, y: torch.Tensor, x: torch.Tensor, layer: int, fused: str) -> None:
        if self.plan is not None and self.plan.accepts(x, y):
            self.plan.add(y, x, layer * len(FUSED) + _FUSED_INDEX[fused])
            return
        for seg in self.segments:
            pair = seg.weights[layer].get(fused)
            if pair is not None:
                a, b_t = pair
                y[seg.start : seg.end].addmm_(x[seg.start : seg.end] @ a.t(), b_t)


@dataclass
class StackedAdapters:
    """Several adapters side by side: per layer and fused projection, their A's stacked along the rank
    ([sum r, in]) and their B^T's too ([sum r, out]); `owners` names the adapter (its position) of each
    rank column, and `owner_ids` holds each distinct pattern on the device. A stack of several adapters
    is a copy of their weights; where only one adapter touches a projection, its tensors are used as
    they are."""

    weights: LayerLora
    owners: list[dict[str, tuple[int, ...]]]
    owner_ids: dict[tuple[int, ...], torch.Tensor]

    @classmethod
    def stack(cls, adapters: list[LayerLora], device: torch.device) -> StackedAdapters:
        weights: LayerLora = []
        owners: list[dict[str, tuple[int, ...]]] = []
        for layer in range(len(adapters[0]) if adapters else 0):
            layer_weights, layer_owners = {}, {}
            for fused in FUSED:
                parts = [(j, w[layer][fused]) for j, w in enumerate(adapters) if fused in w[layer]]
                if len(parts) == 1:  # one adapter: its own tensors, no copy
                    layer_weights[fused] = parts[0][1]
                elif parts:
                    layer_weights[fused] = (
                        torch.cat([a for _, (a, _) in parts]),
                        torch.cat([b for _, (_, b) in parts]),
                    )
                if parts:
                    layer_owners[fused] = tuple(j for j, (a, _) in parts for _ in range(a.shape[0]))
            weights.append(layer_weights)
            owners.append(layer_owners)
        patterns = {p for layer in owners for p in layer.values()}
        owner_ids = {p: torch.tensor(p, dtype=torch.long, device=device) for p in patterns}
        return cls(weights, owners, owner_ids)


class StackedLora(LoraBatch):
    """Fixed shapes for CUDA graphs on the torch ops: one pair of matmuls per projection covers every
    adapter of the step (StackedAdapters); a [T, sum r] mask keeps each row's own adapter's columns. With
    `row_adapter` None every row that matters uses the one adapter and no mask is needed. (The Triton ops
    use lora_rows.RowsLora instead.)"""

    def __init__(
        self, stacked: StackedAdapters, row_adapter: torch.Tensor | None, dtype: torch.dtype
    ) -> None:
        self.stacked = stacked
        # One mask per distinct column pattern, made once per step and shared by the layers.
        self.masks: dict[tuple[int, ...], torch.Tensor] | None = None
        if row_adapter is not None:
            self.masks = {
                p: (row_adapter[:, None] == ids[None, :]).to(dtype) for p, ids in stacked.owner_ids.items()
            }

    def add_delta(self, y: torch.Tensor, x: torch.Tensor, layer: int, fused: str) -> None:
        if not self.stacked.weights:  # no adapter in the step
            return
        pair = self.stacked.weights[layer].get(fused)
        if pair is None:
            return
        a, b_t = pair
        low = x @ a.t()
        if self.masks is not None:
            low = low * self.masks[self.stacked.owners[layer][fused]]
        y.addmm_(low, b_t)


class RMSNorm(nn.Module):
    """Holds the norm's weight; the model's ops compute it."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))


class Rotary(nn.Module):
    """Rotary embeddings in HF's rotate-half layout, cos/sin cached for every position."""

    cos: torch.Tensor
    sin: torch.Tensor

    def __init__(self, head_dim: int, theta: float, max_len: int) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)  # [max_len, head_dim]
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> (cos, sin), each [T, 1, head_dim]: looked up once per step for all layers."""
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype)


class Block(nn.Module):
    def __init__(self, args: LlamaArgs, layer: int) -> None:
        super().__init__()
        self.args = args
        self.layer = layer
        q_out = args.num_heads * args.head_dim
        kv_out = args.num_kv_heads * args.head_dim
        self.attn_norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp_norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.qkv = nn.Parameter(torch.empty(q_out + 2 * kv_out, args.hidden_size), requires_grad=False)
        self.o = nn.Parameter(torch.empty(args.hidden_size, q_out), requires_grad=False)
        self.gate_up = nn.Parameter(
            torch.empty(2 * args.intermediate_size, args.hidden_size), requires_grad=False
        )
        self.down = nn.Parameter(torch.empty(args.hidden_size, args.intermediate_size), requires_grad=False)

    def forward(
        self,
        x: torch.Tensor,
        delta: torch.Tensor | None,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv: KVCache,
        attn: AttentionBatch,
        lora: LoraBatch,
        ops: TorchOps,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual, delta) -> (residual, delta) of the next layer: the MLP's output is added to the
        residual by the next layer's fused add + norm, not by a launch of its own."""
        a = self.args
        if delta is None:
            h = ops.rms_norm(x, self.attn_norm.weight, self.attn_norm.eps)
        else:
            x, h = ops.add_rms_norm(x, delta, self.attn_norm.weight, self.attn_norm.eps)
        qkv = lora.linear(h, self.qkv, self.layer, "qkv", ops)
        keys, values = kv.keys[self.layer], kv.values[self.layer]
        q, k, v = ops.rotary_store(qkv, *rope, keys, values, attn.slot_mapping, a.num_heads, a.num_kv_heads)
        o = paged_attention(q, k, v, keys, values, attn, ops.decode_attention, self.layer)  # [T, q_out]
        x, h = ops.add_rms_norm(
            x, lora.linear(o, self.o, self.layer, "o", ops), self.mlp_norm.weight, self.mlp_norm.eps
        )
        gate_up = lora.linear(h, self.gate_up, self.layer, "gate_up", ops)
        return x, lora.linear(ops.silu_mul(gate_up), self.down, self.layer, "down", ops)


class Llama(nn.Module):
    def __init__(self, args: LlamaArgs, max_len: int) -> None:
        super().__init__()
        self.args = args
        self.embed = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = nn.Parameter(torch.empty(args.vocab_size, args.hidden_size), requires_grad=False)
        self.rotary = Rotary(args.head_dim, args.rope_theta, max_len)
        self.ops: TorchOps = TorchOps()
        # lora_rows.LoraRows, once fixed-shape steps put the adapters' A's under the weights.
        self.lora_rows: Any = None
        # Set when a CUDA graph captures the weights' addresses: from then on they stay put.
        self.in_graphs = False
        self.requires_grad_(False)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv: KVCache,
        attn: AttentionBatch,
        lora: LoraBatch,
    ) -> torch.Tensor:
        """input_ids, positions: [T] -> final hidden states [T, hidden] (norm not yet applied)."""
        x = self.embed(input_ids)
        rope = self.rotary(positions, x.dtype)
        delta: torch.Tensor | None = None
        for block in self.layers:
            x, delta = block(x, delta, rope, kv, attn, lora, self.ops)
        return x if delta is None else x + delta

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> logits [N, vocab] in float32."""
        normed = self.ops.rms_norm(hidden.contiguous(), self.norm.weight, self.norm.eps)
        return self.ops.linear(normed, self.lm_head).float()

    def projections(self) -> list[torch.Tensor]:
        """The weights the model multiplies by: every layer's four fused projections and the LM head."""
        weights: list[torch.Tensor] = [self.lm_head]
        for block in self.layers:
            assert isinstance(block, Block)
            weights += [block.qkv, block.o, block.gate_up, block.down]
        return weights


def load_llama(path: Path, dtype: torch.dtype, device: torch.device, max_len: int) -> Llama:
    """Build the module on the meta device, then fill it from the checkpoint's tensors."""
    args = LlamaArgs.from_folder(path)
    with torch.device("meta"):
        model = Llama(args, max_len)
    state = _read_state_dict(path)
    params: dict[str, torch.Tensor] = {
        "embed.weight": state.pop("model.embed_tokens.weight"),
        "norm.weight": state.pop("model.norm.weight"),
    }
    lm_head = state.pop("lm_head.weight", None)
    params["lm_head"] = params["embed.weight"] if lm_head is None or args.tie_word_embeddings else lm_head
    for i in range(args.num_layers):
        p = f"model.layers.{i}."
        take = state.pop
        params[f"layers.{i}.attn_norm.weight"] = take(p + "input_layernorm.weight")
        params[f"layers.{i}.mlp_norm.weight"] = take(p + "post_attention_layernorm.weight")
        params[f"layers.{i}.qkv"] = torch.cat([take(p + f"self_attn.{n}.weight") for n in FUSED["qkv"][:3]])
        params[f"layers.{i}.o"] = take(p + "self_attn.o_proj.weight")
        params[f"layers.{i}.gate_up"] = torch.cat([take(p + f"mlp.{n}.weight") for n in FUSED["gate_up"]])
        params[f"layers.{i}.down"] = take(p + "mlp.down_proj.weight")
    leftover = [k for k in state if "rotary_emb" not in k]
    if leftover:
        raise ValueError(f"unexpected tensors in checkpoint: {leftover[:5]}")
    model.load_state_dict({k: v.to(dtype) for k, v in params.items()}, strict=False, assign=True)
    model.rotary = Rotary(args.head_dim, args.rope_theta, max_len)
    model.to(device)
    projections = model.projections()
    model.ops = ops_for(device, dtype, sum(w.numel() * w.element_size() for w in projections))
    model.ops.pack(projections)
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"checkpoint lacks tensors for: {missing[:5]}")
    logger.info(
        "loaded LLaMA %s (%d layers, hidden %d) in %s, %s ops",
        path.name,
        args.num_layers,
        args.hidden_size,
        dtype,
        model.ops.name,
    )
    return model


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder: safetensors (one or sharded), or .bin read without pickle code."""
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        index = path / "pytorch_model.bin.index.json"
        if index.exists():
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            files = [path / n for n in names]
        else:
            files = sorted(path.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(f"no safetensors or pytorch_model*.bin weights in {path.name}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        if f.suffix == ".safetensors":
            state.update(load_file(str(f)))
        else:
            state.update(torch.load(f, map_location="cpu", weights_only=True))
    return state
