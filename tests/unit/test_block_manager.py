"""BlockManager: targeted behaviour of prefix caching, eviction, fork and failure atomicity."""
from __future__ import annotations

import pytest

from serve_app.engine.block_manager import (BlockCopy, BlockManager, BlockManagerUsageError, OutOfBlocksError,
                                            PrefixCacheStats, UnknownSequenceError)

BS = 4


def _bm(num_blocks: int = 8, caching: bool = True) -> BlockManager:
    return BlockManager(num_blocks=num_blocks, block_size=BS, enable_prefix_caching=caching)


def _prefill(bm: BlockManager, seq_id: str, tokens: list[int]) -> int | None:
    """Allocate the whole prompt and mark its KV written, as one engine step would."""
    cached = bm.allocate(seq_id, tokens, len(tokens))
    if cached is not None:
        bm.mark_computed(seq_id, tokens, len(tokens))
    return cached


def _snapshot(bm: BlockManager, seq_ids: list[str]) -> tuple:
    return (bm.num_free_blocks, bm.num_cached_blocks, bm.prefix_cache_stats,
            {s: bm.block_table(s) for s in seq_ids if s in bm})


def test_second_request_with_same_prefix_reuses_blocks_and_reports_cached_tokens():
    bm = _bm()
    prompt = list(range(10))  # 2 full blocks + 2 tokens
    assert _prefill(bm, "a", prompt) == 0
    cached = bm.allocate("b", prompt[:8] + [99, 98, 97], 11)
    assert cached == 8
    assert bm.block_table("b")[:2] == bm.block_table("a")[:2]
    assert bm.block_table("b")[2] != bm.block_table("a")[2]
    assert bm.num_computed_tokens("b") == 8
    assert bm.prefix_cache_stats == PrefixCacheStats(num_requests=2, queries=21, hits=8, evictions=0)
    bm.check_invariants()


def test_fully_cached_prompt_still_computes_its_last_token():
    bm = _bm()
    prompt = list(range(8))  # exactly 2 full blocks
    _prefill(bm, "a", prompt)
    assert bm.cached_prefix_len(prompt) == 4
    assert bm.allocate("b", prompt, 8) == 4  # the last block is recomputed to get logits
    assert bm.block_table("b")[0] == bm.block_table("a")[0]
    assert bm.block_table("b")[1] != bm.block_table("a")[1]


def test_blocks_are_not_shared_before_their_kv_is_written():
    bm = _bm()
    prompt = list(range(9))
    assert bm.allocate("a", prompt, 9) == 0
    assert bm.allocate("b", prompt, 9) == 0  # "a" has not marked anything computed
    bm.mark_computed("a", prompt, 4)
    assert bm.allocate("c", prompt, 9) == 4  # one block written so far


def test_freed_cached_blocks_are_reused_by_a_later_request():
    bm = _bm()
    prompt = list(range(12))
    _prefill(bm, "a", prompt)
    table_a = bm.block_table("a")
    bm.free("a")
    assert bm.num_free_blocks == 8 and bm.num_cached_blocks == 3
    assert bm.allocate("b", prompt + [5], 13) == 12
    assert bm.block_table("b")[:3] == table_a
    bm.check_invariants()


def test_lru_evicts_the_least_recently_freed_cached_block_first():
    bm = _bm(num_blocks=4)
    old, new = [1, 1, 1, 1, 0], [2, 2, 2, 2, 0]  # one full (cached) block each
    _prefill(bm, "old", old)
    _prefill(bm, "new", new)
    bm.free("old")
    bm.free("new")
    bm.allocate("x", [7] * 12, 12)  # 3 blocks: 2 uncached free blocks go first, then the LRU one
    assert bm.cached_prefix_len(old) == 0
    assert bm.cached_prefix_len(new) == 4
    assert bm.prefix_cache_stats.evictions == 1
    bm.check_invariants()


def test_eviction_takes_a_freed_sequence_tail_block_before_its_head():
    bm = _bm(num_blocks=4)
    prompt = [5] * 8 + [6]  # 3 blocks, the first 2 cached
    _prefill(bm, "a", prompt)
    bm.free("a")
    bm.allocate("x", [7] * 12, 12)  # 3 blocks: the uncached ones, then one cached block
    assert bm.cached_prefix_len(prompt) == 4  # the head survives: a chain is useless without it
    assert bm.prefix_cache_stats.evictions == 1


def test_uncached_freed_blocks_are_reused_before_cached_ones():
    bm = _bm(num_blocks=2)
    _prefill(bm, "cached", [1, 1, 1, 1])  # one full computed block
    _prefill(bm, "scratch", [2])  # a partial block: nothing to keep
    bm.free("cached")
    bm.free("scratch")  # freed later, yet it goes out first
    bm.allocate("x", [3], 1)
    assert bm.cached_prefix_len([1, 1, 1, 1, 9]) == 4
    assert bm.prefix_cache_stats.evictions == 0


def test_hitting_a_freed_block_makes_it_most_recently_used():
    bm = _bm(num_blocks=4)
    a, b = [1, 1, 1, 1, 0], [2, 2, 2, 2, 0]
    _prefill(bm, "a", a)
    _prefill(bm, "b", b)
    bm.free("a")
    bm.free("b")
    _prefill(bm, "a2", a)  # revives a's block; it is freed again after b's
    bm.free("a2")
    bm.allocate("x", [7] * 12, 12)
    assert bm.cached_prefix_len(b) == 0 and bm.cached_prefix_len(a) == 4


def test_failed_first_allocation_leaves_state_unchanged():
    bm = _bm(num_blocks=4)
    _prefill(bm, "a", list(range(9)))
    bm.free("a")
    before = _snapshot(bm, ["a", "b"])
    assert bm.allocate("b", list(range(9)) + [0] * 10, 19) is None  # needs 5 blocks
    assert _snapshot(bm, ["a", "b"]) == before and "b" not in bm
    bm.check_invariants()


def test_failed_growth_leaves_state_unchanged():
    bm = _bm(num_blocks=3)
    _prefill(bm, "a", [1] * 8)
    before = _snapshot(bm, ["a"])
    assert bm.allocate("a", [1] * 17, 17) is None
    assert _snapshot(bm, ["a"]) == before
    assert bm.allocate("a", [1] * 12, 12) == 0 and len(bm.block_table("a")) == 3


def test_revived_cache_hits_count_against_free_blocks():
    bm = _bm(num_blocks=4)
    prompt = [3] * 8 + [4]
    _prefill(bm, "a", prompt)  # 3 blocks, 2 of them cached
    bm.free("a")
    _prefill(bm, "hold", [9])  # takes the uncached block: 3 free, 2 of them are the hits
    # Hits revive 2 free blocks; 2 more are needed for 13 tokens -> 4 > 3 free.
    assert bm.allocate("b", prompt + [0] * 4, 13) is None
    assert bm.num_free_blocks == 3
    assert bm.allocate("b", prompt, 9) == 8 and bm.num_free_blocks == 0


def test_fork_shares_full_blocks_and_copies_the_partial_one():
    bm = _bm()
    prompt = list(range(10))
    _prefill(bm, "p", prompt)
    parent = bm.block_table("p")
    copies = bm.fork("p", "c")
    child = bm.block_table("c")
    assert child[:2] == parent[:2] and child[2] != parent[2]
    assert copies == [BlockCopy(src=parent[2], dst=child[2])]
    assert bm.num_computed_tokens("c") == 10
    bm.free("p")
    assert bm.num_used_blocks == 3  # the child still holds the shared blocks
    bm.check_invariants()


def test_fork_does_not_copy_reserved_but_unwritten_blocks():
    bm = _bm()
    tokens = list(range(8))
    bm.allocate("p", tokens, 8)
    bm.mark_computed("p", tokens, 8)
    bm.allocate("p", tokens + [8], 9)  # slot for the next decode token, nothing written yet
    assert bm.fork("p", "c") == []
    assert len(bm.block_table("c")) == 3 and bm.block_table("c")[2] != bm.block_table("p")[2]


def test_fork_without_enough_blocks_raises_and_changes_nothing():
    bm = _bm(num_blocks=3)
    _prefill(bm, "p", list(range(10)))
    assert bm.num_blocks_to_fork("p") == 1
    before = _snapshot(bm, ["p", "c"])
    with pytest.raises(OutOfBlocksError, match="needs 1 free blocks, 0 free"):
        bm.fork("p", "c")
    assert _snapshot(bm, ["p", "c"]) == before
    bm.check_invariants()


def test_slot_maps_positions_through_the_block_table():
    bm = _bm()
    bm.allocate("x", [0], 1)
    bm.allocate("a", list(range(6)), 6)
    table = bm.block_table("a")
    assert [bm.slot("a", p) for p in range(6)] == [table[p // BS] * BS + p % BS for p in range(6)]
    assert bm.slot("a", 5) == table[1] * BS + 1
    with pytest.raises(BlockManagerUsageError, match="position 8"):
        bm.slot("a", 8)


def test_cache_salt_keeps_caches_apart():
    bm = _bm()
    prompt = list(range(9))
    bm.allocate("int4", prompt, 9, cache_salt="int4")
    bm.mark_computed("int4", prompt, 9)
    assert bm.allocate("fp", prompt, 9, cache_salt="fp32") == 0
    assert bm.allocate("int4b", prompt, 9, cache_salt="int4") == 8


def test_disabled_prefix_caching_never_hits_and_freed_blocks_are_plain_free():
    bm = _bm(caching=False)
    prompt = list(range(9))
    _prefill(bm, "a", prompt)
    assert bm.allocate("b", prompt, 9) == 0
    bm.free("a")
    assert bm.num_cached_blocks == 0 and bm.prefix_cache_stats == PrefixCacheStats()


def test_concurrent_duplicate_computation_caches_one_copy():
    bm = _bm()
    prompt = list(range(9))
    _prefill(bm, "a", prompt)
    bm.allocate("b", prompt[:4], 4)  # nothing reusable: the prompt's last token is in block 0
    bm.mark_computed("b", prompt[:4], 4)
    assert bm.num_cached_blocks == 2  # b's identical block 0 stays private
    bm.free("a")
    bm.free("b")
    assert bm.num_free_blocks == 8 and bm.num_cached_blocks == 2
    bm.check_invariants()


def test_unknown_sequences_raise_except_on_free():
    bm = _bm()
    bm.free("never")  # aborting a request that never got blocks is fine
    for call in (lambda: bm.block_table("never"), lambda: bm.slot("never", 0),
                 lambda: bm.mark_computed("never", [1], 1), lambda: bm.fork("never", "c")):
        with pytest.raises(UnknownSequenceError):
            call()


@pytest.mark.parametrize("computed", [-1, 10, 13])
def test_mark_computed_outside_written_range_is_rejected(computed):
    bm = _bm()
    bm.allocate("a", list(range(12)), 12)
    bm.mark_computed("a", list(range(12)), 2)
    with pytest.raises(BlockManagerUsageError, match=f"num_computed_tokens={computed}"):
        bm.mark_computed("a", list(range(9)), computed)  # only 9 tokens known


def test_invalid_sizes_and_token_counts_are_rejected():
    with pytest.raises(BlockManagerUsageError, match="block_size=0"):
        BlockManager(num_blocks=4, block_size=0)
    with pytest.raises(BlockManagerUsageError, match="num_tokens must be >= 1, got 0"):
        _bm().allocate("a", [], 0)


def test_usage_counts_held_blocks_only():
    bm = _bm(num_blocks=4)
    _prefill(bm, "a", list(range(6)))
    assert (bm.num_used_blocks, bm.num_free_blocks, bm.usage) == (2, 2, 0.5)
    bm.free("a")
    assert (bm.num_used_blocks, bm.num_free_blocks, bm.usage) == (0, 4, 0.0)
