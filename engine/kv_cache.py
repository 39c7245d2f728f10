"""Paged KV cache: a pure-Python block allocator and the per-layer key/value tensors.

A sequence owns a list of block ids (its block table). Token i of the sequence lives in block
`table[i // block_size]` at offset `i % block_size`, i.e. in flat slot `table[i // bs] * bs + i % bs`.
Memory is preallocated once from a byte budget, so usage is proportional to tokens held.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class BlockAllocator:
    """Hands out fixed-size KV blocks. Mutates only its own free list; imports no tensors."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        # LIFO free list: recently freed blocks are reused first (warm in cache).
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_needed(self, num_tokens: int, num_held: int) -> int:
        """Blocks to add so that a table of `num_held` blocks covers `num_tokens` tokens."""
        return max(0, -(-num_tokens // self.block_size) - num_held)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def allocate(self, num_blocks: int) -> list[int]:
        """Take `num_blocks` blocks off the free list; raises if there are not enough."""
        if num_blocks > len(self._free):
            raise RuntimeError(f"out of KV blocks: need {num_blocks}, have {len(self._free)}")
        taken = self._free[len(self._free) - num_blocks :]
        del self._free[len(self._free) - num_blocks :]
        return taken

    def free(self, blocks: list[int]) -> None:
        """Return blocks to the pool. The caller clears its table."""
        self._free.extend(reversed(blocks))


@dataclass(frozen=True)
class KVCacheShape:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int

    def bytes_per_block(self, dtype: torch.dtype) -> int:
        per_token = 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype.itemsize
        return per_token * self.block_size

    def blocks_for_budget(self, kv_cache_bytes: int, dtype: torch.dtype) -> int:
        return max(1, kv_cache_bytes // self.bytes_per_block(dtype))


class KVCache:
    """Key and value tensors for every layer, as flat slots: [num_blocks * block_size, kv_heads, head_dim]."""

    def __init__(
        self, shape: KVCacheShape, num_blocks: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.shape = shape
        self.num_blocks = num_blocks
        num_slots = num_blocks * shape.block_size
        self.keys = [
            torch.zeros(num_slots, shape.num_kv_heads, shape.head_dim, dtype=dtype, device=device)
            for _ in range(shape.num_layers)
        ]
        self.values = [torch.zeros_like(k) for k in self.keys]
