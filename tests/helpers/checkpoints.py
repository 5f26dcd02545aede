"""Tiny random checkpoints of each family, built with transformers (the test oracle) and saved as
real safetensors. Returned with the reference model so tests compare against the same weights."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

# Base shapes: small enough for CPU tests, with GQA and more experts than top-k.
_BASE = dict(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512)


@dataclass
class TinyCheckpoint:
    path: Path
    family: str
    reference: torch.nn.Module  # the transformers model whose weights were saved


def _config(family: str, overrides: dict):
    import transformers as tf

    if family == "mixtral":
        kw = dict(_BASE, num_local_experts=4, num_experts_per_tok=2, intermediate_size=48)
        return tf.MixtralConfig(**{**kw, **overrides}), tf.MixtralForCausalLM
    if family == "qwen2_moe":
        kw = dict(_BASE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                  shared_expert_intermediate_size=80, intermediate_size=96, norm_topk_prob=False)
        return tf.Qwen2MoeConfig(**{**kw, **overrides}), tf.Qwen2MoeForCausalLM
    if family == "qwen3_moe":
        kw = dict(_BASE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                  intermediate_size=96, head_dim=24, norm_topk_prob=True)
        return tf.Qwen3MoeConfig(**{**kw, **overrides}), tf.Qwen3MoeForCausalLM
    raise ValueError(f"unknown family {family!r}")


def build_checkpoint(out_dir: str | Path, family: str = "mixtral", seed: int = 0,
                     max_shard_size: str | None = None, **overrides) -> TinyCheckpoint:
    """Random-weight model of `family` saved with save_pretrained (optionally sharded)."""
    cfg, cls = _config(family, overrides)
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    # Default init (std 0.02) makes logits nearly flat; scale weights up so greedy decoding has
    # clear winners and a wrong expert or position actually changes the tokens.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15 if "embed" in name or "lm_head" in name else 0.08)
    out = Path(out_dir)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    return TinyCheckpoint(out, family, model)
