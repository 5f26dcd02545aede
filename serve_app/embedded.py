"""Embedded mode: the same HTTP app over an in-process engine, no Ray (`moe-serve --embedded`).

For one laptop and for measuring what Ray itself costs: everything runs in this process, all
experts are local, and /metrics serves a `prometheus_client` registry with the same metric names
as the Ray deployment (there they are scraped with Ray's `ray_` prefix).
"""
from __future__ import annotations

from fastapi import FastAPI

from serve_app.api.app import create_app
from serve_app.api.client import LocalEngineClient
from serve_app.api.observability import MetricsMiddleware, metrics_router
from serve_app.api.settings import ApiSettings, GenerationDefaults
from serve_app.config import AppConfig, api_keys_from_env
from serve_app.engine.lanes import Lanes
from serve_app.metrics import EngineMetricsObserver, Metrics
from serve_app.model import load_model
from serve_app.model.precision import add_quantized_lanes, fast_dtype
from serve_app.tokenizer import CodeTokenizer


def load_served_model(config: AppConfig):
    """The model with every expert local and its quantized lanes, as this server (and the benchmarks
    that measure it: bench/decode_step.py, precision.py, request_budget.py) serves it."""
    model = load_model(config.model, dtype=config.dtype)
    if config.quantized_precisions:
        add_quantized_lanes(model, model.local_experts, config.quantized_precisions, config.int4_group_size,
                            fast_dtype(config.fast_dtype), config.quant_materialize)
    return model


def build_embedded_app(config: AppConfig) -> FastAPI:
    config.process_settings().apply()
    metrics = Metrics("prometheus")
    model = load_served_model(config)
    tokenizer = CodeTokenizer.from_dir(config.model)
    engine_config = config.engine_config()
    # The same precision lanes as the Ray Router: inline completions never share a batch with, nor
    # yield the CPU to, full-precision requests.
    engine = Lanes(model, engine_config, tokenizer, EngineMetricsObserver(metrics), config.fast_lane_kv_fraction,
                   config.full_lane_max_defer_s)
    settings = ApiSettings(served_model_name=config.model_name, tokenizer=tokenizer, max_model_len=engine.max_model_len,
                           max_body_bytes=config.max_body_bytes, api_keys=(*config.api_keys, *api_keys_from_env()),
                           request_timeout_s=config.request_timeout_s, shed_window_s=config.shed_window_s,
                           precisions=model.precisions, typing_through=config.typing_through,
                           generation_defaults=GenerationDefaults.from_model_dir(config.model))

    async def exposition() -> bytes:
        return metrics.exposition()

    app = create_app(LocalEngineClient(engine, engine_config.retry_after_s), settings,
                     extra_routers=[metrics_router(exposition)])
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.state.engine = engine
    app.state.metrics = metrics
    return app


def serve_embedded(config: AppConfig) -> None:
    import uvicorn

    app = build_embedded_app(config)
    print(f"moe-serve (embedded): serving {config.model_name} at http://{config.host}:{config.port}/v1", flush=True)
    try:
        uvicorn.run(app, host=config.host, port=config.port, log_level="warning")
    finally:
        app.state.engine.shutdown()
