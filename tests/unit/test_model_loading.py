"""Selective safetensors loading, sharded checkpoints, expert-subset composition and error messages."""
from __future__ import annotations

import json

import pytest
import safetensors
import torch
from safetensors.torch import save_file

from serve_app.model import (LocalExpertBackend, MissingExpertError, ModelLoadError, PartitionedBackend,
                             load_expert_weights, load_model)
from tests.helpers.checkpoints import build_checkpoint


@pytest.fixture(scope="module")
def mixtral8(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("m8"), "mixtral", num_local_experts=8)


def _expert_of(key: str) -> int | None:
    parts = key.split(".")
    return int(parts[parts.index("experts") + 1]) if "experts" in parts else None


def test_shard_with_two_of_eight_experts_reads_only_those(mixtral8, monkeypatch):
    # Count what safetensors hands out, independently of the loader's own report.
    read: list[str] = []
    real_open = safetensors.safe_open

    class CountingOpen:
        def __init__(self, *a, **kw):
            self._inner = real_open(*a, **kw)

        def __enter__(self):
            self._f = self._inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self._inner.__exit__(*exc)

        def keys(self):
            return self._f.keys()

        def get_tensor(self, key):
            read.append(key)
            return self._f.get_tensor(key)

    monkeypatch.setattr("serve_app.model.loader.safe_open", CountingOpen)
    backend = load_expert_weights(mixtral8.path, expert_ids=[2, 5])
    assert {_expert_of(k) for k in read} == {2, 5}
    assert len(read) == 2 * 2 * 3                      # 2 layers × 2 experts × (w1, w3, w2)
    assert sorted(read) == sorted(backend.load_report.keys_read)
    assert backend.holds() == frozenset({(0, 2), (0, 5), (1, 2), (1, 5)})
    full_bytes = sum(p.numel() * 4 for p in mixtral8.reference.parameters())
    assert backend.load_report.bytes_read < full_bytes / 3


def test_router_model_without_experts_reads_no_expert_tensor(mixtral8):
    model = load_model(mixtral8.path, expert_ids=[])
    assert not [k for k in model.load_report.keys_read if ".experts." in k]
    assert "model.layers.0.block_sparse_moe.gate.weight" in model.load_report.keys_read


def test_two_workers_plus_combine_equal_the_whole_model(mixtral8):
    whole = load_model(mixtral8.path)
    router = load_model(mixtral8.path, expert_ids=[])
    workers = [load_expert_weights(mixtral8.path, expert_ids=[0, 1, 2, 3]),
               load_expert_weights(mixtral8.path, expert_ids=[(0, e) for e in range(4, 8)] +
                                   [(1, e) for e in range(4, 8)])]
    router.set_expert_backend(PartitionedBackend(workers))
    ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(router(ids), whole(ids))


def test_router_without_a_backend_for_a_routed_expert_says_which(mixtral8):
    router = load_model(mixtral8.path, expert_ids=[])
    with pytest.raises(MissingExpertError, match="expert"):
        router(torch.zeros(1, 4, dtype=torch.long))


def test_sharded_index_checkpoint_loads_the_same_weights(tmp_path):
    ckpt = build_checkpoint(tmp_path, "qwen2_moe", max_shard_size="50KB")
    assert (ckpt.path / "model.safetensors.index.json").is_file()
    model = load_model(ckpt.path)
    assert len(model.load_report.files_opened) > 1
    ids = torch.randint(0, 320, (1, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(ids) - ckpt.reference(ids).logits).abs().max() < 1e-4


def test_missing_config_names_the_file(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json not found"):
        load_model(tmp_path)


def test_unsupported_model_type_names_it(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelLoadError, match="unsupported model_type 'llama'"):
        load_model(tmp_path)


def test_missing_weights_file_is_reported(tmp_path, mixtral8):
    (tmp_path / "config.json").write_text((mixtral8.path / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="no model.safetensors"):
        load_model(tmp_path)


def _rewrite(src, dst, edit):
    (dst / "config.json").write_text((src / "config.json").read_text())
    with safetensors.safe_open(str(src / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))


def test_missing_tensor_names_the_key(tmp_path, mixtral8):
    key = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    _rewrite(mixtral8.path, tmp_path, lambda t: t.pop(key))
    with pytest.raises(ModelLoadError, match=key.replace(".", r"\.")):
        load_model(tmp_path)


def test_misshaped_tensor_names_key_and_both_shapes(tmp_path, mixtral8):
    key = "model.layers.0.self_attn.q_proj.weight"
    _rewrite(mixtral8.path, tmp_path, lambda t: t.update({key: torch.zeros(8, 64)}))
    with pytest.raises(ModelLoadError, match=r"q_proj\.weight.*shape \[8, 64\], expected \[64, 64\]"):
        load_model(tmp_path)


def test_integer_tensor_is_rejected_with_its_key(tmp_path, mixtral8):
    key = "model.norm.weight"
    _rewrite(mixtral8.path, tmp_path, lambda t: t.update({key: torch.ones(64, dtype=torch.int32)}))
    with pytest.raises(ModelLoadError, match=r"model\.norm\.weight.*torch\.int32"):
        load_model(tmp_path)


def test_unusable_dtype_request_is_rejected(mixtral8):
    with pytest.raises(ModelLoadError, match="dtype"):
        load_model(mixtral8.path, dtype=torch.int8)
    with pytest.raises(ModelLoadError, match="float64"):
        load_model(mixtral8.path, dtype="float64")


def test_expert_ids_out_of_range_are_rejected(mixtral8):
    with pytest.raises(ModelLoadError, match=r"\(0, 8\)"):
        load_expert_weights(mixtral8.path, expert_ids=[(0, 8)])


def test_local_backend_reports_what_it_holds():
    backend = LocalExpertBackend([(0, 1), (2, 3)], hidden=8, width=4)
    assert backend.holds() == frozenset({(0, 1), (2, 3)})
