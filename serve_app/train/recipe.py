"""The training recipe (model shape + optimisation) and the run state a checkpoint stores."""
from __future__ import annotations

from dataclasses import dataclass

from serve_app.model.config import ModelConfig


@dataclass(frozen=True)
class TrainConfig:
    """Model shape and optimisation recipe; stored in every checkpoint."""

    # Model: ~6M active parameters per token keeps CPU decode fast (issue 8); see MODEL_CARD.md.
    vocab_size: int = 8192
    hidden_size: int = 256
    num_layers: int = 6
    num_heads: int = 8                # Dh = 32
    num_kv_heads: int = 4             # GQA halves the KV cache; quality cost is small at this size
    num_experts: int = 8
    top_k: int = 2
    moe_intermediate_size: int = 512
    max_len: int = 1024               # training context = max_position_embeddings of the export
    fim_rate: float = 0.5
    spm_rate: float = 0.0             # share of FIM samples in SPM order (v3: 0.5, see data.py)
    # Training text: "stdlib" (releases 1-2) or "stdlib+packages" (v3: train/mixture.py).
    corpus: str = "stdlib"
    # Optimisation
    batch_size: int = 8
    lr: float = 2e-3                  # small models tolerate (and need, in few steps) a high lr
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    max_steps: int = 1000             # replaced by the time budget when one is given
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    aux_loss_coef: float = 0.01       # Switch/Mixtral load balancing
    seed: int = 0
    # "bfloat16": forward and backward under CPU/CUDA autocast (weights and Adam stay float32);
    # "" = float32; "auto" = bf16 where the device has bf16 units (train.resolve_autocast).
    # bench/train_step.py measured 1.33x the tokens/s on a Zen 4 (AVX512-BF16) at an equal loss
    # after the same steps, and 0.08x on a Zen 3 (AVX2 only) (MODEL_CARD.md, "Training speed").
    autocast: str = "auto"

    def model_config(self, eos_id: int) -> ModelConfig:
        return ModelConfig(
            family="mixtral", vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            num_layers=self.num_layers, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
            head_dim=self.hidden_size // self.num_heads, num_experts=self.num_experts, top_k=self.top_k,
            moe_intermediate_size=self.moe_intermediate_size, intermediate_size=self.moe_intermediate_size,
            norm_topk_prob=True, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
            max_position_embeddings=self.max_len, eos_token_ids=(eos_id,))


@dataclass
class TrainState:
    """Everything besides model and optimizer that a resumed run needs to continue exactly."""

    step: int = 0            # optimizer steps taken
    epoch: int = 0           # permutation in use
    cursor: int = 0          # next row of that permutation
    total_steps: int = 0     # schedule length; fixed at start or after the time-budget probe
    tokens_seen: int = 0     # real (non-pad) tokens trained on
    train_seconds: float = 0.0
