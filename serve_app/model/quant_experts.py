"""Quantized expert FFNs and the router's fast-path expert copies (weights: model/quant.py).

Each expert's fused gate_up [2F, D] and down [D, F] become QuantLinears of one mode; a backend of
them is keyed like LocalExpertBackend (`ffn["L_E"]`), so the MoE layer calls it the same way. On a
16-bit CPU step the whole layer's experts run in one fused kernel call (`run_combined`).

Legend: R=rows of one expert, D=hidden, F=expert FFN width, T=tokens of the step.
"""
from __future__ import annotations

import torch
from torch import nn

from serve_app.model import cpu_kernels
from serve_app.model.moe import ExpertFFN, KeyedExperts, LocalExpertBackend, silu_mul
from serve_app.model.quant import DEFAULT_GROUP_SIZE, NO_LIMIT, QuantLinear, QuantMode, _check_mode, wants_dense_copy


class QuantizedExpertFFN(nn.Module):
    """ExpertFFN with quantized weights: down(silu(gate(x)) * up(x)), gate and up still fused."""

    def __init__(self, gate_up: QuantLinear, down: QuantLinear):
        super().__init__()
        self.gate_up, self.down = gate_up, down   # [2F, D] and [D, F] as weights

    @classmethod
    def from_float(cls, ffn: ExpertFFN, mode: QuantMode = "int8", group_size: int = DEFAULT_GROUP_SIZE,
                   path: str | None = None, dtype: torch.dtype | None = None) -> "QuantizedExpertFFN":
        """dtype: of the activations it will take (default: the float weights')."""
        return cls(QuantLinear.from_weight(ffn.gate_up.detach(), mode, group_size, dtype, path=path),
                   QuantLinear.from_weight(ffn.down.detach(), mode, group_size, dtype, path=path))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(silu_mul(self.gate_up(x)))               # [R, 2F] → [R, F] → [R, D]

    def nbytes(self) -> int:
        return self.gate_up.nbytes() + self.down.nbytes()


class QuantizedExpertBackend(KeyedExperts, nn.Module):
    """An ExpertBackend over quantized experts, keyed like LocalExpertBackend (`ffn["L_E"]`)."""

    def __init__(self, ffns: dict[str, QuantizedExpertFFN], mode: QuantMode, group_size: int):
        super().__init__()
        self.mode, self.group_size = mode, group_size
        self.ffn = nn.ModuleDict(ffns)
        self._fused_cache: tuple | None = None      # run_combined's operands; reset by materialize()

    @classmethod
    def from_backend(cls, local: LocalExpertBackend, mode: QuantMode = "int8",
                     group_size: int = DEFAULT_GROUP_SIZE, path: str | None = None,
                     dtype: torch.dtype | None = None) -> "QuantizedExpertBackend":
        """Quantize every expert of `local`, on its device, for activations of `dtype` (default its own)."""
        _check_mode(mode, group_size)
        return cls({name: QuantizedExpertFFN.from_float(ffn, mode, group_size, path, dtype)
                    for name, ffn in local.ffn.items()}, mode, group_size)

    def materialize(self) -> "QuantizedExpertBackend":
        """See QuantLinear.materialize; returns self."""
        for module in self.modules():
            if isinstance(module, QuantLinear):
                module.materialize()
        self._fused_cache = None
        return self

    def run_combined(self, x: torch.Tensor, plan, packed: bool = False) -> torch.Tensor | None:
        """moe.combine(plan, run_experts(x, plan)) in one fused kernel call (cpu_kernels
        `moe_quant_experts`), or None where it does not apply (no fused layout, not a 16-bit
        inference step, more rows than the row limit unless `packed`): the caller then runs the
        experts one by one."""
        fused = cpu_kernels.for_tensor(x)
        if fused is None or not plan.assignments:
            return None
        if self._fused_cache is None:
            self._fused_cache = self._fused_operands()
        operands, limit, group, width = self._fused_cache
        if not packed and max(a.rows.numel() for a in plan.assignments) > limit:
            return None                   # a prefill chunk: the experts' dense copies multiply faster (row_limit)
        lists: list[list[torch.Tensor]] = [[], [], [], []]    # gate_up, its scales, down, its scales
        for a in plan.assignments:
            ops = operands.get(f"{plan.layer}_{a.expert}")
            if ops is None:
                return None                   # a missing expert or no fused layout: the plain path says why
            for dst, t in zip(lists, ops):
                dst.append(t)
        return fused.moe_quant_experts(x.contiguous(), [a.rows for a in plan.assignments],
                                       [a.weights for a in plan.assignments], *lists, width, group)

    def _apply(self, fn, *args, **kwargs):
        self._fused_cache = None                # .to() and friends replace the buffers it holds
        return super()._apply(fn, *args, **kwargs)

    def _fused_operands(self) -> tuple[dict[str, tuple], int, int, int]:
        """What run_combined hands the kernel, read once (40 µs of module attribute lookups a layer
        call otherwise, at a 1.8 ms decode step): per expert its packed gate_up and down with their
        scales (experts without the fused layout are left out), the row limit above which the dense
        copies win (NO_LIMIT without them), the kernel's group code and the FFN width."""
        operands = {}
        for name, ffn in self.ffn.items():
            if "packed" in ffn.gate_up._buffers and "packed" in ffn.down._buffers:
                operands[name] = (ffn.gate_up.packed, ffn.gate_up.packed_scales, ffn.down.packed,
                                  ffn.down.packed_scales)
        first = next(iter(self.ffn.values()))
        has_dense = "dense" in first.down._buffers
        limit = min(first.gate_up.row_limit, first.down.row_limit) if has_dense else NO_LIMIT
        return operands, limit, first.down.fused_group, first.down.in_features

    def bytes_per_expert(self) -> int:
        """Weights + scales (+ the int4 kernel's zeros) of one expert; all experts are the same size."""
        return max(ffn.nbytes() for ffn in self.ffn.values())


def quantized_copies(local: LocalExpertBackend, modes, group_size: int = DEFAULT_GROUP_SIZE,
                     materialize: bool | str = "auto", dtype: torch.dtype | None = None
                     ) -> dict[str, QuantizedExpertBackend]:
    """The router's fast-path experts: one quantized copy of `local` per mode, for activations of
    `dtype`. `materialize` (see wants_dense_copy) keeps the dequantized weight where
    QuantLinear.materialize says it pays: every call on the dequant path, prefill chunks on the
    kernel path."""
    on_cpu = all(p.device.type == "cpu" for p in local.parameters())
    keep = wants_dense_copy(materialize, "cpu" if on_cpu else "cuda")
    copies = {}
    for mode in modes:
        copy = QuantizedExpertBackend.from_backend(local, mode, group_size, dtype=dtype)
        copies[mode] = copy.materialize() if keep else copy
    return copies
