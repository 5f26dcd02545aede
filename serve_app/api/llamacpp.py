"""llama.cpp's server endpoints, POST /completion and POST /infill, so that its clients work unchanged.

Who sends what (read from the clients' sources; docs/api.md has the fields):
- llama.vim posts to /infill: `input_prefix` (the lines above the cursor), `prompt` (the cursor's
  line up to the cursor), `input_suffix`, `input_extra` (chunks of other files), `n_predict`,
  `n_indent`, `top_k`, `top_p`, `t_max_predict_ms`, `response_fields`, and more it does not need
  answered (samplers, cache_prompt, id_slot, t_max_prompt_ms); it reads one JSON object, and only
  if it is compact (`"content":"`, no space after the colon). Its warm-up request has n_predict 0.
- llama.vscode posts the same with `n_cmpl` (3 by default) and reads a JSON array of that many
  results; it reads `generation_settings.n_ctx` and `timings.*` from every answer.
- the seed article's local client posts {prompt, n_predict, temperature, top_p, stop} to
  /completion and reads `content`.

Same engine, tiers and errors as the OpenAI routes: a body becomes a `CompletionRequest` holding only
the fields the client sent, so the tier classifier decides what it leaves out, exactly as on
/v1/completions (llama.cpp's own defaults, e.g. temperature 0.8, do not apply), and api/prepare.py
prepares it; the FIM prompt is the checkpoint's order, with `prompt` continuing the prefix (in PSM
it goes after <MID>, where llama.cpp's README puts it: serve_app/fim.py). Unknown fields are
ignored, as llama.cpp ignores them; fields we know but cannot honour (n_probs, repeat_penalty,
grammar...) are a 400 naming them, never silently dropped. Errors keep this server's OpenAI shape,
whose `error.message` is what both plugins read.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError
from starlette.requests import Request
from starlette.responses import Response

from serve_app.api.body import read_model
from serve_app.api.client import EngineClient
from serve_app.api.errors import ApiError, bad_request, from_validation_error
from serve_app.api.llamacpp_render import LlamaOptions, serve_llama
from serve_app.api.prepare import prepare_completion
from serve_app.api.protocol import Bool, CompletionRequest, Float, Int, Precision, Stop, is_int
from serve_app.api.settings import ApiSettings
from serve_app.fim import ContextFile

# llama.cpp's other names for a field (older versions, OpenAI spellings) → the name used here.
_ALIASES = {"max_tokens": "n_predict", "max_completion_tokens": "n_predict", "n": "n_cmpl",
            "extra_context": "input_extra"}
# Our field → the client's, so errors name what the client sent.
_CLIENT_NAMES = {"max_tokens": "n_predict", "n": "n_cmpl", "suffix": "input_suffix"}
# Known llama.cpp sampling fields this server does not implement, with the value that means "off".
_UNSUPPORTED_UNLESS = {"n_probs": 0, "repeat_penalty": 1.0, "mirostat": 0, "typical_p": 1.0, "min_p": 0.0,
                       "dry_multiplier": 0.0, "xtc_probability": 0.0, "grammar": "", "json_schema": {}}
# Sent by the clients and needing no answer here: the prefix cache is always on, slots are the
# engine's, sampler order is ours (llama.vim's "infill" sampler is what FIM prompts do anyway).
_FORWARDED = ("model", "temperature", "top_k", "top_p", "stream", "frequency_penalty", "presence_penalty",
              "precision")


class ExtraChunk(BaseModel):
    """One `input_extra` entry: a chunk of another file (llama.vim adds a `time`, ignored)."""
    model_config = ConfigDict(extra="ignore")
    filename: str = "tmp"           # llama.cpp's default name
    text: str


class LlamaCompletionRequest(BaseModel):
    """POST /completion. Types are checked as strictly as on the OpenAI routes."""
    model_config = ConfigDict(extra="ignore")
    prompt: str | list[Int]
    n_predict: Int = -1             # -1: this endpoint's default budget; 0: warm the cache, generate nothing
    temperature: Float = 0.8        # negative: greedy, as in llama.cpp
    top_k: Int = 40
    top_p: Float = 0.95
    stop: Stop = None               # empty strings are ignored, as in llama.cpp
    seed: Int = -1                  # -1: random
    stream: Bool = False
    n_cmpl: Int = 1                 # completions returned; > 1 answers a JSON array
    frequency_penalty: Float = 0.0
    presence_penalty: Float = 0.0
    # [[token id, bias or false]] (llama.cpp) or {"id": bias} (OpenAI); false bans the token
    logit_bias: list[tuple[Int, Float | Bool]] | dict[str, Float] | None = None
    n_indent: Int = 0               # lines after the first need this much indentation, or the completion ends
    t_max_predict_ms: Int = 0       # end at a newline once generating took this long (0: off)
    response_fields: list[str] | None = None   # keep only these paths of the answer ("timings/prompt_n")
    return_tokens: Bool = False     # fill `tokens` with the generated ids
    precision: Precision = "auto"   # ours, as on the OpenAI routes
    model: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _aliases_and_unsupported(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for alias, name in _ALIASES.items():
            if alias in data and name not in data:
                data[name] = data.pop(alias)
        for name, off in _UNSUPPORTED_UNLESS.items():
            if name in data and data[name] not in (off, None):
                raise bad_request(f"{name} is not supported by this server (send {off!r} or leave it out)", name,
                                  "unsupported_parameter")
        return data

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, value: Any) -> Any:
        if isinstance(value, str) or (isinstance(value, list) and all(is_int(t) for t in value)):
            return value
        raise PydanticCustomError("prompt_type", "prompt must be a string or a list of token ids (one prompt per "
                                                 "request: mixed and multiple prompts are not served here)")


class LlamaInfillRequest(LlamaCompletionRequest):
    """POST /infill: the hole between `input_prefix` + `prompt` and `input_suffix`."""
    input_prefix: str
    input_suffix: str
    input_extra: list[ExtraChunk] = []
    prompt: str = ""                # the cursor's line up to the cursor


class LlamaCppServer:
    """The two routes; the engine client and settings are injected as for `OpenAIServer`."""

    def __init__(self, client: EngineClient, settings: ApiSettings) -> None:
        self.client = client
        self.settings = settings

    async def completion(self, request: Request) -> Response:
        body = await self._parse(request, LlamaCompletionRequest)
        return await self._serve(request, body, _completion_request(body, body.prompt, None), ())

    async def infill(self, request: Request) -> Response:
        body = await self._parse(request, LlamaInfillRequest)
        context = tuple(ContextFile(c.filename, c.text) for c in body.input_extra)
        req = _completion_request(body, body.input_prefix + body.prompt, body.input_suffix)
        return await self._serve(request, body, req, context)

    async def _parse(self, request: Request, model: type[LlamaCompletionRequest]) -> Any:
        return await read_model(request, model, self.settings.max_body_bytes, self.settings.request_timeout_s)

    async def _serve(self, request: Request, body: LlamaCompletionRequest, req: CompletionRequest,
                     context: tuple[ContextFile, ...]) -> Response:
        try:
            prepared = await prepare_completion(req, self.settings, fim_context=context)
        except ApiError as exc:
            exc.param = _CLIENT_NAMES.get(exc.param or "", exc.param)
            raise
        opts = LlamaOptions(n_indent=body.n_indent, t_max_predict_ms=body.t_max_predict_ms,
                            response_fields=tuple(body.response_fields) if body.response_fields is not None else None,
                            return_tokens=body.return_tokens, warm_up=body.n_predict == 0,
                            as_array=body.n_cmpl > 1)
        return await serve_llama(request, self.client, self.settings, prepared, opts)


def _completion_request(body: LlamaCompletionRequest, prompt: str | list[int], suffix: str | None) -> CompletionRequest:
    """The OpenAI-shaped request with the fields the client sent, in this server's terms."""
    sent = body.model_fields_set
    fields: dict[str, Any] = {name: getattr(body, name) for name in _FORWARDED if name in sent}
    if "temperature" in fields:
        fields["temperature"] = max(0.0, fields["temperature"])         # llama.cpp: <= 0 is greedy
    if body.n_predict >= 0:
        fields["max_tokens"] = max(1, body.n_predict)                     # 0: one token warms the cache
    if body.seed >= 0:
        fields["seed"] = body.seed
    if "n_cmpl" in sent:
        fields["n"] = body.n_cmpl
    if body.stop:
        fields["stop"] = [s for s in ([body.stop] if isinstance(body.stop, str) else body.stop) if s] or None
    if body.logit_bias:
        fields["logit_bias"] = _openai_logit_bias(body.logit_bias)
    try:
        return CompletionRequest.model_validate({**fields, "prompt": prompt, "suffix": suffix})
    except ValidationError as exc:
        raise from_validation_error(exc, _CLIENT_NAMES) from exc


def _openai_logit_bias(bias: list[tuple[int, float | bool]] | dict[str, float]) -> dict[str, float]:
    """llama.cpp's [[id, bias]] pairs as OpenAI's {"id": bias}; `false` bans the token (-100,
    OpenAI's strongest bias), the engine checks ids and ranges."""
    if isinstance(bias, dict):
        return bias
    if any(value is True for _, value in bias):
        raise bad_request("a logit_bias of true means nothing; send a number, or false to ban the token",
                          "logit_bias")
    return {str(token): (-100.0 if value is False else float(value)) for token, value in bias}
