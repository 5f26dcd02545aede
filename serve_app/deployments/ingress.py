"""Ingress deployment: the FastAPI app of `serve_app.api`, talking to the Router's engine.

With the engine in its own process (`engine_host: process`) the client is `hosting.client.RemoteEngineClient`.
With the engine inside the Router replica (the default), `RouterClient` is the api layer's EngineClient: it
streams a request's outputs from the Router over Serve handles and turns Ray's wrapped errors back into the engine's typed ones (so the HTTP layer can map
them to 400/429) or into `BackendUnavailableError` (503) when the router or a shard is gone.
"""
from __future__ import annotations

import asyncio
from typing import AsyncIterator

import httpx
import ray
from ray import serve
from ray.exceptions import RayError

from serve_app.api.app import create_app
from serve_app.api.errors import BackendUnavailableError
from serve_app.api.observability import MetricsMiddleware, metrics_router
from serve_app.api.settings import ApiSettings, GenerationDefaults
from serve_app.config import AppConfig, api_keys_from_env
from serve_app.deployments.direct_ingress import allow_rebind
from serve_app.engine import RequestOutput, SamplingParams
from serve_app.hosting.client import RemoteEngineClient, backend_error, ray_cause, router_health
from serve_app.metrics import Metrics
from serve_app.model import ModelConfig
from serve_app.tokenizer import CodeTokenizer


class RouterClient:
    def __init__(self, router, health_timeout_s: float = 5.0):
        self.router = router
        self.stream = router.options(stream=True)
        self.health_timeout_s = health_timeout_s

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       tag: str = "", precision: str = "full", stream: bool = True) -> AsyncIterator[RequestOutput]:
        responses = self.stream.generate.remote(request_id, prompt_token_ids, params, tag, precision, stream)
        finished = False
        try:
            async for out in responses:
                finished = out.finished
                yield out
        except RayError as exc:
            error = backend_error(ray_cause(exc))
            raise error from (exc if isinstance(error, BackendUnavailableError) else None)
        finally:
            if not finished:                    # client went away or we failed: free the KV now
                responses.cancel()
                await asyncio.shield(self.abort(request_id))

    async def abort(self, request_id: str) -> None:
        try:
            await self.router.abort.remote(request_id)
        except RayError:
            pass                                # the router is gone; so is the request

    async def check_health(self) -> None:
        await router_health(self.router, self.health_timeout_s)


def _node_metrics_url() -> str:
    node_id = ray.get_runtime_context().get_node_id()
    node = next(n for n in ray.nodes() if n["NodeID"] == node_id)
    return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"


@serve.deployment(name="Ingress", max_ongoing_requests=1024)
@serve.ingress()
class Ingress:
    def __init__(self, router, config: AppConfig):
        config.process_settings().apply()
        allow_rebind()                   # a restarted replica must get the public port back
        # The engine in its own process is reached over its connection; inside the Router replica, over
        # Serve handle calls (serve_app/hosting).
        self.client = RemoteEngineClient(router) if config.resolved_engine_host() == "process" else RouterClient(router)
        self._metrics_url: str | None = None
        # Keys from the environment (e.g. a Kubernetes Secret) are read here, in the replica, so they
        # never pass through the Serve controller or the stored application config.
        positions = ModelConfig.from_dir(config.model).max_position_embeddings
        self.settings = ApiSettings(
            served_model_name=config.model_name, tokenizer=CodeTokenizer.from_dir(config.model),
            max_model_len=min(config.engine_config().max_model_len or positions, positions),
            api_keys=(*config.api_keys, *api_keys_from_env()), max_body_bytes=config.max_body_bytes,
            request_timeout_s=config.request_timeout_s, shed_window_s=config.shed_window_s,
            precisions=("full", *config.quantized_precisions), typing_through=config.typing_through,
            generation_defaults=GenerationDefaults.from_model_dir(config.model))

    def __serve_build_asgi_app__(self):
        app = create_app(self.client, self.settings, extra_routers=[metrics_router(self.node_metrics)])
        app.add_middleware(MetricsMiddleware, metrics=Metrics("ray"))
        return app

    async def node_metrics(self) -> bytes:
        """/metrics: this node's Ray metrics export (every replica's series on the node, `ray_` prefixed)."""
        if self._metrics_url is None:   # ray.nodes() is a blocking GCS call: once, off the event loop
            self._metrics_url = await asyncio.to_thread(_node_metrics_url)
        async with httpx.AsyncClient(timeout=5) as client:
            resp = await client.get(self._metrics_url)
        return resp.content
