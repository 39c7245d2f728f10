"""Iteration-level scheduling: which sequences run in the next step, and how many tokens each.

Each step takes decode tokens of running sequences first, then continues their prefills in chunks,
then admits waiting sequences, all within a per-step token budget, so a long prompt never stalls running
streams for more than one chunk. When KV blocks run out, the newest running sequence is preempted: its
blocks are freed and it is recomputed later from its prompt and the tokens it already produced, which
leaves its output unchanged. No torch here.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.kv_cache import BlockAllocator


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """The token state of one request. `num_computed` tokens already have their KV in `block_table`.
    `ending`: its last token is still being sampled (the engine reads it back later) and ends it, so it
    needs no further step."""

    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    adapter: str | None = None
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    ending: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]


@dataclass
class ScheduledSeq:
    """`num_new_tokens` tokens of `seq`, starting at position `start`, run this step."""

    seq: Sequence
    start: int
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """True when this step reaches the sequence's last token, so its logits pick the next one."""
        return self.start + self.num_new_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq]
    preempted: list[Sequence]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


# Decides whether a sequence with this adapter may join the running set, given the adapters already in it.
AdapterGate = Callable[[str | None, set[str]], bool]


def _any_adapter(adapter: str | None, active: set[str]) -> bool:
    return True


class Scheduler:
    """Owns the waiting queue (FIFO) and the running list (oldest first). Mutates sequences' block tables,
    `num_computed` and status, and the allocator's free list; nothing else."""

    def __init__(
        self,
        allocator: BlockAllocator,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        adapter_gate: AdapterGate = _any_adapter,
    ) -> None:
        self.allocator = allocator
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.adapter_gate = adapter_gate
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        preempted: list[Sequence] = []
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING or seq.ending:
                continue  # preempted earlier in this loop, or done once its last token is read
            num_new = min(seq.num_tokens - seq.num_computed, budget)
            if not self._reserve(seq, num_new, preempted):
                continue
            scheduled.append(ScheduledSeq(seq, seq.num_computed, num_new))
            budget -= num_new
        if not preempted:
            budget = self._admit(budget, scheduled)
        return SchedulerOutput(scheduled, preempted)

    def _reserve(self, seq: Sequence, num_new: int, preempted: list[Sequence]) -> bool:
        """Get blocks for `num_new` more tokens of a running sequence, preempting the newest running
        sequences while there are too few. False if `seq` itself had to be preempted."""
        need = self.allocator.blocks_needed(seq.num_computed + num_new, len(seq.block_table))
        while not self.allocator.can_allocate(need):
            victim = self.running[-1]
            self.preempt(victim)
            preempted.append(victim)
            if victim is seq:
                return False
        seq.block_table.extend(self.allocator.allocate(need))
        return True

    def _admit(self, budget: int, scheduled: list[ScheduledSeq]) -> int:
        """Move waiting sequences into the running set while budget, seats and blocks allow (FIFO; a
        sequence whose adapter cannot join now is passed over by base-model sequences only)."""
        active = {s.adapter for s in self.running if s.adapter is not None}
        passed_over: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            # Once a sequence waits for an adapter slot, later adapter sequences wait too: admitting them
            # would keep the running adapters busy and could starve it. Base-model sequences need no slot.
            blocked = bool(passed_over) and seq.adapter is not None
            if blocked or not self.adapter_gate(seq.adapter, active):
                passed_over.append(self.waiting.popleft())
                continue
            num_new = min(seq.num_tokens - seq.num_computed, budget)
            need = self.allocator.blocks_needed(seq.num_computed + num_new, len(seq.block_table))
            if not self.allocator.can_allocate(need):
                break
            self.waiting.popleft()
            seq.block_table.extend(self.allocator.allocate(need))
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            if seq.adapter is not None:
                active.add(seq.adapter)
            scheduled.append(ScheduledSeq(seq, seq.num_computed, num_new))
            budget -= num_new
        self.waiting.extendleft(reversed(passed_over))
        return budget

    def preempt(self, seq: Sequence) -> None:
        """Free the sequence's blocks and put it first in line; it will be recomputed from scratch."""
        self.running.remove(seq)
        self._release(seq)
        seq.num_computed = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def update(self, out: SchedulerOutput) -> None:
        """Record that the scheduled tokens were computed."""
        for item in out.scheduled:
            item.seq.num_computed = item.start + item.num_new_tokens

    def finish(self, seq: Sequence) -> None:
        """Drop a sequence (finished or aborted) from whichever queue holds it, freeing its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status = SequenceStatus.FINISHED

    def _release(self, seq: Sequence) -> None:
        self.allocator.free(seq.block_table)
        seq.block_table = []
