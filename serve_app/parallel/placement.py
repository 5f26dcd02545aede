"""Placement plan: which (layer, expert) FFNs live on which expert shard, and which stay local.

Round-robin by expert index is the default (expert e → shard e % N, in every MoE layer), so each
shard holds the same experts in all layers and load spreads evenly when the router balances its
experts. An explicit layout (config) can say anything else, including "local": experts the router
keeps in its own process (no hop at all). An expert may be held by several shards (a replica per
holder, parallel/eplb.py): its rows are then split between them (parallel/transport.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from serve_app.model.config import ModelConfig
from serve_app.model.moe import ExpertKey

LOCAL = "local"


class PlacementError(ValueError):
    """A layout that misses, duplicates or invents experts."""


@dataclass(frozen=True)
class ShardSpec:
    index: int                          # shard number; its deployment is ExpertShard<index>
    experts: tuple[ExpertKey, ...]      # (layer, expert) pairs this shard loads and serves


@dataclass(frozen=True)
class PlacementPlan:
    shards: tuple[ShardSpec, ...]
    local: tuple[ExpertKey, ...]        # experts the router computes in-process

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    def owner(self) -> dict[ExpertKey, int]:
        """(layer, expert) → the first shard holding it, for remote experts only."""
        return {key: holders[0] for key, holders in self.holders().items()}

    def holders(self) -> dict[ExpertKey, tuple[int, ...]]:
        """(layer, expert) → the shards holding it, ascending, for remote experts only."""
        out: dict[ExpertKey, list[int]] = {}
        for shard in self.shards:
            for key in shard.experts:
                out.setdefault(key, []).append(shard.index)
        return {key: tuple(h) for key, h in out.items()}

    @classmethod
    def from_holders(cls, holders: dict[ExpertKey, tuple[int, ...]], num_shards: int,
                     local: tuple[ExpertKey, ...] = ()) -> "PlacementPlan":
        """A plan from `eplb.Balanced.holders` (several holders = a replicated expert)."""
        shards = tuple(ShardSpec(i, tuple(sorted(k for k, h in holders.items() if i in h))) for i in range(num_shards))
        return cls(shards, tuple(sorted(local)))

    @classmethod
    def round_robin(cls, cfg: ModelConfig, num_shards: int) -> "PlacementPlan":
        if num_shards < 0:
            raise PlacementError(f"expert_shards must be >= 0, got {num_shards}")
        if num_shards == 0:
            return cls((), _all_experts(cfg))
        if num_shards > cfg.num_experts:
            raise PlacementError(f"expert_shards={num_shards} exceeds the {cfg.num_experts} experts per layer")
        shards = tuple(ShardSpec(i, tuple((layer, e) for layer in cfg.moe_layers
                                          for e in range(cfg.num_experts) if e % num_shards == i))
                       for i in range(num_shards))
        return cls(shards, ())

    @classmethod
    def from_layout(cls, cfg: ModelConfig, layout: Mapping[str, Sequence]) -> "PlacementPlan":
        """layout: {"0": [0, 1], "1": [[0, 2], [1, 3]], "local": [...]} — an int means that expert
        in every MoE layer, a pair means one (layer, expert). Shard names must be 0..N-1. An expert
        on several shards is replicated there; local experts are the Router's alone."""
        placed: dict[ExpertKey, list[str]] = {}
        shard_names = sorted((k for k in layout if k != LOCAL), key=_shard_index)
        if [_shard_index(k) for k in shard_names] != list(range(len(shard_names))):
            raise PlacementError(f"shard names must be 0..N-1 (and optionally 'local'), got {sorted(layout)}")
        for name, items in layout.items():
            for key in _expand(cfg, items, name):
                where = placed.setdefault(key, [])
                if where and (name in where or LOCAL in (name, *where)):
                    raise PlacementError(f"expert {key} is placed twice: on {where[0]!r} and {name!r}")
                where.append(name)
        missing = sorted(set(_all_experts(cfg)) - set(placed))
        if missing:
            raise PlacementError(f"experts {missing[:8]}{'...' if len(missing) > 8 else ''} are not placed")
        shards = tuple(ShardSpec(i, tuple(sorted(k for k, n in placed.items() if name in n)))
                       for i, name in enumerate(shard_names))
        return cls(shards, tuple(sorted(k for k, n in placed.items() if LOCAL in n)))


def _shard_index(name: str) -> int:
    try:
        return int(name)
    except ValueError:
        raise PlacementError(f"shard name {name!r} is not an integer or 'local'") from None


def _all_experts(cfg: ModelConfig) -> tuple[ExpertKey, ...]:
    return tuple((layer, e) for layer in cfg.moe_layers for e in range(cfg.num_experts))


def _expand(cfg: ModelConfig, items: Sequence, where: str) -> list[ExpertKey]:
    keys = []
    for item in items:
        pairs = [(layer, item) for layer in cfg.moe_layers] if isinstance(item, int) else [tuple(item)]
        for layer, expert in pairs:
            if layer not in cfg.moe_layers or not 0 <= expert < cfg.num_experts:
                raise PlacementError(f"{where!r} names expert {(layer, expert)}, which does not exist")
            keys.append((int(layer), int(expert)))
    return keys
