"""Paged KV cache bookkeeping with prefix caching (vLLM v1's KVCacheManager, smaller).

The KV cache is `num_blocks` fixed-size blocks of `block_size` token slots. A sequence owns a
block table (block ids in position order); position p lives in slot
`table[p // block_size] * block_size + p % block_size`. This module only does the bookkeeping;
the model runner owns the tensors and applies the `BlockCopy`s that `fork` returns.

Prefix caching, and why it is shaped like this:
- Editors resend the same file on every keystroke, so most of a prompt's KV already exists. A
  FULL block whose KV has been written (`mark_computed`) is registered under a chained content
  hash (kv_hash.py): equal hash = equal tokens in it and before it = interchangeable KV.
- On a sequence's first `allocate` we reuse the longest run of cached blocks from the start of the
  prompt, but never the whole prompt: the last prompt token must run through the model to produce
  logits, so the reusable prefix is capped at `(len(token_ids) - 1) // block_size` blocks.
- Blocks are shared by reference count. Only full, computed blocks are ever shared (cache hits
  and `fork`), so nobody ever writes into a shared block and no copy-on-write is needed later.
- A freed block with a hash keeps its KV and stays findable until its slot is needed: the free
  queue is the eviction order. Cached blocks join at the tail (least recently freed leave first;
  a sequence's blocks are queued last-block-first, since a chain is useless without its head);
  uncached blocks join at the head, as they hold nothing worth keeping.
- If two sequences compute the same block concurrently, the first to register it wins; the other
  copy stays private and uncached (its hash is still recorded for chaining).

Allocation is all-or-nothing (None and no change when blocks are short), so the scheduler can try
a request and move on. Prefix-cache counters are only updated on success, so retries of a waiting
request do not inflate them.
"""
from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from serve_app.engine.kv_hash import BlockHash, hash_block, hash_full_blocks, root_hash


class BlockManagerError(Exception):
    """Base of the block manager's errors."""


class UnknownSequenceError(BlockManagerError, KeyError):
    """The sequence id has no blocks (never allocated, or already freed)."""


class BlockManagerUsageError(BlockManagerError, ValueError):
    """An argument out of range (sizes, positions, token counts, duplicate ids)."""


class OutOfBlocksError(BlockManagerError):
    """`fork` needs more free blocks than there are; nothing was changed."""


class InvariantViolation(AssertionError):
    """`check_invariants` found inconsistent bookkeeping (a bug in this module)."""


@dataclass(frozen=True)
class BlockCopy:
    src: int  # block id to copy KV from (the parent's partially filled block)
    dst: int  # block id to copy KV into (the child's fresh block)


@dataclass
class PrefixCacheStats:
    num_requests: int = 0  # sequences that looked up the cache on their first allocation
    queries: int = 0       # prompt tokens looked up (the hit rate's denominator)
    hits: int = 0          # prompt tokens served from cache
    evictions: int = 0     # cached blocks whose slot was taken for other content

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


@dataclass
class _Block:
    block_id: int
    ref_cnt: int = 0                       # block tables holding this block
    block_hash: BlockHash | None = None    # set while the block is in the prefix cache


@dataclass
class _SeqBlocks:
    block_ids: list[int]                   # the block table
    root: BlockHash                        # hash chain root (carries the cache salt)
    hashes: list[BlockHash] = field(default_factory=list)  # hashes of leading full computed blocks
    num_computed_tokens: int = 0           # positions whose KV is written (or served from cache)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise BlockManagerUsageError(
                f"num_blocks and block_size must be >= 1, got num_blocks={num_blocks}, block_size={block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._blocks = [_Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))  # head = next out
        self._cached: dict[BlockHash, int] = {}
        self._seqs: dict[str, _SeqBlocks] = {}
        self._stats = PrefixCacheStats()

    # ---- queries -------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take now, including cached blocks that nobody holds."""
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def prefix_cache_stats(self) -> PrefixCacheStats:
        return replace(self._stats)  # a snapshot: callers cannot move the counters

    def __contains__(self, seq_id: object) -> bool:
        return seq_id in self._seqs

    def block_table(self, seq_id: str) -> list[int]:
        return list(self._seq(seq_id).block_ids)

    def num_computed_tokens(self, seq_id: str) -> int:
        return self._seq(seq_id).num_computed_tokens

    def slot(self, seq_id: str, position: int) -> int:
        table = self._seq(seq_id).block_ids
        if not 0 <= position < len(table) * self.block_size:
            raise BlockManagerUsageError(
                f"position {position} outside the {len(table) * self.block_size} slots of {seq_id!r}")
        return table[position // self.block_size] * self.block_size + position % self.block_size

    def cached_prefix_len(self, token_ids: Sequence[int], cache_salt: str | None = None) -> int:
        """Tokens the first `allocate` of this prompt would serve from cache now (read-only)."""
        if not self.enable_prefix_caching:
            return 0
        return len(self._lookup(token_ids, root_hash(cache_salt))[1]) * self.block_size

    def num_blocks_to_fork(self, parent_seq_id: str) -> int:
        """Free blocks `fork(parent_seq_id, ...)` needs (the parent's blocks that are not full+computed)."""
        parent = self._seq(parent_seq_id)
        return len(parent.block_ids) - self._num_shareable(parent)

    # ---- mutations -----------------------------------------------------------------------------

    def allocate(self, seq_id: str, token_ids: Sequence[int], num_tokens: int,
                 cache_salt: str | None = None) -> int | None:
        """Ensure seq has slots for positions [0, num_tokens).

        Returns the prefix tokens served from cache (first call only; 0 later), or None when free
        blocks are short (then nothing changed). On a hit the table covers at least the cached
        prefix even if num_tokens is smaller; the scheduler continues from the returned count.
        `cache_salt` (first call only) separates caches whose KV differs for equal tokens.
        """
        if num_tokens < 1:
            raise BlockManagerUsageError(f"num_tokens must be >= 1, got {num_tokens} for {seq_id!r}")
        seq = self._seqs.get(seq_id)
        if seq is None:
            return self._allocate_first(seq_id, token_ids, num_tokens, cache_salt)
        need = self._blocks_for(num_tokens) - len(seq.block_ids)
        if need > len(self._free):
            return None
        seq.block_ids.extend(self._take_free(need))
        return 0

    def mark_computed(self, seq_id: str, token_ids: Sequence[int], num_computed_tokens: int) -> None:
        """KV for positions [0, num_computed_tokens) is written: newly full blocks become shareable."""
        seq = self._seq(seq_id)
        limit = min(len(token_ids), len(seq.block_ids) * self.block_size)
        if not seq.num_computed_tokens <= num_computed_tokens <= limit:
            raise BlockManagerUsageError(
                f"num_computed_tokens={num_computed_tokens} for {seq_id!r} must be in "
                f"[{seq.num_computed_tokens}, {limit}] (computed so far, min(tokens, slots))")
        seq.num_computed_tokens = num_computed_tokens
        num_full = num_computed_tokens // self.block_size
        if not self.enable_prefix_caching or num_full <= len(seq.hashes):
            return
        start = len(seq.hashes)
        parent = seq.hashes[-1] if seq.hashes else seq.root
        new_hashes = hash_full_blocks(token_ids, self.block_size, parent, start, num_full - start)
        for k, block_hash in enumerate(new_hashes, start=start):
            block = self._blocks[seq.block_ids[k]]
            if block.block_hash is None and block_hash not in self._cached:
                block.block_hash = block_hash
                self._cached[block_hash] = block.block_id
        seq.hashes.extend(new_hashes)

    def fork(self, parent_seq_id: str, child_seq_id: str) -> list[BlockCopy]:
        """Give child the parent's table: full computed blocks shared, the rest fresh.

        Returns the copies the runner must apply for fresh blocks that hold written KV (the
        partially filled block). Raises OutOfBlocksError, changing nothing, when blocks are short
        (see `num_blocks_to_fork`).
        """
        parent = self._seq(parent_seq_id)
        if child_seq_id in self._seqs:
            raise BlockManagerUsageError(f"fork: child {child_seq_id!r} already has blocks")
        shared = self._num_shareable(parent)
        tail = parent.block_ids[shared:]
        if len(tail) > len(self._free):
            raise OutOfBlocksError(f"fork of {parent_seq_id!r} needs {len(tail)} free blocks, "
                                   f"{len(self._free)} free")
        for block_id in parent.block_ids[:shared]:
            self._blocks[block_id].ref_cnt += 1  # held by the parent, so never in the free queue
        fresh = self._take_free(len(tail))
        copies = [BlockCopy(src, dst) for k, (src, dst) in enumerate(zip(tail, fresh))
                  if (shared + k) * self.block_size < parent.num_computed_tokens]
        self._seqs[child_seq_id] = _SeqBlocks(
            block_ids=parent.block_ids[:shared] + fresh, root=parent.root,
            hashes=parent.hashes[:shared], num_computed_tokens=parent.num_computed_tokens)
        return copies

    def free(self, seq_id: str) -> None:
        """Drop seq's references. Unknown ids are ignored, so aborting a request that never got
        blocks needs no special case."""
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            return
        for block_id in reversed(seq.block_ids):  # last block first: evicted before its prefix
            block = self._blocks[block_id]
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block_id] = None
                if block.block_hash is None:
                    self._free.move_to_end(block_id, last=False)  # nothing to keep: reuse first

    # ---- internals -----------------------------------------------------------------------------

    def _seq(self, seq_id: str) -> _SeqBlocks:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise UnknownSequenceError(f"sequence {seq_id!r} has no blocks") from None

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _num_shareable(self, seq: _SeqBlocks) -> int:
        return min(seq.num_computed_tokens // self.block_size, len(seq.block_ids))

    def _allocate_first(self, seq_id: str, token_ids: Sequence[int], num_tokens: int,
                        cache_salt: str | None) -> int | None:
        root = root_hash(cache_salt)
        hashes, hits = self._lookup(token_ids, root) if self.enable_prefix_caching else ([], [])
        num_cached = len(hits) * self.block_size
        need = self._blocks_for(max(num_tokens, num_cached)) - len(hits)
        revived = sum(1 for b in hits if self._blocks[b].ref_cnt == 0)  # hits that leave the free queue
        if need + revived > len(self._free):
            return None
        for block_id in hits:
            block = self._blocks[block_id]
            if block.ref_cnt == 0:
                del self._free[block_id]
            block.ref_cnt += 1
        self._seqs[seq_id] = _SeqBlocks(block_ids=hits + self._take_free(need), root=root,
                                        hashes=hashes, num_computed_tokens=num_cached)
        if self.enable_prefix_caching:
            self._stats.num_requests += 1
            self._stats.queries += len(token_ids)
            self._stats.hits += num_cached
        return num_cached

    def _lookup(self, token_ids: Sequence[int], root: BlockHash) -> tuple[list[BlockHash], list[int]]:
        """Hashes and block ids of the longest cached run of full blocks, leaving the last token out."""
        hashes: list[BlockHash] = []
        hits: list[int] = []
        parent = root
        for k in range((len(token_ids) - 1) // self.block_size):
            parent = hash_block(parent, token_ids[k * self.block_size:(k + 1) * self.block_size])
            block_id = self._cached.get(parent)
            if block_id is None:
                break
            hashes.append(parent)
            hits.append(block_id)
        return hashes, hits

    def _take_free(self, n: int) -> list[int]:
        """Pop n blocks from the head of the free queue, evicting their cache entries."""
        taken = []
        for _ in range(n):
            block_id, _ = self._free.popitem(last=False)
            block = self._blocks[block_id]
            if block.block_hash is not None:
                del self._cached[block.block_hash]
                block.block_hash = None
                self._stats.evictions += 1
            block.ref_cnt = 1
            taken.append(block_id)
        return taken

    # ---- invariants (tests) --------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Raise InvariantViolation if the bookkeeping is inconsistent."""
        def fail(msg: str) -> None:
            raise InvariantViolation(msg)

        holders = Counter(b for seq in self._seqs.values() for b in seq.block_ids)
        for seq_id, seq in self._seqs.items():
            if len(set(seq.block_ids)) != len(seq.block_ids):
                fail(f"{seq_id!r} holds a block twice: {seq.block_ids}")
            if seq.num_computed_tokens > len(seq.block_ids) * self.block_size:
                fail(f"{seq_id!r} computed {seq.num_computed_tokens} tokens in {len(seq.block_ids)} blocks")
            for block_id, block_hash in zip(seq.block_ids, seq.hashes):
                if self._blocks[block_id].block_hash not in (None, block_hash):
                    fail(f"{seq_id!r} block {block_id} is cached under another prefix")
        for block in self._blocks:
            if block.ref_cnt != holders[block.block_id]:
                fail(f"block {block.block_id}: ref_cnt {block.ref_cnt} but {holders[block.block_id]} holders")
        free_ids = list(self._free)
        if len(free_ids) != len(set(free_ids)):
            fail("a block is in the free queue twice")
        if set(free_ids) != {b.block_id for b in self._blocks if b.ref_cnt == 0}:
            fail("free queue differs from the blocks with ref_cnt 0")
        if len(free_ids) + sum(1 for b in self._blocks if b.ref_cnt > 0) != self.num_blocks:
            fail("free + used != total")
        for block_hash, block_id in self._cached.items():
            if self._blocks[block_id].block_hash != block_hash:
                fail(f"cache maps a hash to block {block_id}, which has another hash")
        if sum(1 for b in self._blocks if b.block_hash is not None) != len(self._cached):
            fail("a block has a hash but is not in the cache map")
