"""Request body → what the engine runs: prompt token ids and `SamplingParams` (DESIGN §2.1).

Everything that can be refused without the engine is refused here, with the field the client sent
named in `param`: unknown model, empty prompt, unsupported combinations, and a prompt or
max_tokens that does not fit the context. The engine checks context length too, but its error
cannot say which field was at fault; here we know the token count and say it.

Tokenizing a long prompt takes milliseconds of CPU; above `_OFFLOAD_CHARS` it runs in a worker
thread so other requests' streams keep flowing meanwhile.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Callable, Literal

from serve_app.api.errors import ApiError, bad_request
from serve_app.api.protocol import DEFAULT_CHAT_MAX_TOKENS, ChatCompletionRequest, CompletionRequest, FimRequest
from serve_app.api.settings import ApiSettings
from serve_app.api.tiers import CompletionContext, ResolvedTier, TierError, classify_request
from serve_app.api.tiers import Precision as TierPrecision
from serve_app.api.typing_through import Hole, context_scope
from serve_app.engine import RequestOutput, SamplingParams, SamplingParamsError
from serve_app.fim import ContextFile
from serve_app.tokenizer import ChatMessage, PromptError

_OFFLOAD_CHARS = 16_384

Kind = Literal["completion", "chat", "fim"]
_ID_PREFIX = {"completion": "cmpl-", "chat": "chatcmpl-", "fim": "fim-"}


@dataclass(frozen=True)
class PreparedRequest:
    kind: Kind                          # which response shape to render
    request_id: str                     # the response id, also the engine's request id
    created: int                        # unix seconds, echoed in every chunk
    model: str                          # served model name, echoed
    tier: ResolvedTier                  # tier, precision and candidate ranking (api/tiers.py)
    prompt_token_ids: list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool                 # streaming: send a final usage chunk
    # Engine field → the field this client sent, so errors raised later name the client's field
    # (chat's max_completion_tokens / top_logprobs).
    param_aliases: dict[str, str] = field(default_factory=dict)
    client_logprobs: bool = True        # False: logprobs were requested only to rank candidates
    dropped_prompt_tokens: int = 0      # FIM: prompt tokens trimmed to fit the context (usage reports them)
    echo_text: str = ""                 # completions with echo: the prompt's text, put before each choice's
    best_of: int | None = None          # completions: candidates generated, the n best (cumulative logprob) returned
    # Called with the final output (api/streaming.start_generation): typing-through remembers the
    # suggestion (api/typing_through.py).
    on_finished: Callable[[RequestOutput], None] | None = None

    @property
    def precision(self) -> str:
        return self.tier.precision.value


def check_model(model: str | None, settings: ApiSettings) -> str:
    if model is not None and model != settings.served_model_name:
        raise ApiError(404, f"the model {model!r} does not exist; this server serves "
                            f"{settings.served_model_name!r}", param="model", code="model_not_found")
    return settings.served_model_name


async def prepare_completion(req: CompletionRequest, settings: ApiSettings,
                             fim_context: tuple[ContextFile, ...] = ()) -> PreparedRequest:
    """`fim_context`: other files' chunks for an FIM prompt (llama.cpp's /infill `input_extra`)."""
    model = check_model(req.model, settings)
    _check_stream_options(req.stream, req.stream_options is not None)
    _check_echo_and_best_of(req)
    prompt_param = "prompt"
    tok = settings.tokenizer
    tier = _resolve_tier(req, settings, prefix=req.prompt if isinstance(req.prompt, str) else "",
                         suffix=req.suffix or "", max_tokens=_max_tokens_sent(req),
                         kind="fim" if req.suffix is not None else "completion", stop=_stops(req.stop))
    if req.best_of is not None:         # OpenAI's best_of: exactly that many candidates, no tier ranking
        tier = replace(tier, n=req.n, num_candidates=req.best_of, rank_candidates=False,
                       reasons=(*tier.reasons, "best_of"))
    dropped = 0
    if req.suffix is not None:
        if not isinstance(req.prompt, str):
            raise bad_request("suffix (fill-in-the-middle) needs a text prompt, not token ids", "suffix")
        prompt_ids, dropped = await _fim_prompt(req.prompt, req.suffix, tier, settings, "suffix", fim_context)
    elif isinstance(req.prompt, str):
        if not req.prompt:
            raise bad_request("prompt must not be empty", "prompt")
        prompt_ids = await _tokenize(lambda: tok.encode(req.prompt, add_special_tokens=True), "prompt",
                                     len(req.prompt))
    else:
        if not req.prompt:
            raise bad_request("prompt must not be an empty list of token ids", "prompt")
        prompt_ids = list(req.prompt)
    ranks = tier.rank_candidates or (req.best_of or 0) > req.n     # ranking needs the tokens' logprobs
    logprobs = req.logprobs if req.logprobs is not None else (0 if ranks else None)
    params = _sampling_params({"n": "best_of"} if req.best_of is not None else {},
                              max_tokens=_budget(req, tier, prompt_ids, settings), temperature=tier.temperature,
                              top_p=req.top_p, top_k=req.top_k, n=tier.num_candidates, stop=req.stop, seed=req.seed,
                              logprobs=logprobs, **_penalties(req, settings))
    _check_context(len(prompt_ids), params.max_tokens, settings, prompt_param, "max_tokens")
    echo = (req.prompt if isinstance(req.prompt, str) else tok.decode(prompt_ids)) if req.echo else ""
    params, on_finished = _typing_through(
        settings, params, tier, req.prompt if isinstance(req.prompt, str) and not req.echo else None, req.suffix,
        context_scope("fim" if req.suffix is not None else "completion", fim_context))
    return PreparedRequest("completion", _new_id("completion"), int(time.time()), model, tier,
                           prompt_ids, params, req.stream, _include_usage(req),
                           client_logprobs=req.logprobs is not None, dropped_prompt_tokens=dropped,
                           echo_text=echo, best_of=req.best_of, on_finished=on_finished)


def _check_echo_and_best_of(req: CompletionRequest) -> None:
    """What OpenAI's legacy completions refuse too, and what we do not serve (prompt logprobs)."""
    if req.echo and req.suffix is not None:
        raise bad_request("echo cannot be combined with suffix (fill-in-the-middle)", "echo")
    if req.echo and req.logprobs is not None:
        raise bad_request("echo with logprobs would need the prompt tokens' logprobs, which this server does "
                          "not compute; send echo or logprobs", "echo")
    if req.best_of is not None:
        if req.best_of < req.n:
            raise bad_request(f"best_of ({req.best_of}) must be at least n ({req.n})", "best_of")
        if req.stream and req.best_of > req.n:
            raise bad_request("best_of > n cannot be streamed: the best candidates are known only at the end",
                              "best_of")


async def prepare_chat(req: ChatCompletionRequest, settings: ApiSettings) -> PreparedRequest:
    model = check_model(req.model, settings)
    _check_stream_options(req.stream, req.stream_options is not None)
    aliases: dict[str, str] = {}
    max_tokens = req.max_tokens
    if req.max_completion_tokens is not None:
        if req.max_tokens is not None and req.max_tokens != req.max_completion_tokens:
            raise bad_request(f"max_tokens ({req.max_tokens}) and max_completion_tokens "
                              f"({req.max_completion_tokens}) disagree; send one", "max_completion_tokens")
        max_tokens, aliases["max_tokens"] = req.max_completion_tokens, "max_completion_tokens"
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs=true", "top_logprobs")
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    if req.top_logprobs is not None:
        aliases["logprobs"] = "top_logprobs"
    # "developer" is OpenAI's newer name for the system role; chat templates know only "system".
    messages = [ChatMessage("system" if m.role == "developer" else m.role, m.content) for m in req.messages]
    tok = settings.tokenizer
    prompt_ids = await _tokenize(lambda: tok.build_chat_prompt_ids(messages), "messages",
                                 sum(len(m.content) for m in messages))
    tier = _resolve_tier(req, settings, prefix="", max_tokens=max_tokens, kind="chat", stop=_stops(req.stop))
    if max_tokens is None:   # the tier's budget, within what the context leaves (see DEFAULT_CHAT_MAX_TOKENS)
        max_tokens = max(1, min(tier.max_tokens, DEFAULT_CHAT_MAX_TOKENS, settings.max_model_len - len(prompt_ids)))
    client_logprobs = logprobs is not None
    if logprobs is None and tier.rank_candidates:
        logprobs = 0
    params = _sampling_params(aliases, max_tokens=max_tokens, temperature=tier.temperature, top_p=req.top_p,
                              top_k=req.top_k, n=tier.num_candidates, stop=req.stop, seed=req.seed, logprobs=logprobs,
                              **_penalties(req, settings))
    _check_context(len(prompt_ids), params.max_tokens, settings, "messages", aliases.get("max_tokens", "max_tokens"))
    return PreparedRequest("chat", _new_id("chat"), int(time.time()), model, tier, prompt_ids, params,
                           req.stream, _include_usage(req), aliases, client_logprobs)


async def prepare_fim(req: FimRequest, settings: ApiSettings) -> PreparedRequest:
    model = check_model(req.model, settings)
    tier = _resolve_tier(req, settings, prefix=req.prefix, suffix=req.suffix, max_tokens=_max_tokens_sent(req),
                         kind="fim", stop=_stops(req.stop))
    prompt_ids, dropped = await _fim_prompt(req.prefix, req.suffix, tier, settings, "prefix")
    params = _sampling_params({}, max_tokens=_budget(req, tier, prompt_ids, settings), temperature=tier.temperature,
                              top_p=req.top_p, top_k=req.top_k, n=tier.num_candidates, stop=req.stop, seed=req.seed,
                              logprobs=0 if tier.rank_candidates else None, **_penalties(req, settings))
    _check_context(len(prompt_ids), params.max_tokens, settings, "prefix", "max_tokens")
    params, on_finished = _typing_through(settings, params, tier, req.prefix, req.suffix, context_scope("fim", ()))
    # The FIM endpoint returns one completion: the best candidate when the tier ranks several.
    return PreparedRequest("fim", _new_id("fim"), int(time.time()), model, tier, prompt_ids, params,
                           req.stream, include_usage=False, client_logprobs=False,   # last chunk carries usage
                           dropped_prompt_tokens=dropped, on_finished=on_finished)


def _typing_through(settings: ApiSettings, params: SamplingParams, tier: ResolvedTier, prompt: str | None,
                    suffix: str | None, scope: str):
    """(params with the draft of a suggestion the user is typing, the hook that remembers this
    request's own suggestion); unchanged and no hook without a text prompt, with several
    candidates or with typing-through off."""
    memory = settings.suggestions
    if memory is None or prompt is None or tier.num_candidates != 1:
        return params, None
    hole = Hole(scope, prompt, suffix or "")
    if not memory.keeps(hole):
        return params, None
    draft = memory.draft(hole)
    return (replace(params, draft_token_ids=tuple(draft)) if draft else params), memory.on_finished(hole)


async def _fim_prompt(prefix: str, suffix: str, tier: ResolvedTier, settings: ApiSettings,
                      param: str, context: tuple[ContextFile, ...] = ()) -> tuple[list[int], int]:
    """The FIM prompt in the checkpoint's order, trimmed at its far ends so that it leaves the
    tier's max_tokens (the client's, when sent) to generate (serve_app/fim.py)."""
    room = settings.max_model_len - tier.max_tokens
    if room <= 0:    # max_tokens alone fills the context: nothing to trim to; _check_context says so
        room = None
    prompt = await _tokenize(lambda: settings.tokenizer.build_fim_prompt(prefix, suffix, room, context=context),
                             param, len(prefix) + len(suffix) + sum(len(c.text) for c in context))
    return prompt.ids, prompt.dropped_tokens


def _resolve_tier(req, settings: ApiSettings, **context) -> ResolvedTier:
    """Classify, let explicit fields win, and fall back to full precision when an auto-chosen
    precision is not served here. Fields the client did not send are None (pydantic fills defaults)."""
    sent = req.model_fields_set
    try:
        ctx = CompletionContext(**context)
        tier = classify_request(ctx, req.precision, req.temperature if "temperature" in sent else None,
                                getattr(req, "n", None) if "n" in sent else None, stream=req.stream)
    except TierError as exc:
        raise bad_request(str(exc), exc.param, "invalid_value") from exc
    if tier.precision.value not in settings.precisions:
        if req.precision != "auto":
            raise bad_request(f"precision {req.precision!r} is not served here; available: "
                              f"{', '.join(settings.precisions)}", "precision", "invalid_value")
        tier = replace(tier, precision=TierPrecision.FULL, reasons=(*tier.reasons, "precision_unavailable"))
    return tier


def _budget(req, tier: ResolvedTier, prompt_ids: list[int], settings: ApiSettings) -> int:
    """max_tokens: what the client sent (checked against the context later, so too much is a 400),
    else the tier's budget within what the context leaves."""
    if "max_tokens" in req.model_fields_set and req.max_tokens is not None:
        return tier.max_tokens
    return max(1, min(tier.max_tokens, settings.max_model_len - len(prompt_ids)))


def _max_tokens_sent(req) -> int | None:
    return req.max_tokens if "max_tokens" in req.model_fields_set else None


def _new_id(kind: Kind) -> str:
    return _ID_PREFIX[kind] + uuid.uuid4().hex


def _stops(stop) -> tuple[str, ...]:
    return (stop,) if isinstance(stop, str) else tuple(stop or ())


def _include_usage(req: CompletionRequest | ChatCompletionRequest) -> bool:
    return req.stream_options is not None and req.stream_options.include_usage


def _check_stream_options(stream: bool, has_options: bool) -> None:
    if has_options and not stream:
        raise bad_request("stream_options is only allowed when stream is true", "stream_options")


async def _tokenize(build: Callable[[], list[int]], param: str, num_chars: int) -> list[int]:
    try:
        return await asyncio.to_thread(build) if num_chars > _OFFLOAD_CHARS else build()
    except PromptError as exc:
        raise bad_request(str(exc), param, "invalid_prompt") from exc


def _penalties(req, settings: ApiSettings) -> dict:
    """The request's penalties (the checkpoint's defaults for those it leaves out) and logit bias.
    A checkpoint's `penalty_skips_structural` applies while its default penalties do: a client that
    sends a non-zero penalty gets OpenAI's."""
    defaults = settings.generation_defaults
    names = ("frequency_penalty", "presence_penalty")
    values = {name: getattr(req if name in req.model_fields_set else defaults, name) for name in names}
    # Skipping holds while every penalty in force is the checkpoint's (a client's 0 just turns one off).
    skips = defaults.penalty_skips_structural and not any(
        name in req.model_fields_set and getattr(req, name) != 0 for name in names)
    return {**values, "penalty_skips_structural": skips, "logit_bias": getattr(req, "logit_bias", None)}


def _sampling_params(aliases: dict[str, str], **values) -> SamplingParams:
    try:
        return SamplingParams(**values)
    except SamplingParamsError as exc:
        raise bad_request(str(exc), aliases.get(exc.param, exc.param), "invalid_value") from exc


def _check_context(num_prompt: int, max_tokens: int, settings: ApiSettings, prompt_param: str,
                   max_tokens_param: str) -> None:
    limit = settings.max_model_len
    if num_prompt >= limit:
        raise bad_request(f"this model's maximum context length is {limit} tokens and the prompt has "
                          f"{num_prompt}, leaving no room to generate", prompt_param, "context_length_exceeded")
    if num_prompt + max_tokens > limit:
        raise bad_request(f"this model's maximum context length is {limit} tokens; the request needs "
                          f"{num_prompt} prompt + {max_tokens_param}={max_tokens} = {num_prompt + max_tokens}; "
                          f"lower {max_tokens_param} to at most {limit - num_prompt}",
                          max_tokens_param, "context_length_exceeded")
