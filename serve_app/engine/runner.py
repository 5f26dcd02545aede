"""Model runner: turns a scheduler output into one paged forward and returns the logits to sample.

It owns the KV tensors (the block manager only does the bookkeeping) and applies the block
copies a fork asks for before the forward that needs them.

Legend: T=tokens in the step, N=rows that sample this step, V=vocab.
"""
from __future__ import annotations

import torch

from serve_app.config import EngineConfig
from serve_app.engine.block_manager import BlockCopy, BlockManager
from serve_app.engine.scheduler import SchedulerOutput
from serve_app.model import AttentionMetadata, MoeForCausalLM, cpu_kernels
from serve_app.model.kernels import PACKED_VERIFY_MAX_ROWS, attention_dtype
from serve_app.model.precision import RowPrecision


class ModelRunner:
    def __init__(self, model: MoeForCausalLM, cfg: EngineConfig, dtype: torch.dtype | None = None):
        """`dtype`: the activations' (and the KV cache's) dtype of this engine's steps; default the
        weights'. The fast lane of a float32 or bf16 model runs in bf16 where that is faster."""
        self.model = model
        self.block_size = cfg.block_size
        self.dtype = dtype or model.embed_tokens.weight.dtype
        self.device = model.embed_tokens.weight.device
        self.attention_dtype = attention_dtype(self.device.type, self.dtype)
        # K/V are stored in the dtype attention computes in (see paged_attention), except where the
        # fused decode kernel runs: it reads 16-bit K/V in place and computes in float32 itself, so
        # the cache keeps the activations' dtype (half the bytes; the values were 16-bit already).
        fused = self.dtype != torch.float32 and cpu_kernels.ops(self.device.type) is not None
        self.kv = model.new_kv_cache(cfg.num_kv_blocks, cfg.block_size, self.dtype if fused else self.attention_dtype)
        # Tokens routed per (layer, expert) since the last `take_expert_load`; None = not tracked.
        self.expert_load: torch.Tensor | None = None

    def track_expert_load(self) -> None:
        cfg = self.model.config
        self.expert_load = torch.zeros(cfg.num_layers, cfg.num_experts, dtype=torch.long, device=self.device)

    def take_expert_load(self) -> torch.Tensor | None:
        if self.expert_load is None:
            return None
        load = self.expert_load.cpu().clone()      # .cpu() is a no-op on CPU: copy before zeroing
        self.expert_load.zero_()
        return load

    def copy_blocks(self, copies: list[BlockCopy]) -> None:
        self.kv.copy_blocks([c.src for c in copies], [c.dst for c in copies])

    @torch.inference_mode()
    def execute(self, batch: SchedulerOutput, blocks: BlockManager,
                drafts: dict[str, list[int]] | None = None) -> torch.Tensor:
        """Run the step; logits [N, V] for the scheduled sequences whose chunk reaches their end,
        in batch order. A sequence with `drafts` (speculative decoding) runs its last token and
        its k draft tokens at k+1 positions and gets k+1 rows, one per position."""
        tokens: list[int] = []
        positions: list[list[int]] = []
        tables: list[list[int]] = []
        sample_rows: list[int] = []
        precisions: list[str] = []
        verifies = False
        for item in batch.scheduled:
            end = item.start + item.num_new_tokens
            draft = drafts.get(item.seq.seq_id, ()) if drafts else ()
            first_row = len(tokens)
            tokens.extend(item.seq.token_ids[item.start:end])
            tokens.extend(draft)
            precisions += [item.seq.request.precision] * (item.num_new_tokens + len(draft))
            positions.append(list(range(item.start, end + len(draft))))
            tables.append(blocks.block_table(item.seq.seq_id))
            if draft:
                verifies = True
                sample_rows.extend(range(first_row + item.num_new_tokens - 1, len(tokens)))
            elif item.samples:
                sample_rows.append(len(tokens) - 1)
        # Verified rows compute what one-row decode steps would (precision.RowPrecision.packed),
        # so drafts do not change a quantized lane's greedy output; a step with a long prefill
        # chunk beside them keeps the faster dense copies (its other rows' numerics vary with the
        # batch anyway).
        packed = verifies and len(tokens) <= PACKED_VERIFY_MAX_ROWS
        return self._forward(tokens, positions, tables, sample_rows, precisions, packed)

    @torch.inference_mode()
    def decode_rows(self, seq_ids: list[str], tokens: list[int], positions: list[int], blocks: BlockManager,
                    precision: str) -> torch.Tensor:
        """One decode position per sequence at `precision` (a speculative draft pass), KV written at
        those positions; logits [B, V]."""
        return self._forward(tokens, [[p] for p in positions], [blocks.block_table(s) for s in seq_ids],
                             list(range(len(tokens))), [precision] * len(tokens))

    def _forward(self, tokens: list[int], positions: list[list[int]], tables: list[list[int]],
                 sample_rows: list[int], precisions: list[str], packed: bool = False) -> torch.Tensor:
        meta = AttentionMetadata.build(positions, tables, self.block_size, self.device, self.attention_dtype)
        input_ids = torch.tensor(tokens, dtype=torch.long, device=self.device)               # [T]
        rows = torch.tensor(sample_rows, dtype=torch.long, device=self.device)                # [N]
        return self.model.forward_paged(input_ids, meta, self.kv, rows, self.expert_load,
                                        RowPrecision.of_rows(precisions, self.device, packed), self.dtype).float()  # [N, V]
