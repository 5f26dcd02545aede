"""Per-request sampling parameters (vLLM's `SamplingParams`, trimmed to what we serve).

Design: one frozen dataclass, validated once in `__post_init__`, so every later stage (scheduler,
sampler, stop checker, API layer) can trust the values without re-checking. Validation raises
`SamplingParamsError` (a `ValueError`) whose `.param` names the field, so the API layer can map it
to an OpenAI-style 400 with `param` set, and whose message names the offending value.

Bounds are chosen to be sane for a latency-bound code-completion server, not to be maximal:
- temperature in [0, 2]: OpenAI's range; 0 (and anything below GREEDY_BELOW) means greedy (argmax, no randomness).
- top_p in (0, 1]: 0 would keep nothing; the sampler always keeps at least one token anyway.
- top_k >= -1: 0 and -1 both mean "off" (vLLM uses -1, OpenAI-style clients send 0).
- n in [1, 16]: every candidate holds its own KV blocks after the shared prefix; 16 bounds that.
- stop: at most 8 non-empty strings: the stop checker scans each on every delta.
- logprobs in [0, 20]: 0 = chosen token only, k = also the k most likely alternatives (OpenAI's cap).
- seed in [0, 2**63): candidate i of an n>1 request uses seed + i (see sampler.make_generator).
- logit_bias: at most 300 token ids (OpenAI's cap), each bias in [-100, 100] (OpenAI's range: -100
  bans a token in practice, 100 all but forces it); ids are checked against the vocabulary by the
  engine (`EngineCore.add_request`), which knows it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

MAX_TEMPERATURE = 2.0
MAX_N = 16
MAX_STOP_STRINGS = 8
MAX_LOGPROBS = 20
# Temperatures below this sample as greedy (vLLM's _SAMPLING_EPS): the distribution is the argmax's
# already, and dividing logits by, say, 1e-138 overflows to inf, the softmax to NaN, and the draw
# to a token id past the vocabulary (found by the API fuzzer: "index out of range" in the engine step).
GREEDY_BELOW = 1e-5
MAX_PENALTY = 2.0  # OpenAI's range for frequency_penalty and presence_penalty
MAX_SEED = 2**63  # exclusive; leaves room for seed + candidate index in torch's 64-bit seed
MAX_LOGIT_BIAS_TOKENS = 300
MAX_LOGIT_BIAS = 100.0


class SamplingParamsError(ValueError):
    """An invalid sampling parameter; `.param` names the field (for OpenAI-style error bodies)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param

    def __reduce__(self):               # crosses Ray; the default pickles only the message
        return type(self), (self.param, str(self))


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16            # tokens to generate at most (the prompt does not count)
    temperature: float = 1.0        # 0 = greedy; higher = flatter distribution
    top_p: float = 1.0              # nucleus: keep the smallest set of tokens with mass >= top_p
    top_k: int = 0                  # keep the k most likely tokens; 0 or -1 = off
    seed: int | None = None         # per-request RNG seed; None = the device's shared RNG
    stop: tuple[str, ...] = ()      # stop strings (not emitted); a str or list is normalised
    stop_token_ids: tuple[int, ...] = ()  # extra token ids that end generation (kept in output ids)
    ignore_eos: bool = False        # keep generating past EOS (benchmarks want fixed lengths)
    n: int = 1                      # candidates per prompt
    logprobs: int | None = None     # None = none; 0 = chosen token; k = also top-k alternatives
    # OpenAI's penalties on tokens already *generated* (not the prompt), in [-2, 2]: a token's logit
    # drops by frequency_penalty per earlier occurrence, and by presence_penalty once if it occurred.
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    # Ours: the penalties leave "structural" tokens alone (only whitespace and punctuation:
    # indents, newlines, brackets; the tokenizer's `structural_token_ids`). Code repeats those by
    # nature, so OpenAI's penalty, which counts them too, pushes a code model off correct code.
    penalty_skips_structural: bool = False
    # OpenAI's logit_bias: (token id, bias) pairs added to the logits before any sampling transform,
    # greedy rows included; a {id: bias} dict (ids as ints or decimal strings) is normalised, sorted.
    logit_bias: tuple[tuple[int, float], ...] = ()
    # Ours: tokens the output is expected to start with (the rest of a suggestion the user is
    # typing, api/typing_through.py). The engine verifies them as speculative drafts, so they
    # change how many steps the request takes, never what it generates.
    draft_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", _normalise_stop(self.stop))
        object.__setattr__(self, "logit_bias", _normalise_logit_bias(self.logit_bias))
        object.__setattr__(self, "stop_token_ids", _normalise_stop_token_ids(self.stop_token_ids))
        object.__setattr__(self, "draft_token_ids", _normalise_token_ids("draft_token_ids", self.draft_token_ids))
        _check_int("max_tokens", self.max_tokens, low=1)
        _check_float("temperature", self.temperature, low=0.0, high=MAX_TEMPERATURE)
        _check_float("top_p", self.top_p, low=0.0, high=1.0, low_inclusive=False)
        _check_int("top_k", self.top_k, low=-1)
        if self.seed is not None:
            _check_int("seed", self.seed, low=0, high=MAX_SEED - 1)
        for flag in ("ignore_eos", "penalty_skips_structural"):
            if not isinstance(getattr(self, flag), bool):
                raise SamplingParamsError(flag, f"{flag} must be a bool, got {getattr(self, flag)!r}")
        _check_int("n", self.n, low=1, high=MAX_N)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, low=0, high=MAX_LOGPROBS)
        _check_float("frequency_penalty", self.frequency_penalty, low=-MAX_PENALTY, high=MAX_PENALTY)
        _check_float("presence_penalty", self.presence_penalty, low=-MAX_PENALTY, high=MAX_PENALTY)

    @property
    def penalized(self) -> bool:
        """Whether the sampler must look at the tokens this sequence generated so far."""
        return self.frequency_penalty != 0 or self.presence_penalty != 0

    @property
    def greedy(self) -> bool:
        """Temperature 0 (or below GREEDY_BELOW): the sampler takes the argmax and ignores
        top-k/top-p/seed."""
        return self.temperature < GREEDY_BELOW


def _normalise_stop(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, (list, tuple)):
        raise SamplingParamsError("stop", f"stop must be a string or a list of strings, got {stop!r}")
    if len(stop) > MAX_STOP_STRINGS:
        raise SamplingParamsError(
            "stop", f"stop allows at most {MAX_STOP_STRINGS} strings, got {len(stop)}: {list(stop)!r}")
    for s in stop:
        if not isinstance(s, str) or not s:
            raise SamplingParamsError("stop", f"stop strings must be non-empty strings, got {s!r}")
    return tuple(stop)


def _normalise_logit_bias(bias: Any) -> tuple[tuple[int, float], ...]:
    if bias is None:
        return ()
    items = bias.items() if isinstance(bias, dict) else bias
    try:
        items = list(items)
    except TypeError:
        raise SamplingParamsError("logit_bias", f"logit_bias must map token ids to numbers, got {bias!r}") from None
    if len(items) > MAX_LOGIT_BIAS_TOKENS:
        raise SamplingParamsError("logit_bias", f"logit_bias allows at most {MAX_LOGIT_BIAS_TOKENS} tokens, "
                                                f"got {len(items)}")
    out: dict[int, float] = {}
    for item in items:
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise SamplingParamsError("logit_bias", f"logit_bias must map token ids to numbers, got {item!r}")
        key, value = item
        if isinstance(key, str) and key.isascii() and key.isdigit():
            key = int(key)
        if isinstance(key, bool) or not isinstance(key, int) or key < 0:
            raise SamplingParamsError("logit_bias", f"logit_bias keys must be token ids (non-negative "
                                                    f"integers), got {item[0]!r}")
        _check_float("logit_bias", value, low=-MAX_LOGIT_BIAS, high=MAX_LOGIT_BIAS)
        out[key] = float(value)
    return tuple(sorted(out.items()))


def _normalise_stop_token_ids(ids: Any) -> tuple[int, ...]:
    return _normalise_token_ids("stop_token_ids", ids)


def _normalise_token_ids(name: str, ids: Any) -> tuple[int, ...]:
    if ids is None:
        return ()
    if not isinstance(ids, (list, tuple)):
        raise SamplingParamsError(name, f"{name} must be a list of ints, got {ids!r}")
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise SamplingParamsError(name, f"{name} must hold non-negative ints, got {t!r}")
    return tuple(ids)


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    # bool is an int subclass; `max_tokens=True` is a client bug, not 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise SamplingParamsError(name, f"{name} must be an int, got {value!r}")
    if value < low or (high is not None and value > high):
        bounds = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise SamplingParamsError(name, f"{name} must be {bounds}, got {value!r}")


def _check_float(name: str, value: Any, low: float, high: float, low_inclusive: bool = True) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SamplingParamsError(name, f"{name} must be a finite number, got {value!r}")
    too_low = value < low if low_inclusive else value <= low
    if too_low or value > high:
        bracket = "[" if low_inclusive else "("
        raise SamplingParamsError(name, f"{name} must be in {bracket}{low}, {high}], got {value!r}")
