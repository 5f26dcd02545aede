"""Model configuration: one frozen dataclass for every supported MoE family.

Families differ by flags (shared expert, q/k norm, qkv bias, renormalised top-k, dense layers),
never by copied model code. `ModelConfig.from_hf(config_dict)` maps a Hugging Face `config.json`
onto those flags; anything we cannot serve correctly is rejected here with a message that names
the file and the key, rather than producing silently wrong logits later.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


class ModelLoadError(ValueError):
    """A checkpoint or config we cannot load; the message names the file and key."""


# model_type → HF architecture name. Mixtral is also the layout of the seed's "Code-Router MoE".
SUPPORTED_FAMILIES = {
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}


@dataclass(frozen=True)
class ModelConfig:
    family: str                      # one of SUPPORTED_FAMILIES
    vocab_size: int
    hidden_size: int                 # D
    num_layers: int
    num_heads: int                   # H (query heads)
    num_kv_heads: int                # G (key/value heads; H % G == 0 for GQA)
    head_dim: int                    # Dh; Qwen3 sets it explicitly, others use D // H
    num_experts: int                 # E
    top_k: int                       # K experts per token
    moe_intermediate_size: int       # F, per-expert SwiGLU width
    intermediate_size: int           # dense SwiGLU width (Qwen2/3 dense layers)
    norm_topk_prob: bool             # renormalise the K routing weights to sum to 1
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE shared expert; 0 = none
    qk_norm: bool = False            # Qwen3: RMSNorm over Dh on q and k before RoPE
    qkv_bias: bool = False           # Qwen2-MoE: biases on q/k/v projections
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    # Qwen2/3: layer i is MoE iff i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0.
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def is_moe_layer(self, layer: int) -> bool:
        if self.num_experts == 0 or layer in self.mlp_only_layers:
            return False
        return (layer + 1) % self.decoder_sparse_step == 0

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if self.is_moe_layer(i))

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelConfig":
        cfg_path = Path(path) / "config.json"
        if not cfg_path.is_file():
            raise ModelLoadError(f"{cfg_path}: config.json not found (is {path} a model directory?)")
        try:
            raw = json.loads(cfg_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"{cfg_path}: cannot read config: {exc}") from exc
        return cls.from_hf(raw, source=str(cfg_path))

    @classmethod
    def from_hf(cls, raw: dict, source: str = "config.json") -> "ModelConfig":
        """Map a Hugging Face config dict to a ModelConfig, rejecting what we cannot serve."""
        family = raw.get("model_type")
        if family not in SUPPORTED_FAMILIES:
            raise ModelLoadError(
                f"{source}: unsupported model_type {family!r}; supported: {sorted(SUPPORTED_FAMILIES)}")

        def need(key: str):
            if raw.get(key) is None:
                raise ModelLoadError(f"{source}: missing required key {key!r} for model_type {family!r}")
            return raw[key]

        _reject_unsupported(raw, source)
        hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
        kv_heads = int(raw.get("num_key_value_heads") or heads)
        if heads % kv_heads:
            raise ModelLoadError(f"{source}: num_attention_heads={heads} is not a multiple of "
                                 f"num_key_value_heads={kv_heads}")
        head_dim = raw.get("head_dim") or hidden // heads
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        common = dict(
            family=family, vocab_size=int(need("vocab_size")), hidden_size=hidden,
            num_layers=int(need("num_hidden_layers")), num_heads=heads, num_kv_heads=kv_heads,
            head_dim=int(head_dim), top_k=int(need("num_experts_per_tok")),
            rope_theta=float(_rope_theta(raw)), rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            max_position_embeddings=_max_positions(raw),
            bos_token_id=raw.get("bos_token_id"), eos_token_ids=eos_ids,
        )
        if family == "mixtral":
            # Mixtral always renormalises the top-k weights (softmax → top-k → divide by their sum).
            return cls(**common, num_experts=int(need("num_local_experts")),
                       moe_intermediate_size=int(need("intermediate_size")),
                       intermediate_size=int(need("intermediate_size")), norm_topk_prob=True)
        # Qwen checkpoints on the Hub say num_experts; transformers >= 5 writes num_local_experts for Qwen3.
        num_experts = int(raw.get("num_experts") or need("num_local_experts"))
        qwen = dict(
            num_experts=num_experts, moe_intermediate_size=int(need("moe_intermediate_size")),
            intermediate_size=int(raw.get("intermediate_size") or 0),
            norm_topk_prob=bool(raw.get("norm_topk_prob", family == "qwen3_moe")),
            decoder_sparse_step=int(raw.get("decoder_sparse_step", 1) or 1),
            mlp_only_layers=tuple(int(i) for i in raw.get("mlp_only_layers") or ()),
        )
        if family == "qwen2_moe":
            # Older Qwen2-MoE configs have no qkv_bias key: the architecture always had the biases.
            return cls(**common, **qwen, qkv_bias=bool(raw.get("qkv_bias", True)),
                       shared_expert_intermediate_size=int(raw.get("shared_expert_intermediate_size") or 0))
        return cls(**common, **qwen, qk_norm=True, qkv_bias=bool(raw.get("attention_bias", False)))


def _rope_theta(raw: dict) -> float:
    # transformers >= 5 nests it under rope_parameters; older configs have a top-level rope_theta.
    params = raw.get("rope_parameters") or {}
    return params.get("rope_theta", raw.get("rope_theta", 10000.0))


def _max_positions(raw: dict) -> int:
    limit = int(raw.get("max_position_embeddings") or 4096)
    # Sliding-window attention is not implemented: clamp the usable length to the window so
    # full attention over it is exactly what the model was trained to do.
    window = raw.get("sliding_window")
    uses_window = raw.get("use_sliding_window", raw.get("model_type") == "mixtral")
    if uses_window and window:
        limit = min(limit, int(window))
    return limit


def _reject_unsupported(raw: dict, source: str) -> None:
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if rope else "default"
    if rope_type not in ("default", None):
        raise ModelLoadError(f"{source}: rope scaling type {rope_type!r} is not supported (only 'default')")
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise ModelLoadError(f"{source}: hidden_act {act!r} is not supported (only 'silu' SwiGLU experts)")
