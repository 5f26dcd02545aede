"""Request and response bodies of the HTTP API, in OpenAI's shape (plus the seed's FIM endpoint).

Why strict: editors and SDKs send JSON, and a `"max_tokens": "16"` or `"temperature": true` is a
client bug we should name, not guess at. So numbers are strict (an int is accepted where a float is
expected, never a string or a bool), NaN/Infinity are refused, and unknown top-level fields are a
400 naming the field (OpenAI does the same).
Chat messages ignore unknown keys: SDKs echo assistant messages back with `refusal`, `annotations`.

Value ranges (temperature, top_p, n, stop, logprobs, seed, penalties) are not repeated here: `SamplingParams`
owns them and its error names the field. Context length is checked against the tokenized prompt
in api/prepare.py, where the token count is known.

`precision` picks the experts' precision: "auto" (default) lets the complexity classifier decide
(api/tiers.py); responses say the tier and precision used (`tier`, `precision`, and the
`x-moe-tier` / `x-moe-precision` headers).
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AllowInfNan, BaseModel, BeforeValidator, ConfigDict, Field, Strict, field_validator
from pydantic_core import PydanticCustomError

def _check_stop(value: Any) -> Any:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return value
    raise PydanticCustomError("stop_type", "stop must be a string or a list of strings")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


Int = Annotated[int, Strict()]
Float = Annotated[float, Strict(), AllowInfNan(False)]
Bool = Annotated[bool, Strict()]
Precision = Literal["auto", "int4", "int8", "full"]
UsedPrecision = Literal["int4", "int8", "full"]
# A before-validator, so a wrong type is one error at "stop", not one per union member.
Stop = Annotated[str | list[str] | None, BeforeValidator(_check_stop)]

# OpenAI's default for /v1/completions; also used by /v1/fim/completions (inline completions are short).
DEFAULT_COMPLETION_MAX_TOKENS = 16
# OpenAI's chat default is "the rest of the context". We cap it: the engine admits a request only if
# prompt + max_tokens fits its whole KV cache, which for long-context models (Qwen3-Coder: 256k
# positions) is smaller than the context, so an uncapped default would refuse every chat request.
DEFAULT_CHAT_MAX_TOKENS = 2048


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Request):
    include_usage: Bool = False     # send a last chunk with `usage` (and empty `choices`)


class _SamplingFields(_Request):
    """Fields every generating endpoint shares."""
    model: str | None = None        # must be the served model's name; None = the served model
    max_tokens: Int | None = None   # None = the endpoint's default
    temperature: Float = 1.0
    top_p: Float = 1.0
    top_k: Int = 0                  # extension (not in OpenAI): 0 = off
    n: Int = 1
    stop: Stop = None
    seed: Int | None = None
    stream: Bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None         # accepted and ignored (OpenAI abuse tracking)
    precision: Precision = "auto"   # "auto": the tier classifier decides; otherwise this precision
    frequency_penalty: Float = 0.0  # [-2, 2], checked by SamplingParams
    presence_penalty: Float = 0.0
    # token id (a decimal string, as OpenAI's clients send it) → bias in [-100, 100]; checked by
    # SamplingParams (keys, range, count) and the engine (ids inside the vocabulary)
    logit_bias: dict[str, Float] | None = None


# Prompts in one /v1/completions batch: each is an engine request of its own (api/batch.py).
MAX_BATCH_PROMPTS = 32


class CompletionRequest(_SamplingFields):
    """POST /v1/completions. `prompt`: text, token ids, or a batch of either (api/batch.py);
    `suffix` turns it into fill-in-the-middle."""
    prompt: str | list[Int] | list[str] | list[list[Int]]
    suffix: str | None = None       # FIM: `prompt` is the prefix; built with the model's FIM tokens
    logprobs: Int | None = None     # k: the chosen token's logprob plus the k most likely alternatives
    echo: Bool = False              # put the prompt's text before each choice's text (not with suffix/logprobs)
    best_of: Int | None = None      # generate best_of >= n candidates, return the n best by cumulative logprob

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, value: Any) -> Any:
        if isinstance(value, str) or (isinstance(value, list) and all(is_int(t) for t in value)):
            return value
        if isinstance(value, list) and (all(isinstance(p, str) for p in value) or all(
                isinstance(p, list) and all(is_int(t) for t in p) for p in value)):
            if len(value) > MAX_BATCH_PROMPTS:
                raise PydanticCustomError("batch_too_large", "a batch holds at most {limit} prompts, got {count}",
                                          {"limit": MAX_BATCH_PROMPTS, "count": len(value)})
            return value
        raise PydanticCustomError("prompt_type", "prompt must be a string, a list of token ids, or a list "
                                                 "of either (a batch)")

    @property
    def batch(self) -> list[str] | list[list[int]] | None:
        """The prompts of a batch request; None for a single prompt."""
        p = self.prompt
        return p if isinstance(p, list) and p and not is_int(p[0]) else None


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]   # "developer" is OpenAI's new "system"
    content: str                    # a string, or OpenAI's list of {"type": "text", "text": ...} parts
    name: str | None = None         # accepted and ignored

    @field_validator("content", mode="before")
    @classmethod
    def _join_text_parts(cls, value: Any) -> Any:
        if isinstance(value, str):
            return value
        if isinstance(value, list):
            if all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in value):
                return "".join(p["text"] for p in value)
            raise PydanticCustomError("content_parts", "only content parts of type \"text\" are supported")
        raise PydanticCustomError("content_type", "content must be a string or a list of text parts")


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions. Rendered with the model's chat template."""
    messages: Annotated[list[ChatMessageIn], Field(min_length=1)]
    max_completion_tokens: Int | None = None   # OpenAI's newer name for max_tokens
    logprobs: Bool = False
    top_logprobs: Int | None = None            # alternatives per token; needs logprobs=true


class FimRequest(_Request):
    """POST /v1/fim/completions (the seed article's editor endpoint): prefix + suffix → middle."""
    model: str | None = None
    prefix: str
    suffix: str = ""
    max_tokens: Int | None = None
    temperature: Float = 1.0
    top_p: Float = 1.0
    top_k: Int = 0
    stop: Stop = None
    seed: Int | None = None
    stream: Bool = False
    precision: Precision = "auto"
    frequency_penalty: Float = 0.0
    presence_penalty: Float = 0.0


# ---- responses -----------------------------------------------------------------------------------

class PromptTokensDetails(BaseModel):
    cached_tokens: int              # prompt tokens served from the prefix cache (no prefill compute)
    # FIM: prefix/suffix tokens trimmed away so the file fits the context (ours; OpenAI has no such field)
    dropped_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int          # summed over all n choices
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy completions logprobs: parallel lists, one entry per generated token."""
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]          # offset of each token's text within this choice's text


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    precision: UsedPrecision = "full"      # what ran
    tier: str = "none"                      # the complexity tier (api/tiers.py)
    choices: list[CompletionChoice]
    usage: Usage | None = None      # None only on stream chunks


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]                # UTF-8 bytes of `token`


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    precision: UsedPrecision = "full"      # what ran
    tier: str = "none"                      # the complexity tier (api/tiers.py)
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None   # only in each choice's first chunk
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    precision: UsedPrecision = "full"      # what ran
    tier: str = "none"                      # the complexity tier (api/tiers.py)
    choices: list[ChatChunkChoice]
    usage: Usage | None = None      # set only on the include_usage chunk


class FimResponse(BaseModel):
    id: str
    completion: str                 # the middle: text to insert between prefix and suffix
    finish_reason: str | None
    usage: Usage | None = None      # streaming: set on the last chunk only
    precision: UsedPrecision = "full"   # what ran
    tier: str = "none"                  # the complexity tier (api/tiers.py)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "moe-serve"
    max_model_len: int              # prompt + generated tokens per request, at most


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
