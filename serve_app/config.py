"""One configuration tree for the whole system; frozen dataclasses inside, defaults next to why.

The HTTP/CLI edges validate user input (pydantic) and build these; inside, nothing re-reads the
environment or invents its own defaults.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineConfig:
    # 16 tokens per KV block: small enough that an editor's keystroke (which changes only the end
    # of the prompt) loses at most one block of prefix-cache reuse, large enough that block tables
    # and the attention gather stay cheap.
    block_size: int = 16
    # KV capacity in blocks (2048 × 16 = 32k tokens). For the default model that is ~50 MB.
    num_kv_blocks: int = 2048
    # Concurrent sequences in the running batch.
    max_num_seqs: int = 64
    # Token budget per step. It bounds one step's latency, so running decodes keep flowing while
    # long prompts are prefilled in chunks.
    max_num_batched_tokens: int = 512
    # At most this many prefill tokens of one sequence per step (chunked prefill).
    long_prefill_chunk: int = 256
    # None = the model's max_position_embeddings.
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    # Admission control: beyond these the engine refuses new work (HTTP maps it to 429/503 with
    # Retry-After) instead of growing a queue whose tail latency nobody wants.
    max_waiting_requests: int = 256
    max_waiting_tokens: int = 65536
    # What a rejected client is told to wait before retrying.
    retry_after_s: float = 1.0

    def __post_init__(self):
        for name in ("block_size", "num_kv_blocks", "max_num_seqs", "max_num_batched_tokens",
                     "long_prefill_chunk", "max_waiting_requests", "max_waiting_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name} must be >= 1, got {getattr(self, name)}")
