"""Expert transports: how a MoE layer's rows reach the shards that own the experts, and come back.

Every transport is an `ExpertBackend` (serve_app.model.moe): it returns unweighted FFN outputs
per expert and the model's `combine` sums them in one fixed order, so all transports give
bit-identical results in float32. Per layer, a transport sends each shard ONE request holding
the rows of all its experts (rows grouped by expert, ascending), all shards concurrently, then
waits for all of them — the hop cost is per shard per layer, never per expert or per token.

A replicated expert (several holders in the placement, parallel/eplb.py) has its rows split into
contiguous, nearly equal parts, one per holder; which holder gets the first part turns with every
layer call (`turn`), so the one or two rows an expert gets at decode spread over its holders too;
the parts' outputs are put back in row order (`Replies`). Each part is its own, smaller matrix product, so its float sums may differ
from the whole one's in the last bit. The placement can be swapped between layers
(`set_placement`, the Router's re-placement): a layer reads it once.

- `local`: the router's own `LocalExpertBackend` (no transport at all).
- `serve`: Ray Serve DeploymentHandles to ExpertShard deployments. Simple, elastic and restartable;
  5–23 ms per layer (1–4 shards) from inside a replica on the 2-core machine (docs/benchmarks.md).
- `socket` (`socket_plane.py`, the default): one TCP connection per shard, Serve only tells the
  router where each shard listens; 0.5–1.3 ms per layer with the FFNs (1–4 shards).

Legend: T=tokens in the step, D=hidden, R=rows sent to one shard.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import ray
import torch

from serve_app.model.moe import DispatchPlan, ExpertAssignment, ExpertKey, LocalExpertBackend
from serve_app.parallel.placement import PlacementPlan


class ShardUnavailableError(RuntimeError):
    """A shard did not answer (dead, restarting, or past the dispatch timeout)."""

    def __init__(self, shard: int, cause: BaseException):
        super().__init__(f"expert shard {shard} is unavailable: {type(cause).__name__}: {cause}")
        self.shard = shard


@dataclass
class ShardRequest:
    """One layer's work for one shard."""
    layer: int
    experts: list[int]           # ascending expert ids
    counts: list[int]            # rows per expert, same order
    x: torch.Tensor              # [R, D] the rows, grouped by expert in `experts` order


@dataclass
class DispatchRecord:
    """One shard call, for metrics: which shard, how many rows, how long the round trip took."""
    shard: int
    layer: int
    rows: int
    seconds: float


def run_shard_request(backend: LocalExpertBackend, req: ShardRequest) -> torch.Tensor:
    """Shard side: the FFN of each expert on its rows, concatenated in request order → [R, D]."""
    return run_ffns([backend.ffn[f"{req.layer}_{e}"] for e in req.experts], req)


def run_ffns(ffns: list[torch.nn.Module], req: ShardRequest) -> torch.Tensor:
    """`ffns[i]` (expert req.experts[i]'s FFN) on its rows of the request, in order → [R, D]."""
    outputs, start = [], 0
    for ffn, count in zip(ffns, req.counts):
        outputs.append(ffn(req.x[start:start + count]))
        start += count
    return torch.cat(outputs) if outputs else req.x.new_zeros(req.x.shape)


@dataclass(frozen=True)
class Piece:
    """Rows of one expert sent to one shard: all of them, or part `part` of a replicated expert's."""
    expert: int
    part: int
    rows: torch.Tensor           # [r] indices into the layer input


def build_requests(x: torch.Tensor, plan: DispatchPlan, holders: dict[ExpertKey, tuple[int, ...]],
                   turn: int = 0) -> dict[int, tuple[ShardRequest, list[Piece]]]:
    """Group a layer's rows by shard: shard → (request, its pieces in request order)."""
    by_shard: dict[int, list[Piece]] = {}
    for a in plan.assignments:
        held = holders[(plan.layer, a.expert)]
        parts = a.rows.tensor_split(len(held)) if len(held) > 1 else (a.rows,)
        first = turn % len(held)
        for part, (shard, rows) in enumerate(zip(held[first:] + held[:first], parts)):
            if len(rows):
                by_shard.setdefault(shard, []).append(Piece(a.expert, part, rows))
    requests = {}
    for shard, pieces in by_shard.items():
        rows = torch.cat([p.rows for p in pieces])                    # [R]
        requests[shard] = (ShardRequest(plan.layer, [p.expert for p in pieces],
                                        [len(p.rows) for p in pieces], x.index_select(0, rows)), pieces)
    return requests


class Replies:
    """A layer's answers, per expert in row order (a replicated expert's parts from each holder)."""

    def __init__(self):
        self._parts: dict[int, list[tuple[int, torch.Tensor]]] = {}

    def add(self, y: torch.Tensor, pieces: list[Piece]) -> None:
        for piece, out in zip(pieces, y.split([len(p.rows) for p in pieces])):
            self._parts.setdefault(piece.expert, []).append((piece.part, out))

    def outputs(self) -> dict[int, torch.Tensor]:
        return {e: parts[0][1] if len(parts) == 1 else torch.cat([t for _, t in sorted(parts, key=lambda p: p[0])])
                for e, parts in self._parts.items()}


@dataclass
class ShardTransport:
    """What every transport to the ExpertShard deployments is given (`handles[i]` = ExpertShard<i>'s
    Serve handle) and shares; called from the engine thread."""
    handles: Sequence                       # DeploymentHandle per shard index
    placement: PlacementPlan
    timeout_s: float = 10.0                 # one deadline for a whole layer, all shards together
    on_dispatch: Callable[[DispatchRecord], None] | None = None
    holders: dict[ExpertKey, tuple[int, ...]] = field(init=False)

    def __post_init__(self):
        self.holders = self.placement.holders()
        self.turns = itertools.count()      # build_requests' turn: one per layer call

    def holds(self) -> frozenset[ExpertKey]:
        return frozenset(self.holders)

    def set_placement(self, placement: PlacementPlan) -> None:
        """Route the next layers by `placement`: the same remote experts, on other shards (the shards
        must hold them by now: parallel/expert_store.py). One assignment, so a layer sees the old
        map or the new one, never a mix."""
        self.check_placement(placement)
        self.placement, self.holders = placement, placement.holders()

    def check_placement(self, placement: PlacementPlan) -> None:
        """Raises unless `placement` keeps this one's remote experts and shards (what can change live)."""
        if frozenset(placement.holders()) != self.holds() or placement.num_shards != self.placement.num_shards:
            raise ValueError("a new placement must keep the same remote experts and the same shards")

    def quiesce(self) -> None:
        """Returns once no layer routed by an earlier placement is still waiting on a shard. Serve
        handle calls are not tracked: a late one finds its expert dropped and the shard reads it again
        (parallel/expert_store.py)."""


@dataclass
class ServeTransport(ShardTransport):
    """ExpertBackend over Serve handle calls: one `run` call per shard per layer."""

    def run_experts(self, x: torch.Tensor, plan: DispatchPlan) -> dict[int, torch.Tensor]:
        """All shards' calls go out at once and share one deadline (the layer waits at most
        timeout_s in all, not timeout_s per shard); answers are taken as they arrive, so each
        shard's recorded round trip is its own, not its own plus the slower shards' before it;
        when one shard fails, the others' calls are cancelled. (`_to_object_ref_sync` is Serve's
        developer API; `result()` alone cannot wait for whichever answer comes first.)"""
        started = time.perf_counter()
        deadline = started + self.timeout_s
        calls = {}
        for shard, (req, assigns) in build_requests(x, plan, self.holders, next(self.turns)).items():
            calls[shard] = (req, assigns, self.handles[shard].run.remote(req))      # all in flight
        out = Replies()
        blame = next(iter(calls), -1)      # the shard a failure is reported against
        try:
            by_ref = {}
            for shard, (_, _, response) in calls.items():
                blame = shard              # assignment to a replica can fail or time out
                by_ref[response._to_object_ref_sync(_timeout_s=self._left(deadline))] = shard
            pending = list(by_ref)
            while pending:
                ready, pending = ray.wait(pending, num_returns=1, timeout=self._left(deadline))
                if not ready:
                    blame = by_ref[pending[0]]
                    raise TimeoutError(f"no answer within {self.timeout_s:g} s")
                blame = by_ref[ready[0]]
                req, assigns, _ = calls.pop(blame)
                y = ray.get(ready[0])
                if self.on_dispatch is not None:
                    self.on_dispatch(DispatchRecord(blame, plan.layer, req.x.shape[0], time.perf_counter() - started))
                out.add(y.to(x.device), assigns)
        except Exception as exc:           # noqa: BLE001 - actor death, timeout, cancellation alike
            for _, _, response in calls.values():
                response.cancel()          # the layer failed: the other shards' work is wasted
            raise ShardUnavailableError(blame, exc) from exc
        return out.outputs()

    @staticmethod
    def _left(deadline: float) -> float:
        return max(0.0, deadline - time.perf_counter())
