"""The MoE decoder (plain PyTorch), its configuration, paged attention and selective loading.

Knows neither HTTP nor Ray.
"""
from serve_app.model.attention import AttentionMetadata, PagedKVCache
from serve_app.model.config import ModelConfig, ModelLoadError
from serve_app.model.loader import LoadReport, load_expert_weights, load_model
from serve_app.model.moe import (DispatchPlan, ExpertBackend, LocalExpertBackend, MissingExpertError,
                                 PartitionedBackend)
from serve_app.model.transformer import MoeForCausalLM

__all__ = [
    "AttentionMetadata", "PagedKVCache", "ModelConfig", "ModelLoadError", "LoadReport", "load_model",
    "load_expert_weights", "DispatchPlan", "ExpertBackend", "LocalExpertBackend", "MissingExpertError",
    "PartitionedBackend", "MoeForCausalLM",
]
