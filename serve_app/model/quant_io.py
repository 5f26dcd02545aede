"""Quantized experts on disk: one safetensors file in the portable layout (`QuantLinear.codes`),
loadable on any device and for any activation dtype. Kept apart from serve_app/model/quant.py,
which is about the numerics and kernels; this is only the file format.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from serve_app.model.config import ModelLoadError
from serve_app.model.quant import QuantLinear
from serve_app.model.quant_experts import QuantizedExpertBackend, QuantizedExpertFFN

FORMAT = "moe-serve-quant/1"


def save_quantized(backend: QuantizedExpertBackend, file: str | Path) -> None:
    """One safetensors file in the portable layout (`QuantLinear.codes`), loadable on any device."""
    tensors, in_features = {}, {}
    for name, ffn in backend.ffn.items():
        for part in ("gate_up", "down"):
            layer: QuantLinear = getattr(ffn, part)
            codes, scales = layer.codes()
            tensors[f"{name}.{part}.codes"] = codes.contiguous().cpu()
            tensors[f"{name}.{part}.scales"] = scales.contiguous().cpu()
            in_features[part] = layer.in_features
    meta = {"format": FORMAT, "mode": backend.mode, "group_size": str(backend.group_size),
            "in_features": json.dumps(in_features)}
    save_file(tensors, str(file), metadata=meta)


def load_quantized(file: str | Path, dtype: torch.dtype = torch.float32, device="cpu",
                   path: str | None = None) -> QuantizedExpertBackend:
    """The backend `save_quantized` wrote, packed for `device` and activations of `dtype`."""
    try:
        handle = safe_open(str(file), framework="pt")
    except Exception as exc:  # safetensors raises its own error types for missing or corrupt files
        raise ModelLoadError(f"{file}: not a readable safetensors file: {exc}") from exc
    with handle:
        meta = handle.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ModelLoadError(f"{file}: format {meta.get('format')!r} is not {FORMAT!r}")
        mode, group_size = meta["mode"], int(meta["group_size"])
        in_features = json.loads(meta["in_features"])
        names = sorted({key.split(".")[0] for key in handle.keys()})
        ffns = {}
        for name in names:
            parts = [QuantLinear.from_codes(handle.get_tensor(f"{name}.{part}.codes"),
                                            handle.get_tensor(f"{name}.{part}.scales"), mode,
                                            in_features[part], group_size, dtype, device, path)
                     for part in ("gate_up", "down")]
            ffns[name] = QuantizedExpertFFN(*parts)
    return QuantizedExpertBackend(ffns, mode, group_size)
