"""Attention over a paged KV cache, plus RoPE.

One code path serves prefill chunks and decode tokens: a step's tokens arrive flat ([T]) with
their own positions; `AttentionMetadata` says which sequence each token belongs to, where its
K/V go in the cache (slot = block * block_size + offset) and which blocks hold each sequence's
context. Attention writes the new K/V, gathers every sequence's context through its block table
into a padded [B, L] layout and runs one SDPA with a causal-by-position mask. A decode token is
just a sequence with one new token; a prefill chunk is one with many and some cached context.

The plain causal path (no cache; `meta is None`) is what training and the transformers parity
tests use.

Legend: T=tokens in the step, B=sequences, Q=max new tokens of a sequence, L=max context length
(padded to whole blocks), H=query heads, G=kv heads, Dh=head dim, N=cache blocks, S=block size.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    """How the flat token batch of one step maps onto sequences and cache slots."""
    positions: torch.Tensor     # [T] int64 position of each token in its sequence (RoPE and causality)
    slot_mapping: torch.Tensor  # [T] int64 cache slot where each token's K/V is written
    token_seq: torch.Tensor     # [T] int64 which sequence (0..B-1) each token belongs to
    token_col: torch.Tensor     # [T] int64 column of the token among its sequence's new tokens
    block_tables: torch.Tensor  # [B, max_blocks] int64 cache blocks of each sequence, padded with 0
    max_query_len: int          # Q

    @classmethod
    def build(cls, positions: list[list[int]], block_tables: list[list[int]], block_size: int,
              device: torch.device | str = "cpu") -> "AttentionMetadata":
        """From per-sequence new-token positions and block tables (the runner's view)."""
        flat_pos, slots, seqs, cols = [], [], [], []
        for b, (pos, table) in enumerate(zip(positions, block_tables)):
            for c, p in enumerate(pos):
                flat_pos.append(p)
                slots.append(table[p // block_size] * block_size + p % block_size)
                seqs.append(b)
                cols.append(c)
        width = max(len(t) for t in block_tables)
        padded = [t + [0] * (width - len(t)) for t in block_tables]
        as_long = dict(dtype=torch.long, device=device)
        return cls(torch.tensor(flat_pos, **as_long), torch.tensor(slots, **as_long),
                   torch.tensor(seqs, **as_long), torch.tensor(cols, **as_long),
                   torch.tensor(padded, **as_long), max(len(p) for p in positions))


class PagedKVCache:
    """Fixed-size blocks of K and V for every layer; block ids come from the engine's block manager."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)   # [layers, N, S, G, Dh]
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size
        self.num_blocks = num_blocks

    def copy_blocks(self, src: list[int], dst: list[int]) -> None:
        """Copy whole blocks in every layer (a forked candidate's partially filled last block)."""
        if src:
            s, d = torch.tensor(src), torch.tensor(dst)
            self.k[:, d] = self.k[:, s]
            self.v[:, d] = self.v[:, s]


def rotary(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin for the given positions, computed in float32 then cast (as the reference does)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64,
                                             device=positions.device).float() / head_dim))  # [Dh/2]
    freqs = positions.float()[..., None] * inv_freq                  # [..., Dh/2]
    emb = torch.cat((freqs, freqs), dim=-1)                          # [..., Dh]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., heads, Dh]; cos/sin [..., Dh] broadcast over heads."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[..., None, :] + rotated * sin[..., None, :]


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """No cache: q [B, S, H, Dh], k/v [B, S, G, Dh] → [B, S, H, Dh]."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=True, scale=scale, enable_gqa=True)  # [B, H, S, Dh]
    return out.transpose(1, 2)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q [T, H, Dh], k/v [T, G, Dh]; caches [N, S, G, Dh] of one layer → [T, H, Dh]."""
    num_kv, head_dim = k.shape[1], k.shape[2]
    k_cache.view(-1, num_kv, head_dim).index_copy_(0, meta.slot_mapping, k)
    v_cache.view(-1, num_kv, head_dim).index_copy_(0, meta.slot_mapping, v)

    num_seqs = meta.block_tables.shape[0]
    keys = k_cache[meta.block_tables].flatten(1, 2)                  # [B, L, G, Dh]
    values = v_cache[meta.block_tables].flatten(1, 2)                # [B, L, G, Dh]
    queries = q.new_zeros(num_seqs, meta.max_query_len, *q.shape[1:])  # [B, Q, H, Dh]
    queries[meta.token_seq, meta.token_col] = q
    # Padding query slots get position 0 so their mask row is never empty (no NaN); they are dropped.
    query_pos = torch.zeros(num_seqs, meta.max_query_len, dtype=torch.long, device=q.device)  # [B, Q]
    query_pos[meta.token_seq, meta.token_col] = meta.positions
    key_pos = torch.arange(keys.shape[1], device=q.device)           # [L]
    mask = key_pos[None, None, :] <= query_pos[:, :, None]           # [B, Q, L]; j ≤ pos ⇒ j < context len
    out = F.scaled_dot_product_attention(
        queries.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
        attn_mask=mask[:, None], scale=scale, enable_gqa=True)       # [B, H, Q, Dh]
    return out.transpose(1, 2)[meta.token_seq, meta.token_col]       # [T, H, Dh]
