"""Loading Hugging Face-format checkpoints, selectively.

An expert shard must hold only its own experts, so loading is driven by *our* parameter names:
for each parameter we look up the checkpoint key(s) it comes from (the family's weight-name
map), open the safetensors file that holds them (single file or sharded index) and read just
those tensors with `safe_open(...).get_tensor`. Nothing else is read: `LoadReport` records every
key and byte, and tests hold the loader to it. The model is built on the meta device first, so
no memory is spent on random initialisation of weights we are about to replace.
"""
from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open

from serve_app.model import cpu_kernels
from serve_app.model.config import ModelConfig, ModelLoadError
from serve_app.model.moe import ExpertKey, LocalExpertBackend
from serve_app.model.transformer import MoeForCausalLM

FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadReport:
    """What the loader actually read; the proof that a shard touched only its experts."""
    files_opened: list[str] = field(default_factory=list)
    keys_read: list[str] = field(default_factory=list)
    bytes_read: int = 0


class CheckpointReader:
    """Finds which file holds each key and reads tensors one key at a time."""

    def __init__(self, path: Path, stack: ExitStack, report: LoadReport):
        self.path, self._stack, self.report = path, stack, report
        self._handles: dict[str, object] = {}
        index = path / "model.safetensors.index.json"
        single = path / "model.safetensors"
        if index.is_file():
            try:
                self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError) as exc:
                raise ModelLoadError(f"{index}: cannot read weight_map: {exc}") from exc
        elif single.is_file():
            handle = self._open(single.name)
            self.weight_map = {key: single.name for key in handle.keys()}
        else:
            raise ModelLoadError(f"{path}: no model.safetensors or model.safetensors.index.json found")

    def _open(self, filename: str):
        if filename not in self._handles:
            file = self.path / filename
            if not file.is_file():
                raise ModelLoadError(f"{file}: weight file listed in the index is missing")
            try:
                self._handles[filename] = self._stack.enter_context(safe_open(str(file), framework="pt"))
            except Exception as exc:  # safetensors raises its own error types for corrupt headers
                raise ModelLoadError(f"{file}: not a readable safetensors file: {exc}") from exc
            self.report.files_opened.append(filename)
        return self._handles[filename]

    def has(self, key: str) -> bool:
        return key in self.weight_map

    def read(self, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        filename = self.weight_map.get(key)
        if filename is None:
            raise ModelLoadError(f"{self.path}: tensor {key!r} not found in the checkpoint")
        tensor = self._open(filename).get_tensor(key)
        self.report.keys_read.append(key)
        self.report.bytes_read += tensor.numel() * tensor.element_size()
        if tuple(tensor.shape) != tuple(shape):
            raise ModelLoadError(f"{self.path / filename}: tensor {key!r} has shape {list(tensor.shape)}, "
                                 f"expected {list(shape)}")
        if not tensor.is_floating_point():
            raise ModelLoadError(f"{self.path / filename}: tensor {key!r} has dtype {tensor.dtype}; "
                                 f"only floating-point checkpoints are supported")
        return tensor.to(dtype)


def _expert_keys(cfg: ModelConfig, layer: int, expert: int) -> tuple[tuple[str, str], str]:
    """(gate, up) keys and the down key of one expert in the checkpoint."""
    if cfg.family == "mixtral":
        base = f"model.layers.{layer}.block_sparse_moe.experts.{expert}"
        return (f"{base}.w1.weight", f"{base}.w3.weight"), f"{base}.w2.weight"
    base = f"model.layers.{layer}.mlp.experts.{expert}"
    return (f"{base}.gate_proj.weight", f"{base}.up_proj.weight"), f"{base}.down_proj.weight"


def checkpoint_keys(cfg: ModelConfig, name: str) -> tuple[str, ...]:
    """Our parameter name → the checkpoint key(s) it is made of (two keys = concatenated on dim 0)."""
    if name.startswith("local_experts.ffn."):
        _, _, rest = name.split(".", 2)                   # "L_E.gate_up" / "L_E.down"
        layer_expert, part = rest.split(".")
        layer, expert = (int(p) for p in layer_expert.split("_"))
        gate_up, down = _expert_keys(cfg, layer, expert)
        return gate_up if part == "gate_up" else (down,)
    if name == "lm_head.weight":
        return ("lm_head.weight",)
    if cfg.family == "mixtral" and ".mlp.gate." in name:
        name = name.replace(".mlp.gate.", ".block_sparse_moe.gate.")
    return (f"model.{name}",)


def normalize_expert_ids(cfg: ModelConfig, expert_ids: Iterable | None) -> list[ExpertKey]:
    """None = every expert; ints = that expert in every MoE layer; (layer, expert) pairs as given."""
    if expert_ids is None:
        return [(layer, e) for layer in cfg.moe_layers for e in range(cfg.num_experts)]
    keys = set()
    for item in expert_ids:
        pairs = [(layer, item) for layer in cfg.moe_layers] if isinstance(item, int) else [tuple(item)]
        for layer, expert in pairs:
            if layer not in cfg.moe_layers or not 0 <= expert < cfg.num_experts:
                raise ModelLoadError(f"expert {(layer, expert)} does not exist: MoE layers {list(cfg.moe_layers)}, "
                                     f"{cfg.num_experts} experts per layer")
            keys.add((int(layer), int(expert)))
    return sorted(keys)


def checkpoint_dtype(path: str | Path) -> torch.dtype:
    """The dtype a checkpoint's config.json declares (`torch_dtype`); float32 when it says none."""
    try:
        declared = json.loads((Path(path) / "config.json").read_text()).get("torch_dtype") or "float32"
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: cannot read config.json: {exc}") from exc
    return FLOAT_DTYPES.get(str(declared).removeprefix("torch."), torch.float32)


def resolve_dtype(dtype: torch.dtype | str, path: str | Path | None = None, device: str = "cpu") -> torch.dtype:
    """A dtype name or dtype; "auto" = the checkpoint at `path`'s own, where `device` computes in it
    fast (model/kernels.full_precision_dtype), else float32."""
    if dtype == "auto":
        if path is None:
            raise ModelLoadError("dtype 'auto' needs the checkpoint directory")
        from serve_app.model.kernels import full_precision_dtype
        return full_precision_dtype(torch.device(device).type, checkpoint_dtype(path))
    if isinstance(dtype, str):
        if dtype not in FLOAT_DTYPES:
            raise ModelLoadError(f"dtype {dtype!r} is not supported; use one of {sorted(FLOAT_DTYPES)}")
        return FLOAT_DTYPES[dtype]
    if dtype not in FLOAT_DTYPES.values():
        raise ModelLoadError(f"dtype {dtype} is not supported; use one of {sorted(FLOAT_DTYPES)}")
    return dtype


def _read_state(module: torch.nn.Module, cfg: ModelConfig, reader: CheckpointReader,
                dtype: torch.dtype, prefix: str = "") -> dict[str, torch.Tensor]:
    state = {}
    for name, param in module.state_dict(keep_vars=True).items():
        full = prefix + name
        if cfg.tie_word_embeddings and full == "lm_head.weight":
            continue                                      # re-tied to the embedding after loading
        keys = checkpoint_keys(cfg, full)
        if len(keys) == 1:
            state[name] = reader.read(keys[0], tuple(param.shape), dtype)
        else:                                             # fused gate/up: each half is [F, D]
            half = (param.shape[0] // 2, *param.shape[1:])
            state[name] = torch.cat([reader.read(k, half, dtype) for k in keys], dim=0)
    return state


def load_model(path: str | Path, dtype: torch.dtype | str = torch.float32, expert_ids=None,
               device: torch.device | str = "cpu") -> MoeForCausalLM:
    """Build the model from a checkpoint dir; with `expert_ids`, hold (and read) only those experts."""
    path = Path(path)
    cfg = ModelConfig.from_dir(path)
    dtype = resolve_dtype(dtype, path, device)
    keys = normalize_expert_ids(cfg, expert_ids)
    report = LoadReport()
    with torch.device("meta"):
        model = MoeForCausalLM(cfg, keys)
    with ExitStack() as stack:
        state = _read_state(model, cfg, CheckpointReader(path, stack, report), dtype)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        model.load_state_dict(state, strict=False, assign=True)
        model.lm_head.weight = model.embed_tokens.weight
    else:
        model.load_state_dict(state, strict=True, assign=True)
    model.load_report = report
    _ready_kernels(dtype, device)
    return model.to(device).eval().requires_grad_(False)


def load_expert_weights(path: str | Path, expert_ids, dtype: torch.dtype | str = torch.float32,
                        device: torch.device | str = "cpu") -> LocalExpertBackend:
    """Only the given experts' FFNs (no dense weights): what an expert shard holds."""
    path = Path(path)
    cfg = ModelConfig.from_dir(path)
    dtype = resolve_dtype(dtype, path, device)
    report = LoadReport()
    with torch.device("meta"):
        backend = LocalExpertBackend(normalize_expert_ids(cfg, expert_ids), cfg.hidden_size,
                                     cfg.moe_intermediate_size)
    with ExitStack() as stack:
        state = _read_state(backend, cfg, CheckpointReader(path, stack, report), dtype, prefix="local_experts.")
    backend.load_state_dict(state, strict=True, assign=True)
    backend.load_report = report
    _ready_kernels(dtype, device)
    return backend.to(device).eval().requires_grad_(False)


def _ready_kernels(dtype: torch.dtype, device) -> None:
    """Build or load the fused CPU kernels now, at load time, where a 16-bit model will use them: a
    fresh node (an expert shard, a pod) would otherwise compile them (~30 s) inside its first
    request, past the transport's per-layer deadline. (The fast lane's bf16 copies of a float32
    model are quantized after loading and ask for them there: QuantLinear._pack_fused.)"""
    if dtype != torch.float32:
        cpu_kernels.ops(torch.device(device).type)
