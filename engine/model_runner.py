"""Turns one scheduled step into flat tensors, runs the model, and returns the logits of sampling rows."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.kv_cache import KVCache
from engine.lora import LoraSlots
from engine.model.attention import AttentionBatch, DecodeGroup, DecodeWorkspace, PrefillChunk, key_mask
from engine.model.decode_graphs import Carried, DecodeGraphs
from engine.model.llama import Llama
from engine.scheduler import ScheduledSeq, Sequence

# Decode workspaces (torch ops) may hold at most this share of the KV cache's memory, all groups together.
WORKSPACE_SHARE = 0.5


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    attention: AttentionBatch
    sample_rows: torch.Tensor  # [N] flat index of the last token of each sequence that samples
    spans: list[tuple[str | None, int, int]]  # (adapter, start, end) token spans, adapters contiguous


class ModelRunner:
    """Owns the model and the KV tensors. `items` must be ordered so that equal adapters are adjacent.
    The KV cache's last block is kept spare for the padding rows of fixed-shape decode steps."""

    def __init__(self, model: Llama, kv: KVCache, block_size: int, device: torch.device) -> None:
        self.model = model
        self.kv = kv
        self.block_size = block_size
        self.device = device
        self.graphs: DecodeGraphs | None = None
        self.num_steps = 0  # forwards run
        # Torch ops: each decode group's workspace, by the group's sequences in row order.
        self.workspaces: dict[tuple[Sequence, ...], DecodeWorkspace] = {}
        cache = kv.keys[0]
        self._position_bytes = cache[0].numel() * cache.element_size()
        self.workspace_budget = int(WORKSPACE_SHARE * 2 * len(kv.keys) * cache.numel() * cache.element_size())

    def runs_fixed(self, items: list[ScheduledSeq]) -> bool:
        """Whether the step goes through the fixed-shape decode buffers."""
        return self.graphs is not None and self.graphs.fits(items)

    def use_fixed_decode(
        self, max_batch: int, max_model_len: int, capture: bool, lora_units: int = 0
    ) -> None:
        """Run decode-only steps through fixed buffers; `capture` replays them as CUDA graphs. `lora_units`:
        max_loras x max_lora_rank (see DecodeGraphs)."""
        self.graphs = DecodeGraphs(
            self.model, self.kv, self.block_size, max_batch, max_model_len, capture, lora_units=lora_units
        )

    @torch.inference_mode()
    def run(
        self, items: list[ScheduledSeq], loras: LoraSlots, carried: Carried | None = None
    ) -> torch.Tensor:
        """Forward the step; returns logits [N, vocab] (float32) for the items that sample, in order.
        `carried` (fixed-shape decode steps only): the input tokens are still on the device."""
        self.num_steps += 1
        if self.runs_fixed(items):
            assert self.graphs is not None
            return self.graphs.run(items, loras, carried)
        assert carried is None, "only fixed-shape decode steps take their tokens from the device"
        inputs = self.prepare(items)
        segments = loras.segments(inputs.spans)
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv, inputs.attention, segments)
        return self.model.compute_logits(hidden[inputs.sample_rows])

    def prepare(self, items: list[ScheduledSeq]) -> StepInputs:
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        spans: list[tuple[str | None, int, int]] = []
        decode_items: list[tuple[int, ScheduledSeq]] = []
        prefills: list[PrefillChunk] = []
        bs = self.block_size
        for item in items:
            seq, start, n = item.seq, item.start, item.num_new_tokens
            row = len(ids)
            ids.extend(seq.token_ids[start : start + n])
            table = seq.block_table
            for pos in range(start, start + n):
                positions.append(pos)
                slots.append(table[pos // bs] * bs + pos % bs)
            if n == 1:
                decode_items.append((row, item))
            else:
                blocks = table[: -(-(start + n) // bs)]
                prefills.append(
                    PrefillChunk(row, n, torch.tensor(blocks, device=self.device), start + n, start == 0)
                )
            if item.samples:
                sample_rows.append(row + n - 1)
            if spans and spans[-1][0] == seq.adapter:
                spans[-1] = (seq.adapter, spans[-1][1], row + n)
            else:
                spans.append((seq.adapter, row, row + n))
        attention = self._attention_batch(slots, decode_items, prefills, len(ids))
        dev = self.device
        return StepInputs(
            input_ids=torch.tensor(ids, dtype=torch.long, device=dev),
            positions=torch.tensor(positions, dtype=torch.long, device=dev),
            attention=attention,
            sample_rows=torch.tensor(sample_rows, dtype=torch.long, device=dev),
            spans=spans,
        )

    def _attention_batch(
        self,
        slots: list[int],
        decode_items: list[tuple[int, ScheduledSeq]],
        prefills: list[PrefillChunk],
        num_tokens: int,
    ) -> AttentionBatch:
        dev = self.device
        decode_rows = decode_blocks = decode_lens = None
        groups: list[DecodeGroup] | None = None
        if not decode_items:
            self.workspaces = {}  # workspaces carry on only from one decode step to the next
        else:
            lengths = [item.start + 1 for _, item in decode_items]
            if self.model.ops.reads_in_place:
                width = -(-max(lengths) // self.block_size)
                tables = [item.seq.block_table for _, item in decode_items]
                decode_blocks = self._block_tensor(tables, width)  # [B, width]
                decode_lens = torch.tensor(lengths, dtype=torch.long, device=dev)
            else:
                groups = self._decode_groups(lengths, [item.seq for _, item in decode_items])
            decode_rows = torch.tensor([row for row, _ in decode_items], dtype=torch.long, device=dev)
        return AttentionBatch(
            block_size=self.block_size,
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            decode_rows=decode_rows,
            decode_blocks=decode_blocks,
            decode_lens=decode_lens,
            decode_is_all=len(decode_items) == num_tokens,
            prefills=prefills,
            decode_groups=groups,
        )

    def _decode_groups(self, lengths: list[int], seqs: list[Sequence]) -> list[DecodeGroup]:
        """The decode rows in groups (_split), each with its workspace."""
        n, bs = len(lengths), self.block_size
        parts = self._split(lengths, seqs)
        groups = []
        workspaces: dict[tuple[Sequence, ...], DecodeWorkspace] = {}
        budget = self.workspace_budget
        for part in parts:
            lens = [lengths[i] for i in part]
            width = -(-max(lens) // bs)
            members = tuple(seqs[i] for i in part)
            workspace = self._plan_workspace(members, lens, width, budget)
            if workspace is not None:
                workspaces[members] = workspace
                budget -= workspace.keys.nbytes + workspace.values.nbytes
            groups.append(
                DecodeGroup(
                    index=None
                    if part == list(range(n))
                    else torch.tensor(part, dtype=torch.long, device=self.device),
                    blocks=self._block_tensor([seqs[i].block_table for i in part], width),
                    mask=key_mask(torch.tensor(lens, dtype=torch.long, device=self.device), width * bs),
                    workspace=workspace,
                )
            )
        self.workspaces = workspaces  # the groups of earlier steps that did not carry on are let go
        return groups

    def _split(self, lengths: list[int], seqs: list[Sequence]) -> list[list[int]]:
        """Row indices per group: the last step's groups while their workspaces carry on (the same
        sequences, none joined or left); else one group, or two (short and long contexts) when that
        cuts the padded keys attention reads by a quarter or more."""
        n, bs = len(lengths), self.block_size
        row_of = {seq: i for i, seq in enumerate(seqs)}
        carried = [[row_of.get(seq, -1) for seq in members] for members in self.workspaces]
        if sum(map(len, carried)) == n and all(i >= 0 for part in carried for i in part):
            return carried
        if n >= 4:
            order = sorted(range(n), key=lengths.__getitem__)
            blocks = [-(-lengths[i] // bs) for i in order]
            cost, split = min((k * blocks[k - 1] + (n - k) * blocks[-1], k) for k in range(1, n))
            if cost <= 0.75 * n * blocks[-1]:
                return [order[:split], order[split:]]
        return [list(range(n))]

    def _plan_workspace(
        self, members: tuple[Sequence, ...], lens: list[int], width: int, budget: int
    ) -> DecodeWorkspace | None:
        """The group's workspace from the last step when it decodes the same sequences one token further
        and has room; a new one to refill otherwise; None when a new one would not fit the budget."""
        bs, num_layers = self.block_size, len(self.kv.keys)
        workspace = self.workspaces.get(members)
        if (
            workspace is not None
            and width * bs <= workspace.capacity
            and all(new == old + 1 for new, old in zip(lens, workspace.lens, strict=True))
        ):
            workspace.plan(lens, width * bs, refill=False)
            return workspace
        # Room for a quarter more blocks (at least four) before the next refill.
        capacity = (width + max(4, width // 4)) * bs
        if DecodeWorkspace.nbytes(len(members), capacity, num_layers, self._position_bytes) > budget:
            return None
        workspace = DecodeWorkspace(len(members), capacity, num_layers, self.kv.keys[0])
        workspace.plan(lens, width * bs, refill=True)
        return workspace

    def _block_tensor(self, tables: list[list[int]], width: int) -> torch.Tensor:
        """[len(tables), width] long: each block table cut or padded with 0 to `width` blocks."""
        rows = [t[:width] + [0] * (width - len(t[:width])) for t in tables]
        return torch.tensor(rows, dtype=torch.long, device=self.device)
