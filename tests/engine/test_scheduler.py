from __future__ import annotations

from engine.kv_cache import BlockAllocator
from engine.scheduler import Scheduler, Sequence, SequenceStatus


def _seq(rid: str, n: int, adapter: str | None = None) -> Sequence:
    return Sequence(rid, list(range(1, n + 1)), n, adapter)


def _run_step(s: Scheduler) -> list[tuple[str, int, int]]:
    """Schedule, pretend the model ran, and append one token to every sequence that sampled."""
    out = s.schedule()
    s.update(out)
    for item in out.scheduled:
        if item.samples:
            item.seq.token_ids.append(7)
    return [(i.seq.request_id, i.start, i.num_new_tokens) for i in out.scheduled]


def test_long_prompt_is_chunked_under_the_token_budget() -> None:
    s = Scheduler(BlockAllocator(64, 4), max_num_seqs=8, max_num_batched_tokens=10)
    s.add(_seq("a", 25))
    assert _run_step(s) == [("a", 0, 10)]
    assert _run_step(s) == [("a", 10, 10)]
    assert _run_step(s) == [("a", 20, 5)]
    assert _run_step(s) == [("a", 25, 1)]  # decoding the sampled token


def test_running_decodes_go_first_and_a_new_prompt_takes_the_rest() -> None:
    s = Scheduler(BlockAllocator(64, 4), max_num_seqs=8, max_num_batched_tokens=8)
    s.add(_seq("a", 3))
    _run_step(s)
    s.add(_seq("b", 20))
    # a decodes (1 token); b gets the remaining 7 of the budget: a long prompt does not stall a.
    assert _run_step(s) == [("a", 3, 1), ("b", 0, 7)]
    assert _run_step(s) == [("a", 4, 1), ("b", 7, 7)]


def test_out_of_blocks_preempts_the_newest_and_frees_its_blocks() -> None:
    alloc = BlockAllocator(4, 4)  # 16 token slots in all
    s = Scheduler(alloc, max_num_seqs=8, max_num_batched_tokens=64)
    a, b = _seq("a", 7), _seq("b", 7)
    s.add(a)
    s.add(b)
    _run_step(s)  # both prefilled: 2 blocks each, all 4 used; each now holds 8 tokens
    assert alloc.num_free == 0
    _run_step(s)  # both decode position 7 within their blocks
    out = s.schedule()  # position 8 needs a new block each: b (newest) is preempted for a
    assert [p.request_id for p in out.preempted] == ["b"]
    assert b.status is SequenceStatus.WAITING and b.num_computed == 0 and b.block_table == []
    assert [i.seq.request_id for i in out.scheduled] == ["a"]
    s.update(out)


def test_finish_returns_every_block() -> None:
    alloc = BlockAllocator(16, 4)
    s = Scheduler(alloc, max_num_seqs=8, max_num_batched_tokens=64)
    seqs = [_seq(str(i), 5 + i) for i in range(3)]
    for q in seqs:
        s.add(q)
    _run_step(s)
    assert alloc.num_free < 16
    for q in seqs:
        s.finish(q)
    assert alloc.num_free == 16
    assert not s.has_unfinished()


def test_max_num_seqs_limits_admission() -> None:
    s = Scheduler(BlockAllocator(64, 4), max_num_seqs=2, max_num_batched_tokens=64)
    for i in range(3):
        s.add(_seq(str(i), 2))
    assert [r for r, _, _ in _run_step(s)] == ["0", "1"]
    assert len(s.waiting) == 1


def test_adapter_gate_passes_over_without_blocking_the_queue() -> None:
    def gate(adapter: str | None, active: set[str]) -> bool:
        return adapter is None or adapter in active or len(active) < 1

    s = Scheduler(BlockAllocator(64, 4), max_num_seqs=8, max_num_batched_tokens=64, adapter_gate=gate)
    s.add(_seq("x", 2, "A"))
    s.add(_seq("y", 2, "B"))
    s.add(_seq("z", 2, None))
    assert [r for r, _, _ in _run_step(s)] == ["x", "z"]
    assert [q.request_id for q in s.waiting] == ["y"]  # kept its place for when A's requests finish


def test_a_sequence_waiting_for_a_slot_is_not_starved_by_later_ones() -> None:
    def gate(adapter: str | None, active: set[str]) -> bool:
        return adapter is None or adapter in active or len(active) < 1

    s = Scheduler(BlockAllocator(64, 4), max_num_seqs=8, max_num_batched_tokens=64, adapter_gate=gate)
    s.add(_seq("x", 2, "A"))
    s.add(_seq("y", 2, "B"))
    s.add(_seq("w", 2, "A"))
    s.add(_seq("z", 2, None))
    # w could join A's slot, but it came after y, which waits for a slot: w waits too; z needs no slot.
    assert [r for r, _, _ in _run_step(s)] == ["x", "z"]
    assert [q.request_id for q in s.waiting] == ["y", "w"]


def test_an_ending_sequence_gets_no_step_and_no_block() -> None:
    """A running sequence whose last token is still being read back (EngineCore's overlapped steps) is
    passed over: no row, and no block reserved for a token it will not need."""
    allocator = BlockAllocator(64, 4)
    s = Scheduler(allocator, max_num_seqs=8, max_num_batched_tokens=64)
    a, b = _seq("a", 4), _seq("b", 3)
    s.add(a)
    s.add(b)
    _run_step(s)  # both prefilled; each sampled a token, a's fifth at the start of a new block
    a.ending = True
    free = allocator.num_free
    assert _run_step(s) == [("b", 3, 1)]
    assert allocator.num_free == free and len(a.block_table) == 1
