"""save_model writes checkpoints that our loader and transformers both read back identically."""
import pytest
import torch

from serve_app.model import load_model
from serve_app.model.saver import save_model
from tests.helpers.checkpoints import build_checkpoint


@pytest.mark.parametrize("family, overrides", [
    ("mixtral", dict(tie_word_embeddings=True)),
    ("qwen2_moe", {}),
    ("qwen3_moe", dict(mlp_only_layers=[1])),
])
def test_saved_checkpoint_round_trips_through_our_loader_and_transformers(tmp_path, family, overrides):
    from transformers import AutoModelForCausalLM

    src = build_checkpoint(tmp_path / "src", family, **overrides)
    model = load_model(src.path)
    save_model(model, tmp_path / "out")
    ids = torch.randint(0, 320, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids)
        assert torch.equal(load_model(tmp_path / "out")(ids), expected)
        theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
        assert (theirs(ids).logits - expected).abs().max() < 1e-4


def test_bfloat16_save_halves_the_file(tmp_path):
    model = load_model(build_checkpoint(tmp_path / "src", "mixtral").path)
    full = save_model(model, tmp_path / "f32") / "model.safetensors"
    half = save_model(model, tmp_path / "bf16", dtype="bfloat16") / "model.safetensors"
    assert half.stat().st_size < 0.55 * full.stat().st_size
    assert load_model(tmp_path / "bf16").embed_tokens.weight.dtype == torch.float32
