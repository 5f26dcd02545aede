"""The FastAPI app: OpenAI-compatible completions and chat, the FIM endpoint, llama.cpp's
/completion and /infill, models and health.

`create_app(client, settings)` is the whole HTTP surface, with the engine injected as an
`EngineClient`: tests run it over an in-process engine (`LocalEngineClient`), the Serve deployment
over its router handle; nothing here imports Ray. Other HTTP concerns (`/metrics`) plug in as
extra routers, so this module does not grow a constructor that wires every feature.

One request (DESIGN §2, step 1 and 5):
1. routing (404/405), then the API key (401) on everything but /health;
2. the body: size limit, UTF-8, JSON object (api/body.py), then the pydantic model (400 naming
   the field);
3. model name (404), prompt tokenization (chat template or FIM format), sampling params and
   context length (400) — api/prepare.py;
4. `client.generate`: admission errors come before the first output and keep their status
   (429 with Retry-After when the engine queue is full, 503 when it is down);
5. the JSON body, or SSE chunks from the first token on, while watching for the client leaving
   and the deadline — api/streaming.py. Prompts and completions are never logged.
"""
from __future__ import annotations

import asyncio
import hmac
from typing import Sequence, TypeVar

from fastapi import APIRouter, Depends, FastAPI
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_app.api.batch import BatchCompletion, batch_parts
from serve_app.api.body import read_model
from serve_app.api.client import EngineClient
from serve_app.api.errors import ApiError, bad_request, from_exception, internal_error
from serve_app.api.llamacpp import LlamaCppServer
from serve_app.api.prepare import PreparedRequest, check_model, prepare_chat, prepare_completion, prepare_fim
from serve_app.api.protocol import ChatCompletionRequest, CompletionRequest, FimRequest, ModelCard, ModelList
from serve_app.api.render import Renderer
from serve_app.api.settings import ApiSettings
from serve_app.api.shedding import EdgeShedding
from serve_app.api.streaming import (CLIENT_CLOSED_REQUEST, SSE_HEADERS, ClientDisconnected, EventStreamResponse,
                                     event_stream, fail_before_response, last_output, response_headers, run_guarded,
                                     start_generation)

M = TypeVar("M", bound=BaseModel)


def create_app(client: EngineClient, settings: ApiSettings, extra_routers: Sequence[APIRouter] = ()) -> FastAPI:
    server = OpenAIServer(client, settings)
    # No /docs or /openapi.json: bodies are parsed by hand (see api/body.py), so FastAPI's schema
    # would be empty; docs/api.md is the reference.
    app = FastAPI(title="moe-serve", docs_url=None, redoc_url=None, openapi_url=None)
    auth = [Depends(server.authenticate)]
    app.add_api_route("/v1/completions", server.completions, methods=["POST"], dependencies=auth)
    app.add_api_route("/v1/chat/completions", server.chat_completions, methods=["POST"], dependencies=auth)
    app.add_api_route("/v1/fim/completions", server.fim_completions, methods=["POST"], dependencies=auth)
    llama = LlamaCppServer(client, settings)         # llama.cpp's editor endpoints (api/llamacpp.py)
    app.add_api_route("/completion", llama.completion, methods=["POST"], dependencies=auth)
    app.add_api_route("/infill", llama.infill, methods=["POST"], dependencies=auth)
    app.add_api_route("/v1/models", server.list_models, methods=["GET"], dependencies=auth)
    app.add_api_route("/v1/models/{model_id:path}", server.get_model, methods=["GET"], dependencies=auth)
    app.add_api_route("/health", server.health, methods=["GET"])
    for router in extra_routers:
        app.include_router(router)
    app.add_exception_handler(ApiError, _api_error_response)
    app.add_exception_handler(StarletteHTTPException, _http_error_response)
    app.add_exception_handler(RequestValidationError, _validation_error_response)
    if settings.shed_window_s > 0:
        app.add_middleware(EdgeShedding, window_s=settings.shed_window_s)
    app.add_middleware(CatchAllMiddleware)
    app.state.engine_client = client
    app.state.api_settings = settings
    return app


class OpenAIServer:
    """The route handlers; holds the injected engine client and settings."""

    def __init__(self, client: EngineClient, settings: ApiSettings) -> None:
        self.client = client
        self.settings = settings

    async def authenticate(self, request: Request) -> None:
        keys = self.settings.api_keys
        if not keys:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                           code="missing_api_key", headers={"WWW-Authenticate": "Bearer"})
        # Compare with every key, without stopping at a match: the time taken says nothing about the keys.
        matched = False
        for key in keys:
            matched |= hmac.compare_digest(key.encode(), token.encode())
        if not matched:
            raise ApiError(401, "invalid API key", code="invalid_api_key",
                           headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})

    async def completions(self, request: Request) -> Response:
        body = await self._parse(request, CompletionRequest)
        if body.batch is None:
            return await self._serve(request, await prepare_completion(body, self.settings))
        parts = []
        for i, prompt in enumerate(body.batch):
            try:
                parts.append(await prepare_completion(body.model_copy(update={"prompt": prompt}), self.settings))
            except ApiError as exc:      # name the prompt: "prompt" → "prompt[2]"
                if exc.param == "prompt":
                    exc.param = f"prompt[{i}]"
                raise
        return await self._serve_batch(request, *batch_parts(parts))

    async def _serve_batch(self, request: Request, response_id: str, parts: list[PreparedRequest]) -> Response:
        timeout_s = self.settings.request_timeout_s
        deadline = asyncio.get_running_loop().time() + timeout_s
        batch = BatchCompletion(self.client, parts, response_id, self.settings.tokenizer)
        headers = {"X-Request-Id": batch.response_id, "x-moe-tier": parts[0].tier.tier.value,
                   "x-moe-precision": parts[0].precision}
        try:
            if parts[0].stream:
                firsts = await batch.first_outputs(request, deadline, timeout_s)
            else:
                return _json(await batch.response(request, deadline, timeout_s), headers)
        except ClientDisconnected:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        except ApiError:
            raise
        except Exception as exc:         # noqa: BLE001 - engine errors keep their status (429, 503, 400)
            raise from_exception(exc) from exc
        return EventStreamResponse(batch.events(firsts, deadline, timeout_s), headers={**headers, **SSE_HEADERS})

    async def chat_completions(self, request: Request) -> Response:
        body = await self._parse(request, ChatCompletionRequest)
        return await self._serve(request, await prepare_chat(body, self.settings))

    async def fim_completions(self, request: Request) -> Response:
        body = await self._parse(request, FimRequest)
        return await self._serve(request, await prepare_fim(body, self.settings))

    async def list_models(self) -> Response:
        return _json(ModelList(data=[self._model_card()]))

    async def get_model(self, model_id: str) -> Response:
        check_model(model_id, self.settings)
        return _json(self._model_card())

    async def health(self) -> Response:
        try:
            await self.client.check_health()
        except Exception as exc:  # noqa: BLE001 - BackendUnavailableError → 503; anything else is a bug (500)
            raise from_exception(exc) from exc
        return JSONResponse({"status": "ok"})

    def _model_card(self) -> ModelCard:
        return ModelCard(id=self.settings.served_model_name, created=0, max_model_len=self.settings.max_model_len)

    async def _parse(self, request: Request, model: type[M]) -> M:
        return await read_model(request, model, self.settings.max_body_bytes, self.settings.request_timeout_s)

    async def _serve(self, request: Request, prepared: PreparedRequest) -> Response:
        timeout_s = self.settings.request_timeout_s
        deadline = asyncio.get_running_loop().time() + timeout_s
        outputs = start_generation(self.client, prepared, prepared.stream)
        headers, renderer = response_headers(prepared), Renderer(prepared, self.settings.tokenizer)
        try:
            if prepared.stream:
                first = await run_guarded(request, anext(outputs, None), deadline, timeout_s)
                if first is None:
                    raise RuntimeError("the engine's output stream ended before its first output")
            else:
                final = await run_guarded(request, last_output(outputs), deadline, timeout_s)
                await outputs.aclose()
        except BaseException as exc:
            return await fail_before_response(self.client, outputs, prepared, exc)
        if not prepared.stream:
            return _json(renderer.response(final), headers)
        body = event_stream(first, outputs, prepared, renderer, self.client, deadline, timeout_s)
        return EventStreamResponse(body, headers={**headers, **SSE_HEADERS})


def _json(model: BaseModel, headers: dict[str, str] | None = None, status: int = 200) -> Response:
    return Response(model.model_dump_json(), status_code=status, headers=headers, media_type="application/json")


# ---- errors ----------------------------------------------------------------------------------------

async def _api_error_response(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _http_error_response(request: Request, exc: Exception) -> Response:
    # Starlette's routing errors (unknown path, wrong method), in OpenAI's shape.
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        error = ApiError(404, f"unknown route: {request.method} {request.url.path}", code="not_found")
    elif exc.status_code == 405:
        error = ApiError(405, f"method {request.method} is not allowed on {request.url.path}",
                         code="method_not_allowed")
    else:
        error = ApiError(exc.status_code, str(exc.detail), code=None)
    error.headers.update(exc.headers or {})
    return await _api_error_response(request, error)


async def _validation_error_response(request: Request, exc: Exception) -> Response:
    # FastAPI's own validation (path/query parameters of extra routers): 400, never 422.
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", ())[1:]]
    error = bad_request(f"invalid value: {first.get('msg', 'invalid request')}", ".".join(loc) or None, "invalid_value")
    return await _api_error_response(request, error)


class CatchAllMiddleware:
    """Unhandled exceptions become a generic 500 body (logged as type + frames); never a traceback.

    Starlette's ServerErrorMiddleware would also answer 500, but in plain text and then re-raise, so
    the server logs the exception message, which may quote a prompt."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except ClientDisconnect:
            return                       # the client left mid-stream; nothing to answer
        except Exception as exc:         # noqa: BLE001 - the last line of defence
            error = internal_error(exc)
            if not started:
                await JSONResponse(error.body(), status_code=error.status)(scope, receive, send)
