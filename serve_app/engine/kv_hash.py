"""Content hashes of full KV blocks, chained so that a block's hash names its whole prefix.

Design: block k's hash is sha256(hash of block k-1, tokens of block k), with the chain rooted in
an optional cache salt. Two blocks have the same hash only if every token before and inside them
agrees, which is exactly when their KV is interchangeable. sha256 rather than Python's `hash`
because a collision would silently serve another prompt's KV (vLLM switched for the same reason);
hashing is C code over a few bytes per token and runs once per full block.

The salt separates caches whose KV differs for the same tokens, e.g. requests served by the
router's quantized experts versus the full-precision shards (DESIGN.md section 3).
"""
from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

BlockHash = bytes  # 32-byte sha256 digest


def root_hash(cache_salt: str | None = None) -> BlockHash:
    """The parent hash of a sequence's first block."""
    return hashlib.sha256(b"moe-serve-kv:" + (cache_salt or "").encode()).digest()


def hash_block(parent: BlockHash, token_ids: Sequence[int]) -> BlockHash:
    """Hash of one full block, chained onto its parent's hash."""
    return hashlib.sha256(parent + array("q", token_ids).tobytes()).digest()


def hash_full_blocks(token_ids: Sequence[int], block_size: int, parent: BlockHash,
                     start_block: int = 0, max_blocks: int | None = None) -> list[BlockHash]:
    """Hashes of full blocks start_block, start_block+1, ... of token_ids.

    `parent` is the hash of block start_block - 1 (or the root); stops at the last full block, or
    after max_blocks hashes.
    """
    end_block = len(token_ids) // block_size
    if max_blocks is not None:
        end_block = min(end_block, start_block + max_blocks)
    hashes: list[BlockHash] = []
    for k in range(start_block, end_block):
        parent = hash_block(parent, token_ids[k * block_size:(k + 1) * block_size])
        hashes.append(parent)
    return hashes
