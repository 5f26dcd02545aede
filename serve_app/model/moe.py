"""The MoE block split in two: a router that plans, and experts reached through a backend.

Why the split: the router (gate → softmax → top-k → renormalise) is cheap and stays with the
dense layers; the experts are most of the weights and may live elsewhere (an expert shard on
another GPU, or a quantized copy). The router's output is a `DispatchPlan` — per expert, which
token rows go there and with what weight — and any `ExpertBackend` computes the FFNs on those
rows. `combine` is the only place outputs are summed, always in ascending expert order, so every
backend gives bit-identical results in float32.

Legend: T=tokens in the step, D=hidden, E=experts, K=top-k, F=expert FFN width, R=rows of one expert.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from serve_app.model import cpu_kernels

ExpertKey = tuple[int, int]  # (layer, expert)


@dataclass
class ExpertAssignment:
    expert: int
    rows: torch.Tensor     # [R] int64, indices into the layer input, ascending within (token, k) order
    weights: torch.Tensor  # [R] routing weight of this expert for each row, in the activation dtype


@dataclass
class DispatchPlan:
    layer: int
    num_tokens: int                       # T
    topk_ids: torch.Tensor                # [T, K] chosen experts per token
    topk_weights: torch.Tensor            # [T, K] their weights (renormalised when the family says so)
    router_logits: torch.Tensor           # [T, E] kept for the training load-balancing loss and metrics
    assignments: list[ExpertAssignment]   # ascending expert id; only experts that received rows

    @property
    def experts(self) -> list[int]:
        return [a.expert for a in self.assignments]


def route(x: torch.Tensor, gate_weight: torch.Tensor, top_k: int, normalize: bool, layer: int) -> DispatchPlan:
    """Gate → softmax (float32, as the reference implementations do) → top-k → optional renorm."""
    if (fused := cpu_kernels.for_tensor(x)) is not None and gate_weight.dtype == torch.float32:
        # One kernel for the ~12 ops below (a 16-bit inference step on CPU); same plan layout.
        logits, ids, weights, rows, flat_w, counts = fused.moe_route(x, gate_weight, top_k, normalize)
        return _plan(layer, x.shape[0], ids, weights, logits, rows, flat_w, counts.tolist())
    # In the gate's dtype: a bf16 lane of a float32 model still routes with float32 logits.
    logits = F.linear(x if x.dtype == gate_weight.dtype else x.to(gate_weight.dtype), gate_weight)  # [T, E]
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)     # [T, E]
    weights, ids = torch.topk(probs, top_k, dim=-1)                # [T, K], [T, K]
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    weights = weights.to(x.dtype)

    num_experts = gate_weight.shape[0]
    flat_ids = ids.flatten()                                       # [T*K]
    order = torch.argsort(flat_ids, stable=True)                   # [T*K] grouped by expert
    counts = torch.bincount(flat_ids, minlength=num_experts).tolist()
    rows = order // top_k                                          # [T*K] token row of each slot
    flat_w = weights.flatten()[order]                              # [T*K]
    return _plan(layer, x.shape[0], ids, weights, logits, rows, flat_w, counts)


def _plan(layer: int, num_tokens: int, ids, weights, logits, rows, flat_w, counts: list[int]) -> DispatchPlan:
    """rows/flat_w [T*K] grouped by ascending expert, `counts` [E] rows per expert."""
    assignments, start = [], 0
    for expert, count in enumerate(counts):
        if count:
            assignments.append(ExpertAssignment(expert, rows[start:start + count], flat_w[start:start + count]))
        start += count
    return DispatchPlan(layer, num_tokens, ids, weights, logits, assignments)


def restrict_plan(plan: DispatchPlan, mask: torch.Tensor) -> DispatchPlan:
    """The part of `plan` for the token rows where mask [T] is True (experts left with no rows drop out)."""
    assignments = []
    for a in plan.assignments:
        keep = mask[a.rows]                                         # [R]
        if bool(keep.any()):
            assignments.append(ExpertAssignment(a.expert, a.rows[keep], a.weights[keep]))
    return DispatchPlan(plan.layer, plan.num_tokens, plan.topk_ids, plan.topk_weights, plan.router_logits,
                        assignments)


def combine(plan: DispatchPlan, outputs: dict[int, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Weighted sum of expert outputs back in token order; ascending expert order fixes the float sum."""
    ys = [outputs[a.expert] for a in plan.assignments]
    if (fused := cpu_kernels.for_tensor(like)) is not None and all(y.dtype == like.dtype for y in ys):
        # One pass, summed in float32 and rounded once (torch's index_add_ rounds per expert).
        return fused.moe_combine(like, ys, [a.rows for a in plan.assignments], [a.weights for a in plan.assignments])
    out = torch.zeros_like(like)                                   # [T, D]
    for a in plan.assignments:
        out.index_add_(0, a.rows, outputs[a.expert] * a.weights[:, None])
    return out


def run_and_combine(backend: "ExpertBackend", x: torch.Tensor, plan: DispatchPlan,
                    packed: bool = False) -> torch.Tensor:
    """combine(plan, backend.run_experts(x, plan)) [T, D]; in one call where the backend can
    (`run_combined`: quantized local experts on the fused CPU kernels, None where they do not
    apply; `packed`: at any rows per expert, see precision.RowPrecision.packed)."""
    fused = getattr(backend, "run_combined", None)
    out = fused(x, plan, packed) if fused is not None else None
    return out if out is not None else combine(plan, backend.run_experts(x, plan), like=x)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's silu(gate) * up on the fused projection [R, 2F] → [R, F] (one kernel on a 16-bit
    inference step on CPU: cpu_kernels)."""
    if (fused := cpu_kernels.for_tensor(gate_up)) is not None:
        return fused.silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)                           # [R, F] each
    return F.silu(gate) * up


class ExpertFFN(nn.Module):
    """SwiGLU expert: down(silu(gate(x)) * up(x)); gate and up fused into one matmul."""

    def __init__(self, hidden: int, width: int, dtype: torch.dtype | None = None, device=None):
        super().__init__()
        self.gate_up = nn.Parameter(torch.empty(2 * width, hidden, dtype=dtype, device=device))  # [2F, D]
        self.down = nn.Parameter(torch.empty(hidden, width, dtype=dtype, device=device))         # [D, F]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(silu_mul(F.linear(x, self.gate_up)), self.down)   # [R, 2F] → [R, F] → [R, D]


class ExpertBackend(Protocol):
    """Computes (layer, expert) FFNs on the rows a plan sends them; returns unweighted outputs."""

    def holds(self) -> frozenset[ExpertKey]: ...

    def run_experts(self, x: torch.Tensor, plan: DispatchPlan) -> dict[int, torch.Tensor]:
        """{expert: [R, D]} for every assignment in `plan`; x is the layer input [T, D]."""
        ...


class MissingExpertError(RuntimeError):
    """A plan routed tokens to an expert that no backend holds."""


class KeyedExperts:
    """ExpertBackend over in-process FFN modules in `self.ffn` (an nn.ModuleDict keyed "layer_expert");
    shared by the float experts and their quantized copies."""
    ffn: nn.ModuleDict

    def holds(self) -> frozenset[ExpertKey]:
        return frozenset(tuple(int(p) for p in name.split("_")) for name in self.ffn)

    def run_experts(self, x: torch.Tensor, plan: DispatchPlan) -> dict[int, torch.Tensor]:
        out = {}
        for a in plan.assignments:
            name = f"{plan.layer}_{a.expert}"
            if name not in self.ffn:
                raise MissingExpertError(f"expert {a.expert} of layer {plan.layer} is not held by this backend")
            out[a.expert] = self.ffn[name](x.index_select(0, a.rows))   # [R, D]
        return out


class LocalExpertBackend(KeyedExperts, nn.Module):
    """Experts in this process. A module, so `.to(device)` and state_dict cover the weights."""

    def __init__(self, keys: Iterable[ExpertKey], hidden: int, width: int, dtype=None, device=None):
        super().__init__()
        self.ffn = nn.ModuleDict({f"{layer}_{expert}": ExpertFFN(hidden, width, dtype, device)
                                  for layer, expert in sorted(set(keys))})


class ExpertsByPrecision:
    """The backends MoE layers use: `full` for full-precision rows (local experts, or shards), and
    `reduced` quantized copies by name ("int8", "int4") held by the router for the fast path."""

    def __init__(self, full: ExpertBackend):
        self.full = full
        self.reduced: dict[str, ExpertBackend] = {}

    def get(self, precision: str) -> ExpertBackend:
        if precision == "full":
            return self.full
        try:
            return self.reduced[precision]
        except KeyError:
            raise MissingExpertError(f"no {precision!r} experts are loaded; have: full, "
                                     f"{', '.join(sorted(self.reduced)) or 'nothing else'}") from None


class PartitionedBackend:
    """Several backends, each owning a disjoint set of experts; sends each expert's rows to its owner.

    Sequential on purpose: this is the in-process reference. Concurrent transports live in
    `serve_app.parallel` and must produce the same outputs.
    """

    def __init__(self, backends: list[ExpertBackend]):
        self.owner: dict[ExpertKey, ExpertBackend] = {}
        for backend in backends:
            for key in backend.holds():
                if key in self.owner:
                    raise ValueError(f"expert {key} is held by two backends")
                self.owner[key] = backend
        self.backends = backends

    def holds(self) -> frozenset[ExpertKey]:
        return frozenset(self.owner)

    def run_experts(self, x: torch.Tensor, plan: DispatchPlan) -> dict[int, torch.Tensor]:
        by_backend: dict[int, list[ExpertAssignment]] = {}
        for a in plan.assignments:
            backend = self.owner.get((plan.layer, a.expert))
            if backend is None:
                raise MissingExpertError(f"no backend holds expert {a.expert} of layer {plan.layer}")
            by_backend.setdefault(id(backend), []).append(a)
        out: dict[int, torch.Tensor] = {}
        for backend in self.backends:
            part = by_backend.get(id(backend))
            if part:
                sub = DispatchPlan(plan.layer, plan.num_tokens, plan.topk_ids, plan.topk_weights,
                                   plan.router_logits, part)
                out.update(backend.run_experts(x, sub))
        return out
