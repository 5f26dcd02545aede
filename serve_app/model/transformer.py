"""One MoE decoder for every supported family, top-down: norm → attention → MLP/MoE → block → model.

Family differences are flags on `ModelConfig` (qkv bias, q/k norm, shared expert, renormalised
top-k, dense layers), read once at construction. Experts are not called directly: every MoE
layer asks `self.experts` (an `ExpertBackend`) for the FFN outputs of the rows its router
planned, so the same model runs with all experts local, a subset local, or experts remote.

Legend: B=batch, S=sequence length, T=tokens in a step (flat), D=hidden, H=query heads,
G=kv heads, Dh=head dim, E=experts, V=vocab.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from serve_app.model import cpu_kernels
from serve_app.model.attention import (AttentionMetadata, PagedKVCache, apply_rotary, causal_attention,
                                       paged_attention, rotary_lookup)
from serve_app.model.config import ModelConfig
from serve_app.model.moe import (DispatchPlan, ExpertBackend, ExpertsByPrecision, LocalExpertBackend,
                                 restrict_plan, route, run_and_combine)
from serve_app.model.precision import Linear, RowPrecision, shared_copy
from serve_app.model.quant import QuantLinear, wants_dense_copy


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 as the reference families do; torch's fused rms_norm is one op
        # instead of seven (a decode step calls this 2 x layers + 1 times). The reference then
        # rounds to x's dtype before the weight: identical in float32, half a bf16 step apart
        # (and closer to exact) in bf16.
        # The fused kernel also takes a float32 weight with 16-bit x (a bf16 fast lane over a float32
        # checkpoint), computing in float32 as the fallback below: 9 µs against 65 µs for the
        # fallback's seven ops on the Zen 3 (docs/benchmarks.md, 2026-12-03 afternoon).
        if (x.dtype == self.weight.dtype or self.weight.dtype == torch.float32) and \
                (fused := cpu_kernels.for_tensor(x)) is not None:
            return fused.add_rms_norm(x, None, self.weight, self.eps)[1]
        if x.dtype == self.weight.dtype:     # torch accumulates a 16-bit input in float32 itself
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return F.rms_norm(x.float(), self.weight.shape, self.weight.float(), self.eps).to(x.dtype)

    def add_forward(self, delta: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual + delta, norm of it): one fused kernel on a 16-bit inference step (the
        residual add and the norm read the same row), two ops elsewhere."""
        if delta.dtype == residual.dtype and self.weight.dtype in (delta.dtype, torch.float32) and \
                (fused := cpu_kernels.for_tensor(delta)) is not None:
            return fused.add_rms_norm(delta, residual, self.weight, self.eps)
        x = residual + delta
        return x, self(x)


@dataclass
class StepContext:
    """What every layer needs for one forward besides the hidden states."""
    positions: torch.Tensor                        # [B, S] or [T] token positions
    meta: AttentionMetadata | None = None          # None = plain causal attention, no cache
    kv_cache: PagedKVCache | None = None
    collect_router_logits: bool = False            # training: keep each MoE layer's [T, E] logits
    router_logits: list[torch.Tensor] = field(default_factory=list)
    expert_load: torch.Tensor | None = None        # [layers, E] running count of routed tokens (metrics)
    row_precision: RowPrecision | None = None      # adaptive precision; None = every row at full
    _rope: tuple | None = None                     # (key, cos, sin) of the first layer that asked

    def rope(self, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/signed sin [..., 1, Dh] of the step's positions, with a heads axis to broadcast over.
        Every layer asks the same question, so it is answered once per forward (at batch 1
        recomputing it per layer was ~4% of a decode step)."""
        key = (head_dim, theta, dtype)
        if self._rope is None or self._rope[0] != key:
            cos, sin = rotary_lookup(self.positions, head_dim, theta, dtype)
            self._rope = (key, cos.unsqueeze(-2), sin.unsqueeze(-2))
        return self._rope[1], self._rope[2]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.num_heads, self.num_kv, self.head_dim = layer, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.theta, self.scale = cfg.rope_theta, cfg.head_dim ** -0.5
        self.q_proj = Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        # Quantized lanes: q, k and v as one [(H+2G)·Dh, D] weight per lane (fuse_reduced), so a
        # step of one precision makes one projection call and one rotary call instead of three
        # and two (each op costs ~1.5 µs of dispatch at decode sizes). Derived data, not saved.
        object.__setattr__(self, "qkv_reduced", {})
        object.__setattr__(self, "qkv_bias", None)

    def fuse_reduced(self, group_size: int, dtype: torch.dtype, materialize: bool | str) -> None:
        """Build qkv_reduced for every lane q_proj has a copy for. Quantization is per output row
        (INT8) or per row-group (INT4), so the fused codes are exactly the three layers' codes."""
        w = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight]).detach()   # [(H+2G)·Dh, D]
        fused: dict[str, QuantLinear] = {}
        for lane, q in self.q_proj.reduced.items():
            if q.mode not in fused:
                fused[q.mode] = QuantLinear.from_weight(w, q.mode, group_size, dtype, w.device)
                if wants_dense_copy(materialize, w.device.type):
                    fused[q.mode].materialize()
            self.qkv_reduced[lane] = fused[q.mode]
        if self.q_proj.bias is not None:
            object.__setattr__(self, "qkv_bias", torch.cat([self.q_proj.bias, self.k_proj.bias,
                                                            self.v_proj.bias]).detach().to(dtype))

    def _project(self, x: torch.Tensor, ctx: StepContext):
        """q [..., H, Dh], k [..., G, Dh] (rotated) and v [..., G, Dh]."""
        lead, rows = x.shape[:-1], ctx.row_precision                 # (B, S) or (T,)
        h, g, dh = self.num_heads, self.num_kv, self.head_dim
        cos, sin = ctx.rope(dh, self.theta, x.dtype)                 # [..., 1, Dh]
        fused = shared_copy(self.qkv_reduced, rows) if rows is not None else None
        if fused is not None and self.q_norm is None:
            qkv = fused(x, rows.packed)                              # [..., (H+2G)·Dh]
            if self.qkv_bias is not None:
                qkv = qkv + self.qkv_bias
            qk = qkv[..., :(h + g) * dh].view(*lead, h + g, dh)                       # [..., H+G, Dh]
            if qk.dim() == 3 and (fused := cpu_kernels.for_tensor(qk)) is not None:
                fused.rotary_(qk, cos, sin)                          # in place: qkv is this step's own
            else:
                qk = apply_rotary(qk, cos, sin)
            return qk[..., :h, :], qk[..., h:, :], qkv[..., (h + g) * dh:].view(*lead, g, dh)
        q = self.q_proj(x, rows).view(*lead, h, dh)                   # [..., H, Dh]
        k = self.k_proj(x, rows).view(*lead, g, dh)                   # [..., G, Dh]
        v = self.v_proj(x, rows).view(*lead, g, dh)                   # [..., G, Dh]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        lead, rows = x.shape[:-1], ctx.row_precision                 # (B, S) or (T,)
        q, k, v = self._project(x, ctx)
        if ctx.meta is None:
            out = causal_attention(q, k, v, self.scale)              # [B, S, H, Dh]
        else:
            out = paged_attention(q, k, v, ctx.kv_cache.k[self.layer], ctx.kv_cache.v[self.layer],
                                  ctx.meta, self.scale)              # [T, H, Dh]
        return self.o_proj(out.reshape(*lead, -1), rows)             # [..., D]


class DenseMLP(nn.Module):
    """SwiGLU MLP: dense layers of Qwen2/3 (mlp_only_layers) and the Qwen2-MoE shared expert."""

    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.gate_proj = Linear(hidden, width, bias=False)
        self.up_proj = Linear(hidden, width, bias=False)
        self.down_proj = Linear(width, hidden, bias=False)

    def forward(self, x: torch.Tensor, ctx: StepContext | None = None, experts=None) -> torch.Tensor:
        rows = ctx.row_precision if ctx is not None else None
        return self.down_proj(F.silu(self.gate_proj(x, rows)) * self.up_proj(x, rows), rows)


class MoeBlock(nn.Module):
    """Router here; expert FFNs wherever the backend keeps them; optional shared expert here."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.top_k, self.normalize = layer, cfg.top_k, cfg.norm_topk_prob
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.shared_expert = None
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = DenseMLP(cfg.hidden_size, cfg.shared_expert_intermediate_size)
            self.shared_expert_gate = Linear(cfg.hidden_size, 1, bias=False)

    def plan(self, x: torch.Tensor) -> DispatchPlan:
        # The gate always runs in float32: the expert choice of a bf16 step then matches float32's
        # as closely as it can, and a [T, D] x [D, E] matmul is 4x faster in float32 than in bf16
        # on CPU (5 vs 19 µs at T=8; oneDNN's bf16 path has a fixed cost). A 16-bit model keeps a
        # float32 copy of this small weight (derived, not a parameter).
        w = self.gate.weight
        if w.dtype != torch.float32:
            cached = self.__dict__.get("_gate_f32")
            if cached is None or cached.shape != w.shape:
                cached = self.__dict__["_gate_f32"] = w.detach().float()
            w = cached
        return route(x, w, self.top_k, self.normalize, self.layer)

    def forward(self, x: torch.Tensor, ctx: StepContext, experts: "ExpertsByPrecision") -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])                            # [T, D]
        plan = self.plan(flat)
        if ctx.collect_router_logits:
            ctx.router_logits.append(plan.router_logits)
        if ctx.expert_load is not None:
            ctx.expert_load[self.layer] += torch.bincount(plan.topk_ids.flatten(), minlength=ctx.expert_load.shape[1])
        rows = ctx.row_precision
        if rows is None or rows.single is not None:              # one precision: the plan as it is
            backend = experts.full if rows is None else experts.get(rows.single)
            out = run_and_combine(backend, flat, plan, rows is not None and rows.packed)  # [T, D]
        else:
            # Rows of different precisions are disjoint, so summing the per-group combines adds
            # exact zeros: a row's result is the same as if its group ran alone.
            out = torch.zeros_like(flat)
            for precision, mask in zip(rows.precisions, rows.masks):
                sub = restrict_plan(plan, mask)
                if sub.assignments:
                    out += run_and_combine(experts.get(precision), flat, sub, rows.packed)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(flat, rows)) * self.shared_expert(flat, ctx)
        return out.view_as(x)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoeBlock(cfg, layer) if cfg.is_moe_layer(layer) else DenseMLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, ctx: StepContext, experts: ExpertsByPrecision) -> torch.Tensor:
        x, h = self.post_attention_layernorm.add_forward(self.self_attn(self.input_layernorm(x), ctx), x)
        return x + self.mlp(h, ctx, experts)


@dataclass
class TrainOutput:
    logits: torch.Tensor               # [B, S, V]
    router_logits: list[torch.Tensor]  # per MoE layer [B*S, E], for the load-balancing loss


class MoeForCausalLM(nn.Module):
    """The whole decoder. `local_experts` holds the experts this process owns (all by default);
    `experts` is the backend the MoE layers call — the local one, or one set with `set_expert_backend`."""

    def __init__(self, cfg: ModelConfig, expert_keys=None):
        super().__init__()
        self.config = cfg
        if expert_keys is None:
            expert_keys = [(layer, e) for layer in cfg.moe_layers for e in range(cfg.num_experts)]
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.local_experts = LocalExpertBackend(expert_keys, cfg.hidden_size, cfg.moe_intermediate_size)
        # Not submodules: a remote backend's weights are not ours to save or move, and quantized
        # copies are derived data.
        object.__setattr__(self, "_backends", ExpertsByPrecision(self.local_experts))
        # The activation dtype the quantized copies were packed for (precision.add_quantized_lanes);
        # the fast lane's steps run in it. None: no quantized lanes, or the weights' own dtype.
        self.reduced_dtype: torch.dtype | None = None

    def set_expert_backend(self, backend: ExpertBackend | None, precision: str = "full") -> None:
        """Where MoE layers send rows of `precision` (full: None = the local experts)."""
        if precision == "full":
            self._backends.full = backend if backend is not None else self.local_experts
        elif backend is None:
            self._backends.reduced.pop(precision, None)
        else:
            self._backends.reduced[precision] = backend

    @property
    def experts(self) -> ExpertBackend:
        return self._backends.full

    @property
    def precisions(self) -> tuple[str, ...]:
        return ("full", *sorted(self._backends.reduced))

    def _hidden(self, input_ids: torch.Tensor, ctx: StepContext, dtype: torch.dtype | None = None) -> torch.Tensor:
        x = self.embed_tokens(input_ids)                             # [..., D]
        if dtype is not None and dtype != x.dtype:                   # a lane computing in another dtype
            x = x.to(dtype)
        for layer in self.layers:
            x = layer(x, ctx, self._backends)
        return self.norm(x)

    def forward(self, input_ids: torch.Tensor, precision: str = "full",
                dtype: torch.dtype | None = None) -> torch.Tensor:
        """Plain causal forward, no cache: input_ids [B, S] → logits [B, S, V], every row at
        `precision` with activations of `dtype` (default: the weights'; a quantized lane's own)."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        rows = None if precision == "full" else RowPrecision.uniform(precision)
        if rows is not None:
            dtype = dtype or self.reduced_dtype
        return self.lm_head(self._hidden(input_ids, StepContext(positions, row_precision=rows), dtype), rows)

    def forward_train(self, input_ids: torch.Tensor) -> TrainOutput:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        ctx = StepContext(positions, collect_router_logits=True)
        logits = self.lm_head(self._hidden(input_ids, ctx))
        return TrainOutput(logits, ctx.router_logits)

    def forward_paged(self, input_ids: torch.Tensor, meta: AttentionMetadata, kv_cache: PagedKVCache,
                      logits_indices: torch.Tensor | None = None, expert_load: torch.Tensor | None = None,
                      row_precision: RowPrecision | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One engine step: flat input_ids [T] → logits [N, V] for the rows in logits_indices [N]
        (usually each sequence's last new token; all T when None). `expert_load` [layers, E] is
        incremented with the tokens routed per expert; `row_precision` groups rows by precision;
        `dtype` is the activation dtype of the step (default: the weights'; the KV cache's must match)."""
        ctx = StepContext(meta.positions, meta, kv_cache, expert_load=expert_load, row_precision=row_precision)
        hidden = self._hidden(input_ids, ctx, dtype)                 # [T, D]
        if logits_indices is not None:
            hidden = hidden.index_select(0, logits_indices)          # [N, D]
            if row_precision is not None:
                row_precision = row_precision.take(logits_indices)
        return self.lm_head(hidden, row_precision)                   # [N, V]

    def new_kv_cache(self, num_blocks: int, block_size: int, dtype: torch.dtype | None = None) -> PagedKVCache:
        cfg = self.config
        param = self.embed_tokens.weight
        return PagedKVCache(cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim,
                            dtype or param.dtype, param.device)
