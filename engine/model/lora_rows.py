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
            assert rows is None, "the rows are made once, before any graph reads the weights"
            rows = cls(model, units)
            model.lora_rows = rows
            logger.info("LoRA rows under the weights: %d rank units", units)
        return rows

    def place(self, adapters: list[LoraAdapter]) -> bool:
        """Give each adapter rows and write its A's there, keeping those already placed where they are.
        Returns True when earlier placements had to move (everything was laid out again), so that
        anything holding the old rows' positions must be dropped."""
        assert sum(a.rank for a in adapters) <= self.units, (
            "more resident rank than max_loras x max_lora_rank"
        )
        live = {id(a) for a in adapters}
        self.placed = {k: v for k, v in self.placed.items() if k in live}
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
        """What a step with these adapters (placed, in the step's order) reads, per layer and projection:
        the span of rows that covers them, their B^T's over that span (zero between adapters) and each
        row's owner (the adapter's position, -2 where no adapter of the step owns the row)."""
        layers: list[dict[str, tuple[int, int, torch.Tensor, tuple[int, ...]]]] = []
        for layer in range(len(self.buffers)):
            specs = {}
            for fused in FUSED:
                parts = [
                    (j, self._first_row(layer, fused, self.unit_of(a)), a.weights[layer][fused])
                    for j, a in enumerate(adapters)
                    if fused in a.weights[layer]
                ]
                if not parts:
                    continue
                lo = min(first for _, first, _ in parts)
                hi = max(first + a.shape[0] for _, first, (a, _) in parts)
                if len(parts) == 1:
                    b_t = parts[0][2][1]
                else:
                    b_t = torch.zeros(
                        hi - lo, parts[0][2][1].shape[1], dtype=parts[0][2][1].dtype, device=device
                    )
                owners = [-2] * (hi - lo)
                for j, first, (a, b) in parts:
                    if len(parts) > 1:
                        b_t[first - lo : first - lo + a.shape[0]] = b
                    owners[first - lo : first - lo + a.shape[0]] = [j] * a.shape[0]
                specs[fused] = (lo, hi, b_t, tuple(owners))
            layers.append(specs)
        patterns = {spec[3] for layer in layers for spec in layer.values()}
        owner_ids = {p: torch.tensor(p, dtype=torch.long, device=device) for p in patterns}
        return RowsStack(layers, owner_ids)


@dataclass
class RowsStack:
    """Per layer and fused projection: (first row, end row, B^T over those rows, owner pattern)."""

    layers: list[dict[str, tuple[int, int, torch.Tensor, tuple[int, ...]]]]
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

    def down(self, gate_up: torch.Tensor, weight: torch.Tensor, layer: int, ops: TorchOps) -> torch.Tensor:
        return self._with_rows(ops.silu_mul_linear, gate_up, weight, layer, "down")

    def _with_rows(
        self,
        matmul: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        x: torch.Tensor,
        weight: torch.Tensor,
        layer: int,
        fused: str,
    ) -> torch.Tensor:
        spec = self.stack.layers[layer].get(fused) if self.stack.layers else None
        if spec is None:
            return matmul(x, weight)
        lo, hi, b_t, pattern = spec
        y = matmul(x, self.rows.buffers[layer][fused][:hi])
        n = weight.shape[0]
        owners = self.stack.owner_ids[pattern] if self.row_adapter is not None else None
        return self.kernels.lora_expand(y[:, :n], y[:, lo:hi], b_t, self.row_adapter, owners)

    def add_delta(self, y: torch.Tensor, x: torch.Tensor, layer: int, fused: str) -> None:
        raise NotImplementedError("RowsLora adds its deltas in linear()")
