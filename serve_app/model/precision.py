"""Adaptive precision inside the model: which precision each row of a step runs at, dense linears
that follow it, and the set-up that gives a model its quantized lanes.

A step's rows carry a precision ("full", "int8", "int4"). The MoE layers send each group of rows
to that precision's experts (moe.ExpertsByPrecision); the dense linears here do the same with
their own quantized copies, so a fast-lane step reads INT8/INT4 weights only, in every layer and
the LM head (W8A16 / W4A16, as vLLM and TGI serve quantized models). A step is usually one
precision (the lanes batch them apart), so the common case is one call per linear, no gathers.

Legend: T=tokens in the step, Tg=rows of one precision group, K=in features, N=out features.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from serve_app.model.quant import DEFAULT_GROUP_SIZE, QuantLinear, wants_dense_copy
from serve_app.model.quant_experts import quantized_copies


@dataclass
class RowPrecision:
    """The precision of every row of one step; groups are disjoint and cover all rows."""
    precisions: list[str]       # one per group, sorted
    codes: torch.Tensor | None  # [T] int64 group of each row; None when there is one group
    # With several groups, per group: [T] bool restricting a DispatchPlan to its rows, and [Tg]
    # int64 gathering its rows for a dense linear. With one group nothing is restricted or
    # gathered, so both are empty (no tensor is built for the common single-precision step).
    masks: list[torch.Tensor]
    index: list[torch.Tensor]
    # Quantized weights multiply with their packed kernels at any row count, never with the dense
    # copies that calls above `QuantLinear.row_limit` rows take: a step that verifies drafts, whose
    # rows must compute what one-row decode steps compute (the packed kernels sum a row in the
    # same order whatever the rows beside it; the dense GEMM sums in another, and in bf16 that
    # flipped greedy tokens: docs/benchmarks.md 2026-12-04, "row-count-invariant verification").
    packed: bool = False

    @classmethod
    def of_rows(cls, precisions: list[str], device, packed: bool = False) -> "RowPrecision | None":
        """None when every row is full precision (no quantized weight is touched at all)."""
        if all(p == "full" for p in precisions):
            return None
        names = sorted(set(precisions))
        if len(names) == 1:
            return cls.uniform(names[0], packed)
        return cls._of_codes(names, torch.tensor([names.index(p) for p in precisions], device=device), packed)

    @classmethod
    def uniform(cls, precision: str, packed: bool = False) -> "RowPrecision":
        """Every row of the step at `precision`."""
        return cls([precision], None, [], [], packed)

    @classmethod
    def _of_codes(cls, names: list[str], codes: torch.Tensor, packed: bool) -> "RowPrecision":
        masks = [codes == i for i in range(len(names))]
        return cls(names, codes, masks, [m.nonzero().flatten() for m in masks], packed)

    def take(self, rows: torch.Tensor) -> "RowPrecision":
        """The precisions of rows [N] of this step (the rows that reach the LM head)."""
        if self.codes is None:
            return self
        return RowPrecision._of_codes(self.precisions, self.codes.index_select(0, rows), self.packed)

    @property
    def single(self) -> str | None:
        """The step's one precision, or None when rows of several precisions share it."""
        return self.precisions[0] if len(self.precisions) == 1 else None


def shared_copy(copies: dict, rows: RowPrecision):
    """The one entry of `copies` (quantized copies by lane) that serves every row of the step, or
    None. Under load a fast-lane step mixes INT4 and INT8 rows, whose dense weights are the same
    INT8 copy (DENSE_MODE): one call on all rows then, not one gather + call + scatter per lane."""
    first = copies.get(rows.precisions[0])
    if first is None:
        return None
    for p in rows.precisions[1:]:
        if copies.get(p) is not first:
            return None
    return first


class Linear(nn.Linear):
    """nn.Linear (same parameters, same checkpoint keys) that runs each row at its precision.

    `reduced` holds the quantized copies by mode; it is derived data, not a submodule, so
    state_dict and checkpoints see exactly the float layer. A precision with no copy here (the
    MoE gate, a model without quantized lanes) runs on the float weight cast to the input dtype.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        object.__setattr__(self, "reduced", {})

    def forward(self, x: torch.Tensor, rows: RowPrecision | None = None) -> torch.Tensor:
        if rows is None:
            return self._run("full", x)
        if rows.single is not None:
            return self._run(rows.single, x, rows.packed)
        if shared_copy(self.reduced, rows) is not None:                              # one weight for all rows
            return self._run(rows.precisions[0], x, rows.packed)
        out = x.new_empty(*x.shape[:-1], self.out_features)                          # [T, N]
        for precision, index in zip(rows.precisions, rows.index):
            out.index_copy_(0, index, self._run(precision, x.index_select(0, index), rows.packed))
        return out

    def _run(self, precision: str, x: torch.Tensor, packed: bool = False) -> torch.Tensor:
        quant = self.reduced.get(precision)
        if quant is None:
            w, b = self.weight, self.bias
            if w.dtype != x.dtype:
                w, b = w.to(x.dtype), (b.to(x.dtype) if b is not None else None)
            return F.linear(x, w, b)                                                  # [..., N]
        y = quant(x, packed)
        return y if self.bias is None else y + self.bias.to(y.dtype)


# The weight format of the dense linears (attention, dense MLPs, LM head) in each lane. INT4 lanes
# keep INT8 dense weights: on the default model's held-out windows (bench/precision.py, 24 x 256
# tokens, 2026-12-01) INT4 everywhere agreed with float32 on 87.5% of next tokens, INT4 experts with
# an INT8 LM head 91.3%, INT4 experts with all dense INT8 94.4% — the dense part is a fifth of the
# bytes, so INT4 there saves little and costs the most agreement.
DENSE_MODE = {"int8": "int8", "int4": "int8"}


def quantize_dense(model: nn.Module, modes, group_size: int, dtype: torch.dtype,
                   materialize: bool | str = "auto") -> int:
    """Give every `Linear` of `model` a quantized copy for each lane in `modes` (in DENSE_MODE's
    format), packed for activations of `dtype`. Returns the bytes the copies hold."""
    total = 0
    for module in model.modules():
        if not isinstance(module, Linear):
            continue
        copies: dict[str, QuantLinear] = {}
        for lane in modes:
            mode = DENSE_MODE[lane]
            if mode not in copies:
                quant = QuantLinear.from_weight(module.weight.detach(), mode, group_size, dtype, module.weight.device)
                if wants_dense_copy(materialize, module.weight.device.type):
                    quant.materialize()
                copies[mode] = quant
                total += quant.nbytes()
            module.reduced[lane] = copies[mode]
    for module in model.modules():            # after the linears: fused layouts built from them
        if hasattr(module, "fuse_reduced"):
            module.fuse_reduced(group_size, dtype, materialize)
    return total


def fast_dtype(name: str, device_type: str = "cpu") -> torch.dtype:
    """AppConfig.fast_dtype → a dtype ('auto': measured by kernels.fast_lane_dtype)."""
    from serve_app.model.kernels import fast_lane_dtype
    return fast_lane_dtype(device_type) if name == "auto" else getattr(torch, name)


def add_quantized_lanes(model, experts, modes, group_size: int = DEFAULT_GROUP_SIZE,
                        dtype: torch.dtype | None = None, materialize: bool | str = "auto") -> None:
    """Set up the fast path on `model`: quantized copies of every expert in `experts` (a
    LocalExpertBackend holding all of them; the router's own may hold only a few) and of every
    dense linear, all for activations of `dtype` (default: the model's)."""
    dtype = dtype or model.embed_tokens.weight.dtype
    for mode, copy in quantized_copies(experts, modes, group_size, materialize, dtype).items():
        model.set_expert_backend(copy, mode)
    quantize_dense(model, modes, group_size, dtype, materialize)
    model.reduced_dtype = dtype
