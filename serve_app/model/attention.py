"""Attention over a paged KV cache, plus RoPE.

One code path serves prefill chunks and decode tokens: a step's tokens arrive flat ([T]) with
their own positions; `AttentionMetadata` says which sequence each token belongs to, where its
K/V go in the cache (slot = block * block_size + offset) and which blocks hold each sequence's
context. Attention writes the new K/V, then, on a 16-bit inference step on CPU, runs the fused
kernel (cpu_kernels.paged_attention): every row against its own sequence's keys read in place,
one call a layer; elsewhere (float32 — the parity lane —, GPUs, no compiler) it gathers every
sequence's context through its block table into a padded [B, L] layout and runs one SDPA per
group with a causal-by-position mask. A decode token is just a sequence with one new token; a
prefill chunk is one with many and some cached context.

The plain causal path (no cache; `meta is None`) is what training and the transformers parity
tests use.

Legend: T=tokens in the step, B=sequences, Q=max new tokens of a sequence, L=max context length
(padded to whole blocks), H=query heads, G=kv heads, Dh=head dim, N=cache blocks, S=block size.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from serve_app.model import cpu_kernels


@dataclass
class AttentionGroup:
    """Sequences attended in one SDPA call; padding (to the longest query and context) stays inside.

    Why groups: a step that holds one 256-token prefill chunk next to 31 decodes would, padded as
    one batch, compute 32 × 256 query rows for 287 real ones (measured: 12-16x slower attention).
    So decodes (one new token each) share a group and every prefill chunk gets its own.
    """
    token_index: torch.Tensor   # [Tg] rows of the step's flat tokens that belong to this group
    token_seq: torch.Tensor     # [Tg] sequence (0..Bg-1, within the group) of each of those tokens
    token_col: torch.Tensor     # [Tg] column of the token among its sequence's new tokens
    positions: torch.Tensor     # [Tg] position of each token in its sequence
    block_tables: torch.Tensor  # [Bg, max_blocks] cache blocks of each sequence, padded with 0
    max_query_len: int          # Q of this group
    query_pos: torch.Tensor     # [Bg, Q] position of each query slot (padding slots: 0)
    block_size: int
    _mask: torch.Tensor | None = None

    @property
    def mask(self) -> torch.Tensor:
        """[Bg, 1, Q, L] key j visible to query slot (b, i) iff j <= its position. The same in every
        layer, so it is built once per step, not once per layer — and only when a layer asks: the
        fused kernel (cpu_kernels) reads the positions instead and never needs it."""
        if self._mask is None:
            key_pos = torch.arange(self.block_tables.shape[1] * self.block_size, device=self.query_pos.device)  # [L]
            mask = key_pos[None, None, :] <= self.query_pos[:, :, None]     # [Bg, Q, L]; j ≤ pos ⇒ j < context len
            self._mask = mask[:, None]
        return self._mask


@dataclass
class AttentionMetadata:
    """How the flat token batch of one step maps onto sequences and cache slots."""
    positions: torch.Tensor     # [T] int64 position of each token in its sequence (RoPE and causality)
    slot_mapping: torch.Tensor  # [T] int64 cache slot where each token's K/V is written
    # The dtype the score/value products run in; None = the activations'. A bf16 lane on a CPU
    # whose bf16 SDPA is slow computes them in float32 (model/kernels.py measures which).
    compute_dtype: torch.dtype | None = None
    # For the fused kernel (cpu_kernels.paged_attention), which attends every row on its own: the
    # step's block tables [B, W] (padded with 0) and the sequence of each row [T]. Built on first use.
    _block_tables: list[list[int]] | None = None
    _token_seq: list[int] | None = None
    _fused: tuple[torch.Tensor, torch.Tensor] | None = None
    # What `groups` is built from, on first use: the fused kernel never asks for the groups, so a
    # step on it builds none of their index tensors (~10 tensors and 40 µs of Python a step).
    _group_args: tuple | None = None
    _groups: list[AttentionGroup] | None = None

    @property
    def groups(self) -> list[AttentionGroup]:
        """The SDPA groups of the step: all decodes in one, each prefill chunk in its own."""
        if self._groups is None:
            positions, block_tables, starts, block_size = self._group_args
            decodes = [b for b, pos in enumerate(positions) if len(pos) == 1]
            members = ([decodes] if decodes else []) + [[b] for b, pos in enumerate(positions) if len(pos) > 1]
            device = self.positions.device
            self._groups = [_group(m, positions, block_tables, starts, block_size, device) for m in members]
        return self._groups

    def fused_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(block_tables [B, W] int64, token_seq [T] int64), built once per step."""
        if self._fused is None:
            width = max(len(t) for t in self._block_tables)
            tables = [t + [0] * (width - len(t)) for t in self._block_tables]
            device = self.positions.device
            self._fused = (torch.tensor(tables, dtype=torch.long, device=device),
                           torch.tensor(self._token_seq, dtype=torch.long, device=device))
        return self._fused

    @classmethod
    def build(cls, positions: list[list[int]], block_tables: list[list[int]], block_size: int,
              device: torch.device | str = "cpu", compute_dtype: torch.dtype | None = None) -> "AttentionMetadata":
        """From per-sequence new-token positions and block tables (the runner's view)."""
        flat_pos, slots, starts, token_seq = [], [], [], []
        for b, (pos, table) in enumerate(zip(positions, block_tables)):
            starts.append(len(flat_pos))
            flat_pos += pos
            token_seq += [b] * len(pos)
            slots += [table[p // block_size] * block_size + p % block_size for p in pos]
        both = torch.tensor([flat_pos, slots], dtype=torch.long, device=device)   # [2, T]: one tensor, two rows
        return cls(both[0], both[1], compute_dtype, block_tables, token_seq,
                   _group_args=(positions, block_tables, starts, block_size))


def _group(members: list[int], positions: list[list[int]], block_tables: list[list[int]], starts: list[int],
           block_size: int, device) -> AttentionGroup:
    index, seqs, cols, pos = [], [], [], []
    for g, b in enumerate(members):
        n = len(positions[b])
        index += range(starts[b], starts[b] + n)
        seqs += [g] * n
        cols += range(n)
        pos += positions[b]
    width = max(len(block_tables[b]) for b in members)
    tables = [block_tables[b] + [0] * (width - len(block_tables[b])) for b in members]
    as_long = dict(dtype=torch.long, device=device)
    token_seq, token_col = torch.tensor(seqs, **as_long), torch.tensor(cols, **as_long)
    token_pos, max_query_len = torch.tensor(pos, **as_long), max(len(positions[b]) for b in members)
    # Padding query slots get position 0 so their mask row is never empty (no NaN); they are dropped.
    if max_query_len == 1:
        query_pos = token_pos[:, None]                                          # [Bg, 1]: token b is sequence b
    else:
        query_pos = torch.zeros(len(members), max_query_len, **as_long)         # [Bg, Q]
        query_pos[token_seq, token_col] = token_pos
    return AttentionGroup(torch.tensor(index, **as_long), token_seq, token_col, token_pos,
                          torch.tensor(tables, **as_long), max_query_len, query_pos, block_size)


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
    """cos and *signed* sin [..., Dh] for the given positions, computed in float32 then cast (as the
    reference does). The sin's first half is negated so that `apply_rotary` can use a roll."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64,
                                             device=positions.device).float() / head_dim))  # [Dh/2]
    freqs = positions.float()[..., None] * inv_freq                  # [..., Dh/2]
    emb = torch.cat((freqs, freqs), dim=-1)                          # [..., Dh]
    sin = emb.sin()
    sin[..., : head_dim // 2].neg_()
    return emb.cos().to(dtype), sin.to(dtype)


_ROPE_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def rotary_lookup(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """`rotary(positions, ...)` read from a table of positions 0..P-1, computed once per (Dh,
    theta, dtype, device) the same way and grown to the next power of two when a position passes
    its end: the same values, one gather instead of ~10 ops a step (~0.15 ms of a 1.5 ms decode)."""
    need = int(positions.max()) + 1 if positions.numel() else 1
    key = (head_dim, theta, dtype, positions.device)
    table = _ROPE_TABLES.get(key)
    if table is None or table[0].shape[0] < need:
        size = max(1024, 1 << (need - 1).bit_length())
        table = _ROPE_TABLES[key] = rotary(torch.arange(size, device=positions.device), head_dim, theta, dtype)
    flat = positions.reshape(-1)
    cos, sin = table[0].index_select(0, flat), table[1].index_select(0, flat)     # [N, Dh]
    return cos.view(*positions.shape, head_dim), sin.view(*positions.shape, head_dim)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x [..., heads, Dh]; cos/signed_sin [..., 1, Dh] broadcast over heads.

    The reference's x * cos + rotate_half(x) * sin, where rotate_half(x) = [-x2, x1]: rolling x by
    Dh/2 gives [x2, x1] and the signed sin supplies the minus, so 4 ops instead of 7 (twice per
    layer per step), with the same products and sums in the same order."""
    rolled = torch.roll(x, x.shape[-1] // 2, dims=-1)
    return x * cos + rolled * signed_sin


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """No cache: q [B, S, H, Dh], k/v [B, S, G, Dh] → [B, S, H, Dh]."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=True, scale=scale, enable_gqa=True)  # [B, H, S, Dh]
    return out.transpose(1, 2)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q [T, H, Dh], k/v [T, G, Dh]; caches [N, S, G, Dh] of one layer → [T, H, Dh]."""
    num_kv, head_dim = k.shape[1], k.shape[2]
    # The cache may hold another dtype than the activations (a bf16 lane whose attention computes
    # in float32 keeps float32 K/V: casting each new row once beats casting the context every layer).
    k_cache.view(-1, num_kv, head_dim).index_copy_(0, meta.slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, num_kv, head_dim).index_copy_(0, meta.slot_mapping, v.to(v_cache.dtype))
    if (fused := cpu_kernels.for_tensor(q)) is not None:
        # Every row on its own against its sequence's keys, in place (cache in bf16 or float32,
        # products in float32): one call for the step, prefill and decode rows alike.
        tables, token_seq = meta.fused_tables()
        return fused.paged_attention(q, k_cache, v_cache, tables, token_seq, meta.positions, scale)
    dtype = meta.compute_dtype or q.dtype
    if len(meta.groups) == 1:
        return _attend_group(q, k_cache, v_cache, meta.groups[0], scale, dtype).to(q.dtype)
    out = torch.empty_like(q)                                        # [T, H, Dh]
    for group in meta.groups:
        out[group.token_index] = _attend_group(q.index_select(0, group.token_index), k_cache, v_cache,
                                               group, scale, dtype).to(q.dtype)
    return out


def _attend_group(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, g: AttentionGroup,
                  scale: float, dtype: torch.dtype) -> torch.Tensor:
    """q [Tg, H, Dh] of one group → [Tg, H, Dh] in `dtype`; Bg/Q/L are the group's sequences, query and context."""
    num_seqs, (_, _, num_kv, head_dim) = g.block_tables.shape[0], k_cache.shape
    # index_select over the flat table, not k_cache[tables]: 4x faster on CPU (9 vs 35 µs for 32 blocks).
    flat = g.block_tables.flatten()
    keys = k_cache.index_select(0, flat).view(num_seqs, -1, num_kv, head_dim)      # [Bg, L, G, Dh]
    values = v_cache.index_select(0, flat).view(num_seqs, -1, num_kv, head_dim)    # [Bg, L, G, Dh]
    if keys.dtype != dtype:
        keys, values = keys.to(dtype), values.to(dtype)
    q = q.to(dtype)
    if g.max_query_len == 1:
        # Decodes (token b is sequence b): each KV head's H/G query heads become that head's query
        # rows, so SDPA sees [Bg, G, H/G, Dh] against [Bg, G, L, Dh] with no GQA expansion
        # (40 vs 49 µs per call at one sequence, 528 keys). Head h uses KV head h // (H/G), as in
        # the reference families.
        num_heads = q.shape[1]
        grouped = q.reshape(num_seqs, num_kv, num_heads // num_kv, head_dim)          # [Bg, G, H/G, Dh]
        out = F.scaled_dot_product_attention(grouped, keys.transpose(1, 2), values.transpose(1, 2),
                                             attn_mask=g.mask, scale=scale)           # [Bg, G, H/G, Dh]
        return out.reshape(num_seqs, num_heads, head_dim)                             # [Tg, H, Dh]
    queries = q.new_zeros(num_seqs, g.max_query_len, *q.shape[1:])                    # [Bg, Q, H, Dh]
    queries[g.token_seq, g.token_col] = q
    out = F.scaled_dot_product_attention(
        queries.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
        attn_mask=g.mask, scale=scale, enable_gqa=True)              # [Bg, H, Q, Dh]
    return out.transpose(1, 2)[g.token_seq, g.token_col]             # [Tg, H, Dh]
