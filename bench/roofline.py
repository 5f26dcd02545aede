"""The compute floor of a benchmark workload: the least time any engine could take on this machine.

Why: `engine_throughput.py` asks for ratios (≥ 10× transformers, continuous ≥ 8× static). A ratio
is bounded by how much *necessary* work there is: if the workload's unavoidable FLOPs take `F`
seconds at the machine's best matmul rate, no engine beats a peer that took `P` seconds by more
than `P / F`. Printing that bound next to the measured ratio says whether a missed target is our
engine's fault or the hardware's.

What counts as necessary (a perfect engine: no padding, no recomputation, every op at peak):
- every prompt token and every generated token but the last passes through every layer once:
  the attention projections (q, k, v, o), the router, and its top-k experts (SwiGLU: 3 matmuls);
- attention scores and the weighted sum over the token's causal context (QK^T and PV: 2 matmuls
  of context × head_dim per query head), counted at each token's real position;
- the LM head once per generated token (an engine only needs logits where it samples).
Elementwise work (norms, RoPE, softmax, SiLU) is left out, which makes the floor lower, so the
bound on any ratio higher: a conservative ceiling.

The peak is measured here, in the same process and thread count as the systems: the best rate of
fp32 matmuls with this model's shapes (tokens × hidden @ hidden × FFN), which is what the
projections and experts run.

Legend: M=rows (tokens), K=input features, N=output features.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ModelShape:
    """The FLOP-relevant dimensions of a Mixtral-layout MoE."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    experts: int
    top_k: int
    ffn: int            # one expert's intermediate size
    vocab: int

    @classmethod
    def from_hf(cls, shape: dict) -> "ModelShape":
        """From transformers' MixtralConfig keyword names (as `engine_throughput.MODEL_SHAPE`)."""
        heads = shape["num_attention_heads"]
        return cls(hidden=shape["hidden_size"], layers=shape["num_hidden_layers"], heads=heads,
                   kv_heads=shape["num_key_value_heads"], head_dim=shape["hidden_size"] // heads,
                   experts=shape["num_local_experts"], top_k=shape["num_experts_per_tok"],
                   ffn=shape["intermediate_size"], vocab=shape["vocab_size"])

    def token_flops(self, context: int) -> float:
        """FLOPs of one token through all layers, attending to `context` keys (itself included)."""
        d, q_out, kv_out = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        projections = 2 * d * (q_out + 2 * kv_out) + 2 * q_out * d        # q, k, v in; o out
        router = 2 * d * self.experts
        experts = self.top_k * 3 * 2 * d * self.ffn                       # gate, up, down
        attention = 2 * 2 * context * q_out                               # QK^T and PV
        return self.layers * (projections + router + experts + attention)

    def request_flops(self, prompt_len: int, new_tokens: int) -> float:
        """The necessary FLOPs of one request: prompt + generated tokens, LM head per sample."""
        passes = prompt_len + new_tokens - 1                              # the last sample feeds nothing
        # Sum of token_flops over positions 1..passes, in closed form (linear in the context).
        per_token_fixed = self.token_flops(0)
        attention_per_key = self.token_flops(1) - per_token_fixed
        body = passes * per_token_fixed + attention_per_key * passes * (passes + 1) / 2
        return body + new_tokens * 2 * self.hidden * self.vocab


@dataclass(frozen=True)
class Floor:
    """The workload's necessary FLOPs and the least time they take at the measured peak."""

    gflop: float
    peak_gflops: float     # best fp32 matmul rate measured, GFLOP/s
    seconds: float         # gflop / peak_gflops

    def best_ratio(self, peer_wall_s: float) -> float:
        """The largest throughput ratio any engine could reach over a peer that took this long."""
        return peer_wall_s / self.seconds

    def efficiency(self, wall_s: float) -> float:
        """Share of the machine's peak a system used on the necessary work."""
        return self.seconds / wall_s


def peak_gflops(shape: ModelShape, rows: int = 2048, repeats: int = 20) -> float:
    """Best fp32 matmul rate at this model's shapes (current torch thread count), GFLOP/s."""
    best = 0.0
    for k, n in ((shape.hidden, shape.ffn), (shape.ffn, shape.hidden), (shape.hidden, shape.hidden)):
        a, b = torch.randn(rows, k), torch.randn(k, n)               # [M, K], [K, N]
        torch.mm(a, b)                                               # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b)
            best = max(best, 2 * rows * k * n / (time.perf_counter() - start) / 1e9)
    return best


def workload_floor(shape: ModelShape, requests: list[tuple[int, int]]) -> Floor:
    """`requests`: (prompt tokens, new tokens) of each request."""
    gflop = sum(shape.request_flops(p, n) for p, n in requests) / 1e9
    peak = peak_gflops(shape)
    return Floor(gflop=gflop, peak_gflops=peak, seconds=gflop / peak)
