"""Decode-only steps through fixed buffers, captured once per shape as CUDA graphs and replayed.

A step in which every sequence decodes one token is padded up to a bucket size (1, 2, 4, 8, then
multiples of 16) and runs on buffers whose addresses never change: token ids, positions, cache slots,
context lengths, block tables and each row's adapter index. Adapters go through StackedLora (the step's
adapters side by side: one pair of matmuls per projection for all of them, and a mask per row), so the
shapes do not depend on how many rows each adapter has; a graph is keyed by the bucket, the resident
adapters it reads and whether rows need masks. Padding rows point at a block of the KV cache that no
sequence owns. The input token ids may also come from the device (`Carried`): the tokens the step before
sampled, which the host has not read back yet (EngineCore's overlapped steps).

With `capture=False` the same fixed-shape forward runs eagerly, which is how the CPU tests check it
against the ordinary path. Capturing needs decode attention that reads only each row's own blocks (the
Triton ops): the torch gather would copy the whole width of the block table.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from engine.kv_cache import KVCache
from engine.lora import LoraAdapter, LoraSlots
from engine.model.attention import AttentionBatch
from engine.model.llama import Llama, LoraBatch, StackedAdapters, StackedLora
from engine.model.lora_rows import LoraRows, RowsLora, RowsStack
from engine.scheduler import ScheduledSeq

logger = logging.getLogger(__name__)

_IDS, _POSITIONS, _SLOTS, _LENS, _LORA, _SOURCE = range(6)
_VECTORS = 6
GraphKey = tuple[int, tuple[int, ...], bool]


def batch_buckets(max_batch: int) -> list[int]:
    """Padded batch sizes: 1, 2, 4, 8, then multiples of 16, the last one covering max_batch."""
    sizes: list[int] = []
    size = 1
    while True:
        sizes.append(size)
        if size >= max_batch:
            return sizes
        size = size * 2 if size < 16 else size + 16


@dataclass
class Carried:
    """The sampled tokens [m] of a step the host has not read back, and for each item of the next step
    the row among them that holds its input token."""

    tokens: torch.Tensor
    sources: list[int]


@dataclass
class _Entry:
    graph: torch.cuda.CUDAGraph | None
    logits: torch.Tensor | None  # the graph's output buffer [bucket, vocab]
    adapters: tuple[LoraAdapter, ...]
    stacked: StackedAdapters | RowsStack  # the graph reads these tensors: kept alive with it


class DecodeGraphs:
    """Fixed-shape decode steps for one model and KV cache. Engine thread only."""

    def __init__(
        self,
        model: Llama,
        kv: KVCache,
        block_size: int,
        max_batch: int,
        max_model_len: int,
        capture: bool,
        max_graphs: int = 96,
        lora_units: int = 0,
    ) -> None:
        """`lora_units`: max_loras x max_lora_rank, the rank the steps' adapters may hold at once. With
        the Triton ops' LoRA kernels, their A's go under the weights (LoraRows) to ride on the base
        matmuls; else the adapters are stacked for torch matmuls (StackedLora)."""
        self.model = model
        self.kv = kv
        self.block_size = block_size
        self.buckets = batch_buckets(max_batch)
        self.capture = capture
        self.max_graphs = max_graphs
        self.pad_block = kv.num_blocks - 1  # the cache's spare block, which the allocator never hands out
        device = kv.keys[0].device
        rows = self.buckets[-1]
        self.width = -(-max_model_len // block_size)
        # A step of bucket b reads its input vectors as the first 6 b entries ([6, b]) and its block
        # tables as the first b rows, so each is one contiguous copy from the host. The host side is
        # pinned on CUDA, which makes those copies asynchronous (the last step's were done before its
        # logits were read).
        pin = device.type == "cuda"
        self.vectors = torch.zeros(_VECTORS * rows, dtype=torch.long, device=device)
        self.tables = torch.zeros(rows, self.width, dtype=torch.long, device=device)
        self.host_vectors = torch.zeros(_VECTORS * rows, dtype=torch.long, pin_memory=pin)
        self.host_tables = torch.zeros(rows, self.width, dtype=torch.long, pin_memory=pin)
        # Recorded after each step's copies: the next step waits on it before rewriting the host side, in
        # case a step failed before anything waited for its device work.
        self.copied = torch.cuda.Event() if pin else None
        self.entries: OrderedDict[GraphKey, _Entry] = OrderedDict()
        self.stacks: dict[tuple[int, ...], StackedAdapters | RowsStack] = {}  # by the adapters' ids
        self.lora_units = lora_units
        use_rows = model.ops.lora_kernels is not None and lora_units > 0
        self.rows = LoraRows.attach(model, lora_units) if use_rows else None
        self.rows_layout = self.rows.layout if self.rows is not None else 0
        self.pool: Any = None  # the graphs' shared memory pool
        self.lora_version = -1
        self.num_captured = 0
        self.num_replays = 0

    def fits(self, items: list[ScheduledSeq]) -> bool:
        """Whether the step is decode-only and small enough for the largest bucket."""
        return len(items) <= self.buckets[-1] and all(i.num_new_tokens == 1 and i.samples for i in items)

    def run(
        self, items: list[ScheduledSeq], loras: LoraSlots, carried: Carried | None = None
    ) -> torch.Tensor:
        """Logits [len(items), vocab] (float32) for a decode-only step. With `carried`, the items' input
        tokens are taken on the device from the step before, whose tokens the host has not read yet."""
        n = len(items)
        bucket = next(b for b in self.buckets if b >= n)
        names = list(dict.fromkeys(i.seq.adapter for i in items if i.seq.adapter is not None))
        active = set(names)
        adapters = tuple(loras.resident_adapter(name, active) for name in names)
        self._fill(items, bucket, {name: j for j, name in enumerate(names)}, carried)
        need_mask = bool(names) and (len(names) > 1 or any(i.seq.adapter is None for i in items))
        # The rows may also have been laid out again by another DecodeGraphs sharing them (bench.gpu's
        # variants): that changes no LoraSlots version.
        moved = self.rows is not None and self.rows.layout != self.rows_layout
        if loras.version != self.lora_version or moved:
            self._forget_stale(loras)
        ids = tuple(id(a) for a in adapters)
        key = (bucket, ids, need_mask)
        entry = self.entries.get(key)
        if entry is None:
            stacked = self.stacks.get(ids)
            if stacked is None:
                stacked = self._stack(adapters)
                self.stacks[ids] = stacked
            entry = _Entry(None, None, adapters, stacked)
            if self.capture:
                entry.graph, entry.logits = self._capture(bucket, stacked, need_mask)
            self.entries[key] = entry
            if len(self.entries) > self.max_graphs:
                self.entries.popitem(last=False)
                live = {tuple(id(a) for a in e.adapters) for e in self.entries.values()}
                self.stacks = {k: v for k, v in self.stacks.items() if k in live}
        else:
            self.entries.move_to_end(key)
        if entry.graph is None or entry.logits is None:
            return self._forward(bucket, entry.stacked, need_mask)[:n]
        entry.graph.replay()
        self.num_replays += 1
        return entry.logits[:n]

    def _fill(
        self, items: list[ScheduledSeq], bucket: int, lora_index: dict[str, int], carried: Carried | None
    ) -> None:
        """Copy the step's inputs into the fixed buffers; padding rows read and write the spare block."""
        bs = self.block_size
        ids, positions, slots, lens, lora = [], [], [], [], []
        tables: list[list[int]] = []
        for item in items:
            seq, pos = item.seq, item.start
            table = seq.block_table
            ids.append(seq.token_ids[pos])
            positions.append(pos)
            slots.append(table[pos // bs] * bs + pos % bs)
            lens.append(pos + 1)
            lora.append(-1 if seq.adapter is None else lora_index[seq.adapter])
            tables.append(table[: pos // bs + 1])
        pad = bucket - len(items)
        ids += [0] * pad
        positions += [0] * pad
        slots += [self.pad_block * bs] * pad
        lens += [1] * pad
        lora += [-1] * pad
        tables += [[self.pad_block]] * pad
        sources = [0] * bucket if carried is None else carried.sources + [0] * pad
        cols = max(len(t) for t in tables)
        # Columns past a row's own blocks keep stale ids: attention reads only the first `len` positions.
        padded = [t + [self.pad_block] * (cols - len(t)) for t in tables]
        if self.copied is not None:
            self.copied.synchronize()
        size = _VECTORS * bucket
        self.host_vectors[:size] = torch.tensor(ids + positions + slots + lens + lora + sources)
        self.host_tables[:bucket, :cols] = torch.tensor(padded)
        self.vectors[:size].copy_(self.host_vectors[:size], non_blocking=True)
        self.tables[:bucket].copy_(self.host_tables[:bucket], non_blocking=True)
        if self.copied is not None:
            self.copied.record()
        if carried is not None:
            v = self.vectors[:size].view(_VECTORS, bucket)
            n = len(items)
            v[_IDS, :n] = carried.tokens.index_select(0, v[_SOURCE, :n])

    def _stack(self, adapters: tuple[LoraAdapter, ...]) -> StackedAdapters | RowsStack:
        if self.rows is not None:
            return self.rows.stack(list(adapters), self.vectors.device)
        return StackedAdapters.stack([a.weights for a in adapters], self.vectors.device)

    def _forward(self, bucket: int, stacked: StackedAdapters | RowsStack, need_mask: bool) -> torch.Tensor:
        """The fixed-shape step on buffers [:bucket]: logits [bucket, vocab]."""
        v = self.vectors[: _VECTORS * bucket].view(_VECTORS, bucket)
        attn = AttentionBatch(
            block_size=self.block_size,
            slot_mapping=v[_SLOTS],
            decode_rows=None,
            decode_blocks=self.tables[:bucket],
            decode_lens=v[_LENS],
            decode_is_all=True,
            prefills=[],
        )
        ops = self.model.ops
        row_adapter = v[_LORA] if need_mask else None
        lora: LoraBatch
        if isinstance(stacked, RowsStack):
            assert self.rows is not None
            lora = RowsLora(self.rows, stacked, row_adapter, ops.lora_kernels)
        else:
            lora = StackedLora(stacked, row_adapter, self.model.lm_head.dtype)
        hidden = self.model(v[_IDS], v[_POSITIONS], self.kv, attn, lora)
        return self.model.compute_logits(hidden)

    def _capture(
        self, bucket: int, stacked: StackedAdapters | RowsStack, need_mask: bool
    ) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Warm up on a side stream (Triton compiles, cuBLAS picks its kernels), then capture. Running
        the step again on replay is harmless: it writes the same keys and values to the same slots."""
        current = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(current)
        with torch.cuda.stream(side):
            self._forward(bucket, stacked, need_mask)
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._forward(bucket, stacked, need_mask)
        self.pool = graph.pool()
        self.model.in_graphs = True
        self.num_captured += 1
        logger.debug("captured a decode graph: batch %d, %d adapter patterns", bucket, len(stacked.owner_ids))
        return graph, logits

    def _forget_stale(self, loras: LoraSlots) -> None:
        """Drop graphs that read an adapter no longer resident, so its device memory can go."""
        resident = {id(a) for a in loras.resident.values()}
        for key in [k for k, e in self.entries.items() if any(id(a) not in resident for a in e.adapters)]:
            del self.entries[key]
        self.stacks = {ids: s for ids, s in self.stacks.items() if all(i in resident for i in ids)}
        self.lora_version = loras.version
        if self.rows is not None:
            self.rows.place(list(loras.resident.values()))
            if self.rows.layout != self.rows_layout:
                # Adapters moved within the rows: every graph and stack with an adapter read old rows.
                self.entries = OrderedDict((k, e) for k, e in self.entries.items() if not e.adapters)
                self.stacks = {}
                self.rows_layout = self.rows.layout
