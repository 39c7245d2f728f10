"""The resident adapters' A's as extra rows under the base weights, for the fixed-shape decode steps.

A projection's matmul then runs over the weight and the rows below it, so one launch gives both x W^T and
every resident adapter's x A^T: the LoRA shrink needs no launch of its own, and the step adds each row's
delta with one expand launch per projection (triton_ops.lora_expand). On an H200 this took 2-6 us per
7B projection at 1 and 64 rows against 11-15 us for a separate shrink, mask and addmm (bench/README.md).

The rows are laid out in rank units: the capacity is max_loras x max_lora_rank units, an adapter of rank r
holds r consecutive units, and unit u of a fused projection of P parts is its rows P u .. P u + P - 1.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from engine.lora import LoraAdapter
from engine.model.llama import FUSED, Block, Llama, LoraBatch
from engine.model.ops import TorchOps

logger = logging.getLogger(__name__)


class LoraRows:
    """Spare rows under each layer's four fused weights; a placement of adapters in them. The model's
    weight parameters become views of the first rows, so nothing else changes. Engine thread only."""

    def __init__(self, model: Llama, units: int) -> None:
        self.units = units
        self.buffers: list[dict[str, torch.Tensor]] = []
        for block in model.layers:
            assert isinstance(block, Block)
            layer: dict[str, torch.Tensor] = {}
            for fused, parts in FUSED.items():
                weight = getattr(block, fused)
                rows = torch.zeros(
                    weight.shape[0] + len(parts) * units,
                    weight.shape[1],
                    dtype=weight.dtype,
                    device=weight.device,
                )
                rows[: weight.shape[0]] = weight
                setattr(block, fused, nn.Parameter(rows[: weight.shape[0]], requires_grad=False))
                layer[fused] = rows
            self.buffers.append(layer)
        # id -> (adapter, its first unit). Holding the adapter keeps its id from passing to another.
        self.placed: dict[int, tuple[LoraAdapter, int]] = {}
        self.layout = 0  # counts the times everything was laid out again

    @classmethod
    def attach(cls, model: Llama, units: int) -> LoraRows:
        """The model's rows, made on first use (a copy of each weight, one projection at a time)."""
        rows = model.lora_rows
        if rows is None or rows.units < units:
            # Making the rows moves every weight: no graph may have read them yet.
            if rows is not None or model.in_graphs:
                raise RuntimeError("LoRA rows are made once, before any CUDA graph reads the weights")
            rows = cls(model, units)
            model.lora_rows = rows
            logger.info("LoRA rows under the weights: %d rank units", units)
        return rows

    def place(self, adapters: list[LoraAdapter]) -> bool:
        """Give each adapter rows and write its A's there, keeping those already placed where they are.
        Returns True when earlier placements had to move (everything was laid out again). `layout`
        changes whenever an adapter moved or left, so that anything holding rows' positions must go."""
        assert sum(a.rank for a in adapters) <= self.units, (
            "more resident rank than max_loras x max_lora_rank"
        )
        live = {id(a) for a in adapters}
        if any(k not in live for k in self.placed):
            # Whatever read the rows of an adapter that left may not be told by its own means (another
            # DecodeGraphs may place the same adapter elsewhere later): count it as a new layout.
            self.placed = {k: v for k, v in self.placed.items() if k in live}
            self.layout += 1
        for adapter in adapters:
            if id(adapter) in self.placed:
                continue
            unit = self._free_units(adapter.rank)
            if unit is None:  # fragmented: lay every adapter out again, in order
                self.placed = {}
                self.layout += 1
                unit = 0
                for a in adapters:
                    self._write(a, unit)
                    unit += a.rank
                return True
            self._write(adapter, unit)
        return False

    def unit_of(self, adapter: LoraAdapter) -> int:
        return self.placed[id(adapter)][1]

    def _free_units(self, rank: int) -> int | None:
        end = 0
        for start, r in sorted((unit, a.rank) for a, unit in self.placed.values()):
            if start - end >= rank:
                return end
            end = start + r
        return end if self.units - end >= rank else None

    def _write(self, adapter: LoraAdapter, unit: int) -> None:
        for layer, weights in enumerate(adapter.weights):
            for fused, (a, _) in weights.items():
                first = self._first_row(layer, fused, unit)
                self.buffers[layer][fused][first : first + a.shape[0]] = a
        self.placed[id(adapter)] = (adapter, unit)

    def _first_row(self, layer: int, fused: str, unit: int) -> int:
        """The buffer row where unit `unit` of a fused projection begins."""
        base = self.buffers[layer][fused].shape[0] - len(FUSED[fused]) * self.units
        return base + len(FUSED[fused]) * unit

    def stack(self, adapters: list[LoraAdapter], device: torch.device) -> RowsStack:
        """What a step with these adapters (placed, in the step's order) reads, per layer and projection
        (RowsSpec). Its B^T's are copied side by side only where several adapters share a projection."""
        layers: list[dict[str, RowsSpec]] = []
        for layer in range(len(self.buffers)):
            specs = {}
            for fused in FUSED:
                parts = sorted(
                    (self._first_row(layer, fused, self.unit_of(a)), j, a.weights[layer][fused])
                    for j, a in enumerate(adapters)
                    if fused in a.weights[layer]
                )
                if not parts:
                    continue
                lo = parts[0][0]
                hi = max(first + a.shape[0] for first, _, (a, _) in parts)
                owners, index = [-2] * (hi - lo), [-1] * (hi - lo)
                taken = 0
                for first, j, (a, _) in parts:
                    rows = range(first - lo, first - lo + a.shape[0])
                    owners[rows.start : rows.stop] = [j] * len(rows)
                    index[rows.start : rows.stop] = range(taken, taken + len(rows))
                    taken += len(rows)
                b_t = parts[0][2][1] if len(parts) == 1 else torch.cat([b for _, _, (_, b) in parts])
                gaps = taken < hi - lo  # rows of other adapters (or none) lie between the step's
                specs[fused] = RowsSpec(lo, hi, b_t, tuple(owners), tuple(index) if gaps else None)
            layers.append(specs)
        patterns = {spec.owners for layer in layers for spec in layer.values()}
        patterns |= {spec.index for layer in layers for spec in layer.values() if spec.index is not None}
        return RowsStack(layers, {p: torch.tensor(p, dtype=torch.long, device=device) for p in patterns})


@dataclass(frozen=True)
class RowsSpec:
    """One projection of a step: buffer rows [lo, hi) hold its adapters' A's (and any other rows between
    them); b_t holds their B^T's in row order with nothing between; `owners` gives each row's adapter (its
    position in the step, -2 for none) and `index` its row in b_t (-1 for none) where rows lie between."""

    lo: int
    hi: int
    b_t: torch.Tensor
    owners: tuple[int, ...]
    index: tuple[int, ...] | None


@dataclass
class RowsStack:
    """Per layer and fused projection, what a step reads (RowsSpec); `owner_ids` holds each distinct
    owner and index pattern on the device (the name StackedAdapters gives its patterns)."""

    layers: list[dict[str, RowsSpec]]
    owner_ids: dict[tuple[int, ...], torch.Tensor]


class RowsLora(LoraBatch):
    """A fixed-shape step's adapters through LoraRows: one matmul over each weight and its rows, then one
    expand that adds the delta of each row's own adapter (`row_adapter` None: every row uses the step's
    one adapter, unmasked)."""

    def __init__(
        self, rows: LoraRows, stack: RowsStack, row_adapter: torch.Tensor | None, kernels: Any
    ) -> None:
        self.rows = rows
        self.stack = stack
        self.row_adapter = row_adapter
        self.kernels = kernels

    def linear(
        self, x: torch.Tensor, weight: torch.Tensor, layer: int, fused: str, ops: TorchOps
    ) -> torch.Tensor:
        return self._with_rows(ops.linear, x, weight, layer, fused)

    def _with_rows(
        self,
        matmul: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        x: torch.Tensor,
        weight: torch.Tensor,
        layer: int,
        fused: str,
    ) -> torch.Tensor:
        spec = self.stack.layers[layer].get(fused)
        if spec is None:
            return matmul(x, weight)
        y = matmul(x, self.rows.buffers[layer][fused][: spec.hi])
        n, ids = weight.shape[0], self.stack.owner_ids
        owners = ids[spec.owners] if self.row_adapter is not None else None
        index = ids[spec.index] if spec.index is not None else None
        return self.kernels.lora_expand(
            y[:, :n], y[:, spec.lo : spec.hi], spec.b_t, self.row_adapter, owners, index
        )

    def add_delta(self, y: torch.Tensor, x: torch.Tensor, layer: int, fused: str) -> None:
        raise NotImplementedError("RowsLora adds its deltas in linear()")
