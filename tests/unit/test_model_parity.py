"""Our MoE decoder against transformers on tiny random checkpoints of each family (float32)."""
from __future__ import annotations

import pytest
import torch

from serve_app.model import AttentionMetadata, load_model
from tests.helpers.checkpoints import build_checkpoint

# Several shapes per family: expert count, top-k, GQA ratio, renormalised top-k both ways,
# shared expert on/off, dense layers, tied/untied embeddings, explicit head_dim.
SHAPES = {
    "mixtral-e4k2-gqa2": ("mixtral", {}),
    "mixtral-e8k2-mqa-tied": ("mixtral", dict(num_local_experts=8, num_key_value_heads=1, tie_word_embeddings=True)),
    "mixtral-e3k1-mha": ("mixtral", dict(num_local_experts=3, num_experts_per_tok=1, num_key_value_heads=4)),
    "qwen2-shared-nonorm": ("qwen2_moe", {}),
    "qwen2-shared-norm-sparse2": ("qwen2_moe", dict(norm_topk_prob=True, decoder_sparse_step=2, num_hidden_layers=3)),
    "qwen2-mlp-only-layer0-e6k3": ("qwen2_moe", dict(mlp_only_layers=[0], num_experts=6, num_experts_per_tok=3)),
    "qwen3-norm-headdim24": ("qwen3_moe", {}),
    "qwen3-nonorm-tied-gqa4": ("qwen3_moe", dict(norm_topk_prob=False, tie_word_embeddings=True, num_attention_heads=8)),
}


@pytest.fixture(scope="module", params=sorted(SHAPES))
def ckpt(request, tmp_path_factory):
    family, overrides = SHAPES[request.param]
    return build_checkpoint(tmp_path_factory.mktemp(request.param), family, **overrides)


def test_logits_match_transformers(ckpt):
    model = load_model(ckpt.path)
    ids = torch.randint(0, 320, (3, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, ref = model(ids), ckpt.reference(ids).logits
    assert ours.shape == (3, 17, 320)
    assert (ours - ref).abs().max().item() < 1e-4


def _greedy_paged(model, prompt: list[int], steps: int, chunk: int, block_size: int = 4) -> list[int]:
    """Chunked prefill then decode through the paged KV cache, one sequence, blocks 0..n in order."""
    cache = model.new_kv_cache(num_blocks=64, block_size=block_size)
    table = list(range(64))
    tokens, out, done = list(prompt), [], 0
    while len(out) < steps:
        new = tokens[done:done + chunk] if done < len(prompt) else tokens[-1:]
        positions = list(range(done, done + len(new)))
        meta = AttentionMetadata.build([positions], [table[: (positions[-1] // block_size) + 1]], block_size)
        logits = model.forward_paged(torch.tensor(new), meta, cache, torch.tensor([len(new) - 1]))
        done += len(new)
        if done >= len(prompt):
            nxt = int(logits[0].argmax())
            out.append(nxt)
            tokens.append(nxt)
    return out


def test_32_greedy_tokens_match_transformers_generate(ckpt):
    model = load_model(ckpt.path)
    prompt = torch.randint(0, 320, (1, 9), generator=torch.Generator().manual_seed(2))
    ref = ckpt.reference
    ref.generation_config.eos_token_id = None
    with torch.no_grad():
        expected = ref.generate(prompt, max_new_tokens=32, do_sample=False, min_new_tokens=32,
                                pad_token_id=0)[0, 9:].tolist()
    assert len(expected) == 32
    assert _greedy_paged(model, prompt[0].tolist(), 32, chunk=4) == expected


def test_mixed_prefill_and_decode_step_equals_separate_forwards(tmp_path):
    """One step holding a prefill chunk of one sequence and a decode token of another gives each the
    logits of its own plain causal forward: sequences never see each other's KV."""
    ckpt = build_checkpoint(tmp_path, "qwen2_moe")
    model = load_model(ckpt.path)
    a = torch.randint(0, 320, (13,), generator=torch.Generator().manual_seed(3))
    b = torch.randint(0, 320, (6,), generator=torch.Generator().manual_seed(4))
    bs = 4
    cache = model.new_kv_cache(num_blocks=16, block_size=bs)
    ta, tb = [5, 2, 9, 11], [7, 3]                        # deliberately scattered blocks
    # Step 1: a's first 8 tokens and all of b except its last.
    m1 = AttentionMetadata.build([list(range(8)), list(range(5))], [ta[:2], tb[:2]], bs)
    model.forward_paged(torch.cat([a[:8], b[:5]]), m1, cache)
    # Step 2: a's remaining 5 tokens (chunk with cached context) + b's last token (decode).
    m2 = AttentionMetadata.build([list(range(8, 13)), [5]], [ta, tb], bs)
    logits = model.forward_paged(torch.cat([a[8:], b[5:]]), m2, cache)    # [6, V]
    with torch.no_grad():
        ref_a, ref_b = model(a[None])[0], model(b[None])[0]
    assert logits.shape == (6, 320)
    assert torch.allclose(logits[:5], ref_a[8:], atol=1e-5)
    assert torch.allclose(logits[5], ref_b[5], atol=1e-5)


def test_bfloat16_load_runs_and_stays_close(tmp_path):
    ckpt = build_checkpoint(tmp_path, "mixtral")
    ids = torch.randint(0, 320, (2, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = load_model(ckpt.path)(ids)
        half = load_model(ckpt.path, dtype="bfloat16")(ids)
    assert half.dtype == torch.bfloat16
    assert (half.float() - full).abs().max().item() < 0.25 * full.abs().max().item()
