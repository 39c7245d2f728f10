"""Attention over the paged KV cache for a flat batch of tokens from many sequences.

New keys/values are already in their slots (the ops' rotary_store writes them); decode tokens (one query
per sequence) are attended in one batch by the ops' decode attention, and prefill chunks one sequence at a
time. The torch decode gathers each sequence's cached blocks and passes them to
scaled_dot_product_attention; the Triton one reads the slots in place.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DecodeFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "AttentionBatch"], torch.Tensor]


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


@dataclass
class DecodeGroup:
    """Decode rows of similar context length, padded only to their own longest (the torch ops split a
    batch whose lengths differ widely, so that the gather copies less padding)."""

    index: torch.Tensor  # [b] long: positions among the step's decode rows
    blocks: torch.Tensor  # [b, nb] long
    mask: torch.Tensor  # [b, 1, 1, nb * block_size] bool


@dataclass
class AttentionBatch:
    """Everything attention needs about one step, built once by the model runner, shared by all layers."""

    block_size: int
    slot_mapping: torch.Tensor  # [T] long: where each token's key/value is written
    decode_rows: torch.Tensor | None  # [B] long: flat indices of decode tokens (None: no decode tokens)
    decode_blocks: torch.Tensor | None  # [B, nb] long: each decode sequence's block table, padded with 0
    decode_lens: torch.Tensor | None  # [B] long: each decode sequence's context length, its query included
    decode_mask: torch.Tensor | None  # [B, 1, 1, nb * block_size] bool: True where a key is real (torch ops)
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
) -> torch.Tensor:
    """q: [T, H, D], k/v: [T, Hkv, D] (already in the caches [slots, Hkv, D]) -> [T, H*D].
    `decode(q [B, H, D], k_cache, v_cache, batch)` attends the decode rows."""
    t, num_heads, head_dim = q.shape
    gqa = num_heads != k.shape[1]
    if batch.decode_is_all:
        return decode(q, k_cache, v_cache, batch).reshape(t, num_heads * head_dim)
    out = q.new_empty(t, num_heads, head_dim)
    if batch.decode_rows is not None:
        out[batch.decode_rows] = decode(q[batch.decode_rows], k_cache, v_cache, batch)
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
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: AttentionBatch
) -> torch.Tensor:
    """q: [B, H, D] one query per sequence -> [B, H, D], from whole blocks copied out of the cache."""
    if batch.decode_groups:
        out = torch.empty_like(q)
        for group in batch.decode_groups:
            out[group.index] = _gathered_sdpa(
                q[group.index], k_cache, v_cache, group.blocks, group.mask, batch
            )
        return out
    assert batch.decode_blocks is not None and batch.decode_lens is not None
    mask = batch.decode_mask
    if mask is None:
        mask = key_mask(batch.decode_lens, batch.decode_blocks.shape[1] * batch.block_size)
    return _gathered_sdpa(q, k_cache, v_cache, batch.decode_blocks, mask, batch)


def _gathered_sdpa(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    blocks: torch.Tensor,
    mask: torch.Tensor,
    batch: AttentionBatch,
) -> torch.Tensor:
    keys = _gather(k_cache, blocks, batch.block_size).transpose(1, 2)  # [B, Hkv, L, D]
    values = _gather(v_cache, blocks, batch.block_size).transpose(1, 2)
    b, heads, head_dim = q.shape
    # The query heads that share a KV head go in as that head's queries ([B, Hkv, group, D]): one query
    # per sequence, so they all see the same keys, and SDPA needs no GQA expansion (a fifth faster).
    grouped = q.view(b, k_cache.shape[1], heads // k_cache.shape[1], head_dim)
    return F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask).view(b, heads, head_dim)


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
