from __future__ import annotations

import pytest

from engine.kv_cache import BlockAllocator


def test_allocate_and_free_round_trip() -> None:
    alloc = BlockAllocator(num_blocks=8, block_size=4)
    a = alloc.allocate(3)
    b = alloc.allocate(5)
    assert alloc.num_free == 0
    assert sorted(a + b) == list(range(8))
    with pytest.raises(RuntimeError):
        alloc.allocate(1)
    alloc.free(a)
    alloc.free(b)
    assert alloc.num_free == 8
    assert sorted(alloc.allocate(8)) == list(range(8))


def test_blocks_needed_rounds_up_and_counts_held_blocks() -> None:
    alloc = BlockAllocator(num_blocks=8, block_size=4)
    assert alloc.blocks_needed(1, 0) == 1
    assert alloc.blocks_needed(4, 0) == 1
    assert alloc.blocks_needed(5, 0) == 2
    assert alloc.blocks_needed(5, 2) == 0
    assert alloc.blocks_needed(9, 2) == 1
