"""Attention over the paged KV cache for a flat batch of tokens from many sequences.

New keys/values are already in their slots (the ops' rotary_store writes them); decode tokens (one query
per sequence) are attended in one batch by the ops' decode attention, and prefill chunks one sequence at a
time. The torch decode attends keys copied out of the cache into a contiguous workspace that lives from
step to step (DecodeWorkspace), through scaled_dot_product_attention; the Triton one reads the slots in
place.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# (q [B, H, D], this step's k and v of the same rows [B, Hkv, D], k_cache, v_cache, batch, layer) -> [B, H, D]
DecodeFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, "AttentionBatch", int],
    torch.Tensor,
]


@dataclass
class PrefillChunk:
    """Query tokens [start, start + num_tokens) of the flat batch; keys are the first `context_len`
    positions held in `blocks` (this chunk included). `fresh` means the chunk starts at position 0, so
    its own keys are the whole context and no gather is needed."""

    start: int
    num_tokens: int
    blocks: torch.Tensor  # [num_blocks] long: the sequence's block table, as far as the context reaches
    context_len: int
    fresh: bool


class DecodeWorkspace:
    """The cached keys and values of one group of decoding sequences, kept contiguous from one step to the
    next: per layer [rows, capacity, Hkv, D], zeros beyond what was ever written.

    Without it a decode step copies every cached block of its sequences out of the paged cache, in every
    layer. A workspace makes that copy once (`refill`); while the next steps decode the same sequences in
    the same order, each one token further, they only write their new key and value into it. Any other
    step refills, a step run again after a failure included (its lengths did not grow). The model runner
    decides which (ModelRunner._plan_workspace)."""

    def __init__(self, rows: int, capacity: int, num_layers: int, cache: torch.Tensor) -> None:
        """`cache`: one layer's key cache [slots, Hkv, D], for the shape, dtype and device."""
        self.rows = rows
        self.capacity = capacity
        self.keys = cache.new_zeros(num_layers, rows, capacity, *cache.shape[1:])
        self.values = torch.zeros_like(self.keys)
        self.refill = True  # this step copies the blocks in; otherwise it appends at `slots`
        self.slots = torch.empty(0, dtype=torch.long)  # [rows] flat positions of this step's new keys
        self.lens: list[int] = []  # the rows' context lengths in the step last planned

    @staticmethod
    def nbytes(rows: int, capacity: int, num_layers: int, row_bytes: int) -> int:
        """Memory of a workspace; `row_bytes` is one position's key bytes (Hkv * D * element size)."""
        return 2 * num_layers * rows * capacity * row_bytes

    def plan(self, lens: list[int], width: int, refill: bool) -> None:
        """Set up this step: `lens` the rows' context lengths (the new token included), `width` the
        positions attention reads (whole blocks)."""
        assert width <= self.capacity and len(lens) == self.rows
        self.refill = refill
        self.lens = lens
        lengths = torch.tensor(lens, dtype=torch.long, device=self.keys.device)
        self.slots = torch.arange(self.rows, device=self.keys.device) * self.capacity + lengths - 1

    def keys_values(
        self,
        layer: int,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        blocks: torch.Tensor,
        block_size: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's keys and values [rows, width, Hkv, D] for the step, `k`/`v` [rows, Hkv, D] its new
        ones (already in the caches)."""
        width = blocks.shape[1] * block_size
        keys, values = self.keys[layer], self.values[layer]
        if self.refill:
            keys[:, :width] = _gather(k_cache, blocks, block_size)
            values[:, :width] = _gather(v_cache, blocks, block_size)
        else:
            keys.view(-1, *keys.shape[2:]).index_copy_(0, self.slots, k)
            values.view(-1, *values.shape[2:]).index_copy_(0, self.slots, v)
        return keys[:, :width], values[:, :width]


@dataclass
class DecodeGroup:
    """Decode rows of similar context length, padded only to their own longest (the torch ops split a
    batch whose lengths differ widely, so that attention reads less padding)."""

    index: torch.Tensor | None  # [b] long: positions among the step's decode rows (None: all, in order)
    blocks: torch.Tensor  # [b, nb] long
    mask: torch.Tensor  # [b, 1, 1, nb * block_size] bool
    workspace: DecodeWorkspace | None = None  # None: gather the blocks afresh


@dataclass
class AttentionBatch:
    """Everything attention needs about one step, built once by the model runner, shared by all layers."""

    block_size: int
    slot_mapping: torch.Tensor  # [T] long: where each token's key/value is written
    decode_rows: torch.Tensor | None  # [B] long: flat indices of decode tokens (None: no decode tokens)
    # The whole decode batch at once (ops that read in place, fixed-shape steps); None with decode_groups.
    decode_blocks: torch.Tensor | None  # [B, nb] long: each decode sequence's block table, padded with 0
    decode_lens: torch.Tensor | None  # [B] long: each decode sequence's context length, its query included
    decode_is_all: bool  # every token of the step is a decode token, in order (skip the scatter)
    prefills: list[PrefillChunk]
    decode_groups: list[DecodeGroup] | None = None  # torch ops: attend the decode rows group by group


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: AttentionBatch,
    decode: DecodeFn,
    layer: int,
) -> torch.Tensor:
    """q: [T, H, D], k/v: [T, Hkv, D] (already in the caches [slots, Hkv, D]) -> [T, H*D].
    `decode` attends the decode rows."""
    t, num_heads, head_dim = q.shape
    gqa = num_heads != k.shape[1]
    if batch.decode_is_all:
        return decode(q, k, v, k_cache, v_cache, batch, layer).reshape(t, num_heads * head_dim)
    out = q.new_empty(t, num_heads, head_dim)
    if batch.decode_rows is not None:
        dec = batch.decode_rows
        out[dec] = decode(q[dec], k[dec], v[dec], k_cache, v_cache, batch, layer)
    for chunk in batch.prefills:
        rows = slice(chunk.start, chunk.start + chunk.num_tokens)
        if chunk.fresh:
            keys, values = k[rows], v[rows]
        else:
            keys = _gather(k_cache, chunk.blocks, batch.block_size)[: chunk.context_len]
            values = _gather(v_cache, chunk.blocks, batch.block_size)[: chunk.context_len]
        out[rows] = _prefill(q[rows], keys, values, gqa)
    return out.reshape(t, num_heads * head_dim)


def gathered_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: AttentionBatch,
    layer: int,
) -> torch.Tensor:
    """q: [B, H, D] one query per sequence -> [B, H, D], from whole blocks copied out of the cache (or
    kept in a group's workspace)."""
    groups = batch.decode_groups
    if groups:
        if groups[0].index is None:  # one group: every row, in order
            return _group_attention(q, k, v, k_cache, v_cache, groups[0], batch, layer)
        out = torch.empty_like(q)
        for group in groups:
            i = group.index
            assert i is not None
            out[i] = _group_attention(q[i], k[i], v[i], k_cache, v_cache, group, batch, layer)
        return out
    assert batch.decode_blocks is not None and batch.decode_lens is not None
    mask = key_mask(batch.decode_lens, batch.decode_blocks.shape[1] * batch.block_size)
    keys = _gather(k_cache, batch.decode_blocks, batch.block_size)
    values = _gather(v_cache, batch.decode_blocks, batch.block_size)
    return _decode_sdpa(q, keys, values, mask)


def _group_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    group: DecodeGroup,
    batch: AttentionBatch,
    layer: int,
) -> torch.Tensor:
    if group.workspace is not None:
        keys, values = group.workspace.keys_values(
            layer, k, v, k_cache, v_cache, group.blocks, batch.block_size
        )
    else:
        keys = _gather(k_cache, group.blocks, batch.block_size)
        values = _gather(v_cache, group.blocks, batch.block_size)
    return _decode_sdpa(q, keys, values, group.mask)


def _decode_sdpa(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """q [B, H, D], keys/values [B, L, Hkv, D], mask [B, 1, 1, L] -> [B, H, D]."""
    num_kv_heads = keys.shape[2]
    keys, values = keys.transpose(1, 2), values.transpose(1, 2)  # [B, Hkv, L, D]
    b, heads, head_dim = q.shape
    # The query heads that share a KV head go in as that head's queries ([B, Hkv, group, D]): one query
    # per sequence, so they all see the same keys, and SDPA needs no GQA expansion (a fifth faster).
    grouped = q.view(b, num_kv_heads, heads // num_kv_heads, head_dim)
    return F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask).reshape(b, heads, head_dim)


def key_mask(lens: torch.Tensor, num_keys: int) -> torch.Tensor:
    """[B, 1, 1, num_keys] bool: True where a key position is inside the row's context."""
    positions = torch.arange(num_keys, device=lens.device)
    return (positions[None, :] < lens[:, None])[:, None, None, :]


def _gather(cache: torch.Tensor, blocks: torch.Tensor, block_size: int) -> torch.Tensor:
    """cache [slots, Hkv, D], blocks [..., nb] -> [..., nb * block_size, Hkv, D], whole blocks copied."""
    paged = cache.view(-1, block_size, *cache.shape[1:])
    # index_select copies about a quarter faster than advanced indexing on the CPU.
    picked = paged.index_select(0, blocks.reshape(-1))
    return picked.view(*blocks.shape[:-1], blocks.shape[-1] * block_size, *cache.shape[1:])


def _prefill(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, gqa: bool) -> torch.Tensor:
    """q: [n, H, D] the last n positions of a context of keys/values [L, Hkv, D] -> [n, H, D]."""
    n, ctx = q.shape[0], keys.shape[0]
    # Fused SDPA kernels want 4-D inputs: [1, heads, tokens, head_dim].
    qh, kh, vh = (t.transpose(0, 1).unsqueeze(0) for t in (q, keys, values))
    if n == ctx:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, enable_gqa=gqa)
    else:
        # Query i sits at position ctx - n + i and sees keys 0 ..= ctx - n + i.
        mask = torch.ones(n, ctx, dtype=torch.bool, device=q.device).tril(diagonal=ctx - n)
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, enable_gqa=gqa)
    return out.squeeze(0).transpose(0, 1)
