"""Iteration-level (continuous) batching: which sequences run how many tokens this step.

Every step starts from the token budget (`max_num_batched_tokens`). Running sequences go first,
oldest first, so decodes keep flowing and a long prompt already being prefilled keeps its place;
each gets its uncomputed tail, capped by `long_prefill_chunk` (chunked prefill). Waiting
sequences are then admitted first-come-first-served while budget, sequence slots and KV blocks
last; a new sequence starts after its longest cached prefix.

When KV blocks run out for a running sequence, the newest running sequence is preempted: its
blocks are freed and it goes back to the front of the waiting queue to be recomputed later
(its full blocks often survive in the prefix cache, so "recompute" is mostly a cache hit). The
oldest requests therefore always make progress and nobody's KV is ever overwritten.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from serve_app.config import EngineConfig
from serve_app.engine.block_manager import BlockManager
from serve_app.engine.sequence import Sequence


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int           # tokens [num_computed, num_computed + num_new) run this step
    start: int                    # num_computed_tokens when scheduled (positions start here)

    @property
    def samples(self) -> bool:
        """The chunk reaches the sequence's last token, so this step yields its next token."""
        return self.start + self.num_new_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)   # in batch order
    preempted: list[Sequence] = field(default_factory=list)       # sent back to waiting this step
    num_batched_tokens: int = 0

    @property
    def empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, cfg: EngineConfig, blocks: BlockManager):
        self.cfg, self.blocks = cfg, blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._static_batch: set[str] = set()    # static batching: the seq ids of the current batch

    @property
    def num_waiting_tokens(self) -> int:
        return sum(s.num_tokens for s in self.waiting)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """A forked candidate: its blocks already exist, it continues from its parent's counters."""
        self.running.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Finished or aborted: out of the queues, blocks freed at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq.seq_id)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.cfg.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget, self.cfg.long_prefill_chunk)
            if not self._allocate_or_preempt(seq, n, out):
                break                               # seq preempted itself: it was the newest
            out.scheduled.append(ScheduledSeq(seq, n, seq.num_computed_tokens))
            budget -= n
            i += 1
        # Admitting new work while preempting would just thrash the KV cache.
        if not out.preempted and self._batch_open():
            budget = self._admit_waiting(out, budget)
        out.num_batched_tokens = self.cfg.max_num_batched_tokens - budget
        return out

    def _batch_open(self) -> bool:
        """Continuous batching: always. Static batching (a benchmark peer, not a serving mode): when
        the running batch is empty, the next `max_num_seqs` waiting sequences become the batch; they
        are admitted (over as many steps as the token budget needs) and nothing else is until all of
        them have finished."""
        if self.cfg.scheduling == "continuous":
            return True
        if not self.running and not any(s.seq_id in self._static_batch for s in self.waiting):
            self._static_batch = {s.seq_id for s in list(self.waiting)[:self.cfg.max_num_seqs]}
        return bool(self.waiting) and self.waiting[0].seq_id in self._static_batch

    def _allocate_or_preempt(self, seq: Sequence, n: int, out: SchedulerOutput) -> bool:
        while self.blocks.allocate(seq.seq_id, seq.token_ids, seq.num_computed_tokens + n) is None:
            victim = self.running.pop()
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.free(seq.seq_id)
        seq.num_computed_tokens = 0
        self.waiting.appendleft(seq)

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> int:
        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_num_seqs:
            seq = self.waiting[0]
            if self.cfg.scheduling == "static" and seq.seq_id not in self._static_batch:
                break
            salt = seq.request.cache_salt
            cached = self.blocks.cached_prefix_len(seq.token_ids, salt)
            want = min(seq.num_tokens - cached, budget, self.cfg.long_prefill_chunk)
            got = self.blocks.allocate(seq.seq_id, seq.token_ids, cached + want, cache_salt=salt)
            if got is None:
                break                               # FCFS: nobody overtakes the head of the queue
            self.waiting.popleft()
            # The cache may hold a different amount than the lookup said only if it was evicted
            # in between; the allocation covers [0, cached + want) either way.
            n = min(seq.num_tokens - got, budget, self.cfg.long_prefill_chunk, cached + want - got)
            seq.num_computed_tokens = got
            seq.num_cached_tokens = got
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, n, got))
            budget -= n
        return budget
