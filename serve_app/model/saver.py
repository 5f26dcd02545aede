"""Saving a model in the Hugging Face format the loader reads (and transformers loads).

The inverse of loader.py: our parameter names map back through `checkpoint_keys`; fused expert
gate/up matrices are split into the family's two tensors. Used by training to ship checkpoints.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from serve_app.model.config import ModelConfig, SUPPORTED_FAMILIES
from serve_app.model.loader import checkpoint_keys, resolve_dtype
from serve_app.model.transformer import MoeForCausalLM


def hf_config(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    """ModelConfig → config.json (what ModelConfig.from_hf reads back, and transformers too)."""
    out = dict(
        architectures=[SUPPORTED_FAMILIES[cfg.family]], model_type=cfg.family, vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, num_experts_per_tok=cfg.top_k,
        rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=cfg.tie_word_embeddings,
        max_position_embeddings=cfg.max_position_embeddings, hidden_act="silu",
        bos_token_id=cfg.bos_token_id, eos_token_id=list(cfg.eos_token_ids) or None,
        torch_dtype=str(dtype).removeprefix("torch."),
    )
    if cfg.family == "mixtral":
        out.update(num_local_experts=cfg.num_experts, intermediate_size=cfg.moe_intermediate_size,
                   sliding_window=None)
    else:
        out.update(num_experts=cfg.num_experts, moe_intermediate_size=cfg.moe_intermediate_size,
                   intermediate_size=cfg.intermediate_size, norm_topk_prob=cfg.norm_topk_prob,
                   decoder_sparse_step=cfg.decoder_sparse_step, mlp_only_layers=list(cfg.mlp_only_layers))
        if cfg.family == "qwen2_moe":
            out.update(shared_expert_intermediate_size=cfg.shared_expert_intermediate_size, qkv_bias=cfg.qkv_bias)
        else:
            out.update(attention_bias=cfg.qkv_bias)
    return out


def save_model(model: MoeForCausalLM, out_dir: str | Path, dtype: torch.dtype | str = torch.float32) -> Path:
    """Write config.json + model.safetensors; needs a model holding all of its experts."""
    cfg, dtype, out = model.config, resolve_dtype(dtype), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        keys = checkpoint_keys(cfg, name)
        parts = tensor.chunk(len(keys), dim=0) if len(keys) > 1 else (tensor,)
        for key, part in zip(keys, parts):
            tensors[key] = part.detach().to(dtype).contiguous().cpu()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(cfg, dtype), indent=2))
    return out
