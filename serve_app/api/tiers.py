"""Complexity tiers for adaptive precision (DESIGN §3, seed §2.3): request → simple / medium / complex.

Why tiers: the router holds INT4/INT8 copies of every expert; full-precision experts live on the
expert shards, one network hop per MoE layer per decode step. So the classifier decides which
requests stay on the router (simple, medium) and which pay the hops for quality (complex).

Cost: runs on every request before tokenization. Only the prefix's last `TAIL_LINES` lines (at most
`TAIL_CHARS` characters) and the suffix's first `SUFFIX_LINES` lines (`SUFFIX_CHARS`) are read; the
rest of a 200 KB file is touched by `len()` only. One regex pass lexes that window (strings,
comments, brackets): a lexer, never a parse. Limitation: a string or comment opened above the
window is read inside-out (rare: docstrings are shorter than `TAIL_LINES`).

Decision rules for "fim" and "completion" (first match wins; it is `reasons[0]`):
  1 in_comment / in_docstring   medium   prose: a line or a few, INT8 keeps it fluent
  2 in_string                   simple   finish the literal
  3 typing a def/class header   complex  new_definition: signature + a body nobody wrote yet
    (the same header with its body already below: simple, edit_header)
  4 after a line opening a block (`:` / `{`), on it or on blank lines below it:
      a def/class with no body below          complex  new_definition
      anything else                           medium   opens_block: a body is coming
  5 after a def's docstring, no body below    complex  implement_docstring: write the spec'd code
  6 inside an open ( [ (Python also {)        simple   open_bracket: finish the arguments/literal
  7 code before the cursor on its line        simple   mid_line: finish the identifier/call/expression
  8 blank line at top level, blank line above, no code after the cursor
                                              complex  open_gap: a new top-level item, unbounded
  9 other blank line at top level             medium   new_top_level_statement
 10 blank line in a block, code continues at ≥ this indent below
                                              simple   next_statement: a one-line gap
 11 blank line at the end of a block          medium   block_continuation: the rest of the body
Chat has no cursor: complex ("chat"): answers are prose plus code of unknown length, and a person
reads them whole, so quality beats the last milliseconds; the budget rule below still applies.

Then an explicit max_tokens picks the tier by the policy's budgets (when the policy allows it):
  > medium budget (128) → complex; > simple budget (32) → at least medium; ≤ 32 → at most medium
  (three full-precision candidates for ≤ 32 tokens is hop latency without benefit).
Then a stop string "\n" (output ends at the line's end) makes fim/completion simple.
A huge prefix alone never moves the tier: its cost is prefill, which no tier changes.

Explicit request fields win, in `resolve` (see there). `classify_request` does both steps.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

# The cursor window and its features live in cursor.py; re-exported here, the classifier's API.
from serve_app.api.cursor import (SUFFIX_CHARS, SUFFIX_LINES, TAIL_CHARS, TAIL_LINES,  # noqa: F401
                                  CompletionContext, CursorFeatures, TierError, _check_max_tokens,
                                  extract_features)

class Tier(str, Enum):
    SIMPLE = "simple"
    MEDIUM = "medium"
    COMPLEX = "complex"


class Precision(str, Enum):
    """Where the experts run: INT4/INT8 copies on the router, FULL on the expert shards."""
    INT4 = "int4"
    INT8 = "int8"
    FULL = "full"


@dataclass(frozen=True)
class TierDefaults:
    """What one tier runs with when the request does not say."""
    precision: Precision
    max_tokens: int              # budget when the client sends none; an explicit value is not clipped
    temperature: float           # low: completions have one right answer more often than not
    n: int                       # candidates generated
    rank_candidates: bool        # return the best candidate by ranking.TIER_RANKER


@dataclass(frozen=True)
class TierPolicy:
    """All tiers (seed §2.3's values by default). Budgets must grow with the tier: the explicit
    max_tokens rule moves a request to the smallest tier whose budget holds it."""
    simple: TierDefaults = TierDefaults(Precision.INT4, 32, 0.1, 1, False)    # identifiers, brackets
    medium: TierDefaults = TierDefaults(Precision.INT8, 128, 0.3, 1, False)   # a body, a branch
    complex: TierDefaults = TierDefaults(Precision.FULL, 512, 0.4, 3, True)   # whole functions
    # Off for clients that send one large max_tokens on every keystroke: it then says nothing.
    explicit_max_tokens_sets_tier: bool = True

    def __post_init__(self) -> None:
        for tier in Tier:
            d = self.defaults(tier)
            name = f"{tier.value}"
            if not isinstance(d.precision, Precision):
                raise TierError(name, f"{name}.precision must be a Precision, got {d.precision!r}")
            if not 0.0 <= d.temperature <= 2.0:
                raise TierError(name, f"{name}.temperature must be in [0, 2], got {d.temperature!r}")
            if d.max_tokens < 1 or d.n < 1:
                raise TierError(name, f"{name}: max_tokens and n must be >= 1, got {d.max_tokens}, {d.n}")
            if d.rank_candidates and d.n < 2:
                raise TierError(name, f"{name}: ranking needs n >= 2 candidates, got n={d.n}")
        if not self.simple.max_tokens < self.medium.max_tokens < self.complex.max_tokens:
            raise TierError("max_tokens", "tier budgets must grow simple < medium < complex, got "
                            f"{self.simple.max_tokens}, {self.medium.max_tokens}, {self.complex.max_tokens}")

    def defaults(self, tier: Tier) -> TierDefaults:
        return getattr(self, tier.value)


DEFAULT_POLICY = TierPolicy()


@dataclass(frozen=True)
class TierDecision:
    """classify's answer: the tier and its defaults, before the request's explicit fields."""
    tier: Tier
    precision: Precision         # the tier's precision
    max_tokens: int              # the request's max_tokens if sent, else the tier's budget
    max_tokens_explicit: bool    # the client sent max_tokens (it took part in picking the tier)
    temperature: float           # the tier's default
    n: int                       # candidates the tier generates
    rank_candidates: bool        # return the best of n by ranking.TIER_RANKER
    reasons: tuple[str, ...]     # from REASONS; [0] = the context rule, then adjustments (metrics labels)
    features: CursorFeatures | None   # None for chat (no cursor to read)


@dataclass(frozen=True)
class ResolvedTier:
    """What the request runs with: tier defaults overlaid with what the client sent."""
    tier: Tier                   # label for metrics; a precision override does not change it
    precision: Precision
    max_tokens: int
    temperature: float
    n: int                       # choices returned to the client
    num_candidates: int          # sequences generated (SamplingParams.n); > n only when ranking
    rank_candidates: bool        # keep the n best of num_candidates (needs the chosen tokens' logprobs)
    reasons: tuple[str, ...]


REASONS = frozenset({
    "chat", "in_comment", "in_docstring", "in_string", "new_definition", "edit_header", "opens_block",
    "implement_docstring", "open_bracket", "mid_line", "open_gap", "new_top_level_statement",
    "next_statement", "block_continuation",
    "explicit_max_tokens", "max_tokens_above_medium", "max_tokens_above_simple", "max_tokens_within_simple",
    "single_line_stop", "precision_override", "precision_unavailable", "explicit_temperature", "explicit_n", "greedy_unranked",
    "stream_unranked",
})


# ---- decision ------------------------------------------------------------------------------------

def _context_tier(f: CursorFeatures) -> tuple[Tier, str]:
    """Rules 1–11 of the module docstring, in order."""
    if f.in_comment or f.in_docstring:
        return Tier.MEDIUM, "in_comment" if f.in_comment else "in_docstring"
    if f.in_string:
        return Tier.SIMPLE, "in_string"
    if f.in_header:
        return (Tier.SIMPLE, "edit_header") if f.body_follows else (Tier.COMPLEX, "new_definition")
    if f.opens_block:
        if f.is_definition and not f.body_follows:
            return Tier.COMPLEX, "new_definition"
        return Tier.MEDIUM, "opens_block"
    if f.after_docstring and not f.body_follows:
        return Tier.COMPLEX, "implement_docstring"
    if f.open_brackets:
        return Tier.SIMPLE, "open_bracket"
    if f.mid_line:
        return Tier.SIMPLE, "mid_line"
    if f.indent == 0:
        if f.after_blank_line and f.suffix_next_indent is None:
            return Tier.COMPLEX, "open_gap"
        return Tier.MEDIUM, "new_top_level_statement"
    if f.suffix_next_indent is not None and f.suffix_next_indent >= f.indent:
        return Tier.SIMPLE, "next_statement"
    return Tier.MEDIUM, "block_continuation"


def _budget_tier(tier: Tier, max_tokens: int, policy: TierPolicy) -> tuple[Tier, str | None]:
    """The smallest tier whose budget holds an explicit max_tokens, within one step of the context's."""
    if max_tokens > policy.medium.max_tokens:
        return Tier.COMPLEX, (None if tier is Tier.COMPLEX else "max_tokens_above_medium")
    if max_tokens > policy.simple.max_tokens:
        return (Tier.MEDIUM, "max_tokens_above_simple") if tier is Tier.SIMPLE else (tier, None)
    return (Tier.MEDIUM, "max_tokens_within_simple") if tier is Tier.COMPLEX else (tier, None)


def classify(ctx: CompletionContext, policy: TierPolicy = DEFAULT_POLICY) -> TierDecision:
    """Pick the tier from the request alone; see the module docstring for the rules."""
    features = None
    if ctx.kind == "chat":
        tier, reasons = Tier.COMPLEX, ["chat"]
    else:
        features = extract_features(ctx)
        tier, reason = _context_tier(features)
        reasons = [reason]
    if ctx.max_tokens is not None:
        reasons.append("explicit_max_tokens")
        if policy.explicit_max_tokens_sets_tier:
            tier, moved = _budget_tier(tier, ctx.max_tokens, policy)
            if moved:
                reasons.append(moved)
    if ctx.kind != "chat" and tier is not Tier.SIMPLE and any(s in ("\n", "\r\n") for s in ctx.stop):
        tier = Tier.SIMPLE
        reasons.append("single_line_stop")
    d = policy.defaults(tier)
    return TierDecision(tier=tier, precision=d.precision,
                        max_tokens=ctx.max_tokens if ctx.max_tokens is not None else d.max_tokens,
                        max_tokens_explicit=ctx.max_tokens is not None, temperature=d.temperature, n=d.n,
                        rank_candidates=d.rank_candidates, reasons=tuple(reasons), features=features)


def resolve(decision: TierDecision, requested_precision: str = "auto", requested_max_tokens: int | None = None,
            requested_temperature: float | None = None, requested_n: int | None = None, *,
            stream: bool = False) -> ResolvedTier:
    """Overlay what the client sent on the tier's defaults; None = not sent (use the field set of
    the pydantic request: its defaults, temperature 1.0 and n 1, are not requests).

    - precision other than "auto" replaces the tier's precision; the tier label stays (metrics).
    - max_tokens: pass it in `CompletionContext.max_tokens`, where it also picks the tier; a value
      given here wins over the decision's but does not re-pick the tier.
    - temperature wins as sent. At 0 the candidates would be identical: ranking is dropped.
    - n: exactly n sequences, all returned, none hidden or ranked (the client chooses among them).
    - stream: ranking would hold every token until all candidates finish, which defeats
      streaming: one candidate is generated instead.
    Ranking by mean (not summed) token logprob, so a short candidate does not win by being short.
    """
    reasons = list(decision.reasons)
    precision = decision.precision
    if requested_precision != "auto":
        try:
            precision = Precision(requested_precision)
        except ValueError:
            raise TierError("precision", f"precision must be 'auto', 'int4', 'int8' or 'full', "
                                         f"got {requested_precision!r}") from None
        reasons.append("precision_override")
    max_tokens = decision.max_tokens
    if requested_max_tokens is not None:
        _check_max_tokens(requested_max_tokens)
        max_tokens = requested_max_tokens
        if "explicit_max_tokens" not in reasons:
            reasons.append("explicit_max_tokens")
    temperature = decision.temperature
    if requested_temperature is not None:
        temperature = requested_temperature
        reasons.append("explicit_temperature")
    n, candidates, rank = 1, decision.n, decision.rank_candidates
    if requested_n is not None:
        n, candidates, rank = requested_n, requested_n, False
        reasons.append("explicit_n")
    elif rank and (temperature == 0 or stream):
        candidates, rank = 1, False
        reasons.append("greedy_unranked" if temperature == 0 else "stream_unranked")
    elif not rank:
        n = candidates               # an unranked tier returns every candidate it makes
    return ResolvedTier(tier=decision.tier, precision=precision, max_tokens=max_tokens, temperature=temperature,
                        n=n, num_candidates=candidates, rank_candidates=rank, reasons=tuple(reasons))


def classify_request(ctx: CompletionContext, requested_precision: str = "auto",
                     requested_temperature: float | None = None, requested_n: int | None = None, *,
                     stream: bool = False, policy: TierPolicy = DEFAULT_POLICY) -> ResolvedTier:
    """classify + resolve: what the API layer calls once per request."""
    return resolve(classify(ctx, policy), requested_precision, None, requested_temperature, requested_n,
                   stream=stream)
