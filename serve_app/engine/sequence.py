"""Requests, their sequences (one per candidate), and what the engine reports back.

A request's progress is counters, not phases: `num_computed_tokens` of `token_ids` have their KV
in the cache. Prefill is "computed < prompt length", decode is "computed = all but the last
token"; the scheduler treats both the same way (schedule the uncomputed tail, within budget).
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from serve_app.engine.sampler import TokenLogprobs
from serve_app.engine.sampling_params import SamplingParams
from serve_app.engine.stop import StopChecker


class EngineError(Exception):
    """Base of the errors the engine raises to its callers."""


class RequestRejectedError(EngineError, ValueError):
    """The request itself cannot be served (too long, empty, duplicate id): a client error.
    `param` names the request field at fault, when there is one."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param

    def __reduce__(self):               # these cross Ray (Router → Ingress): keep every field
        return type(self), (str(self), self.param)


class EngineOverloadedError(EngineError):
    """Admission control refused new work; the caller should retry after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def __reduce__(self):               # pickled as (message,) by default, which __init__ refuses:
        return type(self), (str(self), self.retry_after_s)   # Ray then sent a 503, not the 429


class FinishReason(str, enum.Enum):
    STOP = "stop"        # eos, a stop token id or a stop string
    LENGTH = "length"    # max_tokens or the model's context length
    ABORT = "abort"      # aborted by the caller (client went away)


@dataclass
class Sequence:
    """One candidate of a request: prompt + its own generated tokens and decoding state."""
    seq_id: str
    request: "Request"
    index: int                                   # candidate index within the request (0..n-1)
    token_ids: list[int]                         # prompt + generated
    generator: torch.Generator | None            # seeded per candidate; None = shared RNG
    stop_checker: StopChecker
    detokenizer: object | None = None            # IncrementalDetokenizer when the engine has a tokenizer
    num_computed_tokens: int = 0                 # tokens whose KV is in the cache
    num_cached_tokens: int = 0                   # of those, served from the prefix cache at admission
    text: str = ""                               # emitted text (stop strings cut, held tail excluded)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None         # the stop string or token id that ended it
    emitted_tokens: int = 0                      # output tokens already reported (for deltas)
    emitted_chars: int = 0                       # text chars already reported (for deltas)
    last_token_time: float | None = None         # monotonic time of this sequence's latest token
    draft_len: int | None = None                 # speculative drafts next step (None: the engine's maximum)
    lookup: object | None = None                 # its n-gram index for lookup drafts (engine/speculative.py)
    hint_text: str | None = None                 # its request's draft tokens as text, once decoded
    hint_dead: bool = False                      # its output left those draft tokens: never use them again

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.request.num_prompt_tokens:]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestTimes:
    arrival: float                               # time.monotonic() when added
    first_scheduled: float | None = None         # queue time = first_scheduled - arrival
    first_token: float | None = None             # TTFT = first_token - arrival
    finished: float | None = None
    predicted_s: float | None = None             # latency predicted at admission (uncalibrated)


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    sequences: list[Sequence] = field(default_factory=list)
    times: RequestTimes = field(default_factory=lambda: RequestTimes(time.monotonic()))
    forked: bool = False                         # n>1: candidates 1..n-1 exist
    tag: str = ""                                # opaque label for observers (e.g. the request's tier)
    precision: str = "full"                      # which experts its rows use (see MoeForCausalLM.precisions)

    @property
    def cache_salt(self) -> str | None:
        """KV computed with quantized experts differs from full-precision KV for the same tokens:
        the prefix cache must never hand one to the other."""
        return None if self.precision == "full" else self.precision

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def finished(self) -> bool:
        return (self.forked or self.params.n == 1) and all(s.finished for s in self.sequences)


@dataclass
class CompletionOutput:
    """One candidate's state as reported to the caller."""
    index: int
    text: str                                    # all text so far
    token_ids: list[int]                         # all generated ids so far
    finish_reason: str | None                    # "stop" | "length" | "abort" | None while running
    stop_reason: str | int | None
    logprobs: list[TokenLogprobs] | None         # per generated token, when requested
    cumulative_logprob: float | None             # sum of chosen-token logprobs, when requested
    delta_text: str = ""                         # text new since this request's previous output
    delta_token_ids: list[int] = field(default_factory=list)


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]              # ordered by candidate index
    finished: bool
    num_cached_tokens: int                       # prompt tokens served from the prefix cache
    times: RequestTimes
    tag: str = ""                                # the request's tag (see Request.tag)
