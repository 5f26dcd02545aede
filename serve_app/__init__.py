"""moe-serve: serving Mixture-of-Experts code models on Ray Serve.

Public names are imported lazily so that `import serve_app` stays cheap (no Ray, no FastAPI).
"""
from __future__ import annotations

__all__ = ["LLM", "SamplingParams", "load_model", "build_app"]


def __getattr__(name: str):
    if name == "LLM":
        from serve_app.engine.llm import LLM
        return LLM
    if name == "SamplingParams":
        from serve_app.engine.sampling_params import SamplingParams
        return SamplingParams
    if name == "load_model":
        from serve_app.model import load_model
        return load_model
    if name == "build_app":
        from serve_app.deployments.app import build_app
        return build_app
    raise AttributeError(f"module 'serve_app' has no attribute {name!r}")
