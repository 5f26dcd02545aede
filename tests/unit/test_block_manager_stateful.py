"""BlockManager under random workloads (hypothesis RuleBasedStateMachine).

Beside the manager's own `check_invariants`, the machine simulates the KV tensor: every written
slot records the token prefix whose KV it holds. After every rule each live sequence must read,
through its block table, exactly the KV of its own tokens for every computed position. That one
check covers cache hits serving the right KV, forks copying the right blocks, and nobody writing
into a block that another sequence still reads.
"""
from __future__ import annotations

from dataclasses import dataclass

from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from serve_app.engine.block_manager import BlockManager, OutOfBlocksError

BS = 4
NUM_BLOCKS = 12
MAX_LIVE = 6
# Prompts start from a few shared bases so that prefixes (and cache hits) repeat.
_BASES = [[], [0, 0, 0, 0], [1, 2, 1, 2, 1, 2, 1, 2], [0, 0, 0, 0, 1, 1, 1, 1, 2]]
_prompts = st.tuples(st.sampled_from(_BASES), st.lists(st.integers(0, 2), min_size=1, max_size=7)).map(
    lambda t: t[0] + t[1])


@dataclass
class _Seq:
    tokens: list[int]
    computed: int  # positions whose KV is written (or served from cache)


class BlockManagerMachine(RuleBasedStateMachine):
    caching = True

    def __init__(self) -> None:
        super().__init__()
        self.bm = BlockManager(NUM_BLOCKS, BS, enable_prefix_caching=self.caching)
        self.seqs: dict[str, _Seq] = {}
        self.kv: dict[int, tuple[int, ...]] = {}  # slot -> token prefix whose KV it holds
        self.next_id = 0
        self.seen: list[list[int]] = []  # prompts that arrived, for resends

    # ---- helpers -------------------------------------------------------------------------------

    def _snapshot(self) -> tuple:
        return (self.bm.num_free_blocks, self.bm.num_cached_blocks, self.bm.prefix_cache_stats,
                {s: self.bm.block_table(s) for s in self.seqs})

    def _capacity(self, seq_id: str) -> int:
        return len(self.bm.block_table(seq_id)) * BS

    def _holders(self, block_id: int) -> int:
        return sum(block_id in self.bm.block_table(s) for s in self.seqs)

    # ---- rules ---------------------------------------------------------------------------------
    # No preconditions: a rule that does not apply returns early. With preconditions hypothesis
    # gave up on ~15% of examples, where most rules were disabled.

    @rule(data=st.data(), chunk=st.integers(1, 16))
    def resend(self, data, chunk):
        """An editor resends an earlier prompt, maybe with a few more tokens typed."""
        if self.seen:
            prompt = data.draw(st.sampled_from(self.seen)) + data.draw(st.lists(st.integers(0, 2), max_size=3))
            self.arrive(prompt, chunk)

    @rule(prompt=_prompts, chunk=st.integers(1, 16))
    def arrive(self, prompt, chunk):
        if len(self.seqs) >= MAX_LIVE:
            return
        self.seen.append(prompt)
        seq_id = f"s{self.next_id}"
        self.next_id += 1
        before = self._snapshot()
        expected_hit = self.bm.cached_prefix_len(prompt)
        cached = self.bm.allocate(seq_id, prompt, min(chunk, len(prompt)))
        if cached is None:
            event("arrival refused: out of blocks")
            assert self._snapshot() == before and seq_id not in self.bm
            return
        assert cached == expected_hit
        event("arrival served from prefix cache" if cached else "arrival without cache hit")
        assert cached % BS == 0 and cached <= len(prompt) - 1
        assert self._capacity(seq_id) >= max(cached, min(chunk, len(prompt)))
        self.seqs[seq_id] = _Seq(list(prompt), cached)

    @rule(data=st.data())
    def compute(self, data):
        """A forward pass writes KV for some not-yet-computed positions the seq has slots for."""
        if not self.seqs:
            return
        seq_id = data.draw(st.sampled_from(sorted(self.seqs)))
        seq = self.seqs[seq_id]
        limit = min(len(seq.tokens), self._capacity(seq_id))
        if seq.computed == limit:
            return
        upto = data.draw(st.integers(seq.computed + 1, limit))
        for pos in range(seq.computed, upto):
            slot = self.bm.slot(seq_id, pos)
            assert self._holders(slot // BS) == 1, "writing into a block another sequence reads"
            self.kv[slot] = tuple(seq.tokens[:pos + 1])
        self.bm.mark_computed(seq_id, seq.tokens, upto)
        seq.computed = upto

    @rule(data=st.data(), more=st.integers(1, 9))
    def grow(self, data, more):
        """Chunked prefill continues, or a decode step appends a sampled token and needs its slot."""
        if not self.seqs:
            return
        seq_id = data.draw(st.sampled_from(sorted(self.seqs)))
        seq = self.seqs[seq_id]
        new_tokens = []
        if seq.computed == len(seq.tokens):  # decode: the sampled token needs a slot
            new_tokens = [data.draw(st.integers(0, 2))]
        tokens = seq.tokens + new_tokens
        num_tokens = min(len(tokens), self._capacity(seq_id) + more)
        before = self._snapshot()
        result = self.bm.allocate(seq_id, tokens, num_tokens)
        if result is None:
            assert self._snapshot() == before
            return
        assert result == 0 and self._capacity(seq_id) >= num_tokens
        seq.tokens = tokens

    @rule(data=st.data())
    def fork(self, data):
        if not self.seqs or len(self.seqs) >= MAX_LIVE:
            return
        parent_id = data.draw(st.sampled_from(sorted(self.seqs)))
        child_id = f"s{self.next_id}"
        self.next_id += 1
        before = self._snapshot()
        needed = self.bm.num_blocks_to_fork(parent_id)
        try:
            copies = self.bm.fork(parent_id, child_id)
        except OutOfBlocksError:
            event("fork out of blocks")
            assert needed > before[0] and self._snapshot() == before
            return
        for copy in copies:
            for offset in range(BS):
                if copy.src * BS + offset in self.kv:
                    self.kv[copy.dst * BS + offset] = self.kv[copy.src * BS + offset]
        parent = self.seqs[parent_id]
        self.seqs[child_id] = _Seq(list(parent.tokens), parent.computed)

    @rule(data=st.data())
    def finish(self, data):
        if not self.seqs:
            return
        seq_id = data.draw(st.sampled_from(sorted(self.seqs)))
        self.bm.free(seq_id)
        del self.seqs[seq_id]
        assert seq_id not in self.bm

    @rule()
    def drain(self):
        for seq_id in list(self.seqs):
            self.bm.free(seq_id)
        self.seqs.clear()
        assert self.bm.num_free_blocks == NUM_BLOCKS and self.bm.num_used_blocks == 0

    # ---- invariants ----------------------------------------------------------------------------

    @invariant()
    def bookkeeping_is_consistent(self):
        self.bm.check_invariants()
        assert self.bm.num_free_blocks + self.bm.num_used_blocks == NUM_BLOCKS

    @invariant()
    def shared_blocks_are_full_computed_identical_prefixes(self):
        where: dict[int, list[tuple[str, int]]] = {}
        for seq_id in self.seqs:
            for k, block_id in enumerate(self.bm.block_table(seq_id)):
                where.setdefault(block_id, []).append((seq_id, k))
        for block_id, places in where.items():
            if len(places) < 2:
                continue
            (_, k0), end = places[0], (places[0][1] + 1) * BS
            for seq_id, k in places:
                seq = self.seqs[seq_id]
                assert k == k0 and seq.computed >= end, f"block {block_id} shared before full+computed"
                assert seq.tokens[:end] == self.seqs[places[0][0]].tokens[:end]

    @invariant()
    def every_computed_position_reads_its_own_kv(self):
        for seq_id, seq in self.seqs.items():
            assert self.bm.num_computed_tokens(seq_id) == seq.computed
            for pos in range(seq.computed):
                assert self.kv.get(self.bm.slot(seq_id, pos)) == tuple(seq.tokens[:pos + 1])

    def teardown(self):
        for seq_id in list(self.seqs):
            self.bm.free(seq_id)
        self.bm.check_invariants()
        assert self.bm.num_free_blocks == NUM_BLOCKS


class BlockManagerNoCachingMachine(BlockManagerMachine):
    caching = False


TestBlockManagerStateful = BlockManagerMachine.TestCase
TestBlockManagerStateful.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
TestBlockManagerNoCachingStateful = BlockManagerNoCachingMachine.TestCase
TestBlockManagerNoCachingStateful.settings = settings(max_examples=50, stateful_step_count=30, deadline=None)
