"""Expert placement by measured load (EPLB): which shard holds which (layer, expert), so shards do
even work.

Why per layer: a MoE layer's hop waits for its slowest shard, so what a placement must even out is
each layer's tokens per shard, not the total. The load is what the Router meters (tokens routed per
(layer, expert), `runner.take_expert_load`); round-robin by expert index is what the plan does
without it (placement.PlacementPlan.round_robin).

The algorithm is DeepSeek-V3's EPLB (github.com/deepseek-ai/EPLB) reduced to one node: per layer,
(1) with `spare_slots` extra expert slots per shard, give the hottest experts more replicas — each
extra replica goes to the expert whose load per replica is largest (a replicated expert's rows are
split evenly between its holders); (2) pack the replicas onto shards, heaviest first, each to the
least loaded shard that still has a slot and does not hold that expert yet. With no spare slots,
(2) alone: a balanced partition of each layer's experts, the same number per shard.

Legend: L = MoE layers, E = experts per layer, S = shards.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from serve_app.model.moe import ExpertKey


@dataclass(frozen=True)
class Balanced:
    """A placement with its measured effect. `holders[(layer, expert)]` = the shards holding it (one
    for an expert that is not replicated); each holder takes an equal share of its rows."""
    holders: dict[ExpertKey, tuple[int, ...]]
    num_shards: int

    def shard_load(self, load: torch.Tensor, layers: list[int]) -> torch.Tensor:
        """[L, S] tokens per shard in each layer, under this placement, for `load` [L, E]."""
        out = torch.zeros(len(layers), self.num_shards, dtype=torch.float64)
        for i, layer in enumerate(layers):
            for e in range(load.shape[1]):
                held = self.holders[(layer, e)]
                for shard in held:
                    out[i, shard] += float(load[i, e]) / len(held)
        return out

    def layout(self) -> dict[str, list[tuple[int, int]]]:
        """The config's `placement` layout ({"0": [[layer, expert], ...], ...}) of a placement without
        replicas (a replicated one: `PlacementPlan.from_holders(self.holders, ...)`)."""
        if any(len(h) > 1 for h in self.holders.values()):
            raise ValueError("a placement with replicated experts has no single-owner layout")
        out: dict[str, list[tuple[int, int]]] = {str(s): [] for s in range(self.num_shards)}
        for key, (shard,) in sorted(self.holders.items()):
            out[str(shard)].append(key)
        return out


def imbalance(shard_load: torch.Tensor) -> torch.Tensor:
    """[L] max / mean of each layer's shard loads (1.0 = even; what the layer's hop waits for)."""
    mean = shard_load.mean(dim=1).clamp_min(1e-9)
    return shard_load.max(dim=1).values / mean


def round_robin(layers: list[int], num_experts: int, num_shards: int) -> Balanced:
    return Balanced({(layer, e): (e % num_shards,) for layer in layers for e in range(num_experts)}, num_shards)


def balance(load: torch.Tensor, layers: list[int], num_shards: int, spare_slots: int = 0) -> Balanced:
    """The placement for `load` [L, E] (row i = MoE layer layers[i]) over `num_shards` shards, each
    with ceil(E / S) + spare_slots expert slots a layer. Deterministic: ties go to the lower id."""
    num_experts = load.shape[1]
    if num_shards < 1 or num_shards > num_experts:
        raise ValueError(f"num_shards must be in 1..{num_experts}, got {num_shards}")
    slots = -(-num_experts // num_shards) + spare_slots
    holders: dict[ExpertKey, tuple[int, ...]] = {}
    for i, layer in enumerate(layers):
        tokens = [float(t) for t in load[i]]
        replicas = [1] * num_experts
        for _ in range(min(slots * num_shards - num_experts, num_experts * (num_shards - 1))):
            # The next replica goes where it cuts the largest per-replica load (an expert is held
            # by at most every shard once).
            e = max((e for e in range(num_experts) if replicas[e] < num_shards),
                    key=lambda e: (tokens[e] / replicas[e], -e))
            replicas[e] += 1
        pieces = sorted(((tokens[e] / replicas[e], e) for e in range(num_experts) for _ in range(replicas[e])),
                        key=lambda p: (-p[0], p[1]))
        shard_tokens, used = [0.0] * num_shards, [0] * num_shards
        held: dict[int, list[int]] = {e: [] for e in range(num_experts)}
        for share, e in pieces:
            shard = min((s for s in range(num_shards) if used[s] < slots and s not in held[e]),
                        key=lambda s: (shard_tokens[s], used[s], s))
            shard_tokens[shard] += share
            used[shard] += 1
            held[e].append(shard)
        for e in range(num_experts):
            holders[(layer, e)] = tuple(sorted(held[e]))
    return Balanced(holders, num_shards)
